"""Diagnosis: turn what the callbacks logged into findings a user can act on. `diagnose(learn)` reads
`MomentumLogger`, `DropoutSchedule`, `BNDrift`/`PreciseBNCallback` and fastai's `Recorder` from the last fit
(and `bn_shift` given new data) and returns one row per finding: `kind`, `severity`, `where`, `evidence`
(the measured numbers), `advice` (what to do, with code). Every threshold lives in `THRESHOLDS`."""
from __future__ import annotations

import contextlib
import html
import math

import numpy as np
import pandas as pd
import torch
from fastai.learner import Learner
from fastcore.basics import patch_to
from fastcore.foundation import L
from matplotlib.figure import Figure
from torch import nn

from .batchnorm import BNDrift
from .core import find_cb, unwrap_model
from .dropout import DropoutSchedule
from .momentum import MomentumLogger
from .precise import PreciseBNCallback, module_modes, preserved_rng

__all__ = ['THRESHOLDS', 'diagnose', 'grad_noise_scale', 'baseline_loss', 'findings_lines', 'findings_html',
           'plot_finding', 'findings_section']

COLUMNS = ['kind', 'severity', 'where', 'evidence', 'advice']

# Every threshold of the diagnosis, with the evidence behind it (measured on diamonds and flights, 4,000-8,000
# rows, layers [64, 32], adam() and sgd_momentum(), fit_one_cycle; nbs/07_diagnose.ipynb states them in prose).
THRESHOLDS = dict(
    # lr_too_high, three ways. A non-finite loss is divergence. Or the smoothed training loss ends >= `rise` x
    # its minimum in the fit (healthy runs end at their minimum) and either >= `explode` x where it started or
    # while momentum and gradient fight over the last epoch: mean cos(m, g) < `fight_cos` (healthy 0.31-0.56) or
    # mean sign_flip > `fight_flip` (healthy 0.26-0.38). Or, after >= `few_steps` steps, it ends above its first
    # value while the validation loss is >= `worse` x a constant predictor's (lr 1000x too high: 2.1-50x; the
    # same nets after one step, 1.07-1.33x) and lr_too_low does not hold: the steps made the model worse.
    rise=1.5, explode=2., fight_cos=0.2, fight_flip=0.45, worse=1.5,
    # lr_too_low: the median update/param ratio of the live layers over the last epoch below `low_ratio`, two
    # orders under the usual ~1e-3 (healthy 2e-4..8e-3; lr 1000x too low 2e-6), and the smoothed training loss
    # fell by less than `stuck` of its first value (healthy: 50-90%).
    low_ratio=1e-5, stuck=0.1,
    # stale_bn_stats: the validation loss with population BN statistics is at least `bn_gain` lower than with
    # the running ones (healthy runs of >= 50 steps: -7%..+8%; BN momentum 0.001: 86% lower).
    bn_gain=0.2,
    # dropout_too_strong: a layer's p in the last epoch >= `high_p`, and the model does not overfit: its training
    # loss without dropout (same weights, BN on running statistics) >= `no_gap` x the validation loss, so there is
    # no generalisation gap for dropout to close (p=0.9: 1.01-1.05; fits that regularise usefully: 0.84-0.87).
    # The evidence also gives the training loss with dropout on, the cost the optimizer saw.
    high_p=0.5, no_gap=0.9,
    # dead_layer: the largest gradient norm a layer got in the last epoch <= `dead_rel` x the median layer's
    # (healthy layers sit within 3 orders of each other; a layer no gradient reaches has exactly 0).
    dead_rel=1e-6,
    # worse_than_baseline: the validation loss >= `baseline` x a constant predictor's (the training mean, or the
    # class frequencies): within 5% of a constant the model has learned nothing usable. Fewer than `few_steps`
    # optimizer steps in the fit is named as the likely cause.
    baseline=0.95, few_steps=20,
    # batch_size (info): B_simple from `noise_pairs` (small, large) batch pairs, the small batch being
    # large/`noise_split`; the batch size is called too large above `bs_factor` x B_simple, too small below 1/that.
    noise_pairs=4, noise_split=8, bs_factor=4.,
)


def _finding(kind, severity, where, evidence, advice): return dict(kind=kind, severity=severity, where=where,
                                                                   evidence=evidence, advice=advice)


def _cb_df(learn, cls, log='df'):
    "The public log of the attached callback of type `cls` (a subclass too), or None when none is or it logged nothing."
    cb = find_cb(learn, cls)
    df = getattr(cb, log, None) if cb is not None else None
    return df if df is not None and len(df) else None


def _last_epoch(df):
    "The rows of the last epoch of the last fit (steps keep counting across fits, `epoch` restarts)."
    df = df.sort_values('step', kind='stable')
    epochs = df['epoch'].to_numpy()
    other = np.nonzero(epochs != epochs[-1])[0]
    return df.iloc[other[-1] + 1:] if len(other) else df


def _fit_epochs(learn): return max(len(learn.recorder.values), 1)


def _peak_lr(learn):
    lrs = [float(v) for v in learn.recorder.lrs]
    return max(lrs) if lrs else float(learn.opt.hypers[-1]['lr'])


def _train_losses(learn):
    return np.array([float(v) for v in learn.recorder.losses])


def _epoch_value(learn, name):
    "The last epoch's `name` column (`train_loss`, `valid_loss`, a metric) from the Recorder, or None."
    rec = learn.recorder
    if not rec.values: return None
    row = dict(zip([n for n in rec.metric_names[1:] if n != 'time'], rec.values[-1]))
    return float(row[name]) if name in row and row[name] is not None else None


def _fmt(v): return f'{v:.3g}'


# ---------------------------------------------------------------------------------------------
# The kinds

def _lr_too_high(learn, mom, th, too_low=False):
    losses = _train_losses(learn)
    lr, n = _peak_lr(learn), _fit_epochs(learn)
    advice = (f"lower the learning rate tenfold, e.g. `learn.fit_one_cycle({n}, {_fmt(lr / 10)})`, "
              "or pick one with `learn.lr_find()`")
    valid = _epoch_value(learn, 'valid_loss')
    if not np.isfinite(losses).all() or (valid is not None and not math.isfinite(valid)):
        bad = int(np.argmax(~np.isfinite(losses))) + 1 if not np.isfinite(losses).all() else len(losses)
        return _finding('lr_too_high', 'warn', '', f"the loss diverged: it became non-finite at batch {bad} of "
                        f"{len(losses)} with the lr peaking at {_fmt(lr)}.", advice)
    first, lo, last = float(losses[0]), float(losses.min()), float(losses[-1])
    rose = f"the training loss rose to {_fmt(last)}, {_fmt(last / lo)}x its minimum {_fmt(lo)}"
    if last >= th['rise'] * lo and last >= th['explode'] * first:
        return _finding('lr_too_high', 'warn', '', f"{rose} and {_fmt(last / first)}x its first value {_fmt(first)}: "
                        f"it exploded at a peak lr of {_fmt(lr)}.", advice)
    if last >= th['rise'] * lo and mom is not None:
        cos, flip = float(mom['cos_mom_grad'].mean()), float(mom['sign_flip'].mean())
        if cos < th['fight_cos'] or flip > th['fight_flip']:
            return _finding('lr_too_high', 'warn', '', f"{rose}, while momentum and gradient fought over the last "
                            f"epoch (mean cos_mom_grad {cos:.3f}, mean sign_flip {flip:.3f}) at a peak lr of {_fmt(lr)}.",
                            advice)
    if too_low or last < first or len(losses) < th['few_steps'] or valid is None: return None
    base = baseline_loss(learn)[0]
    if valid < th['worse'] * base: return None
    return _finding('lr_too_high', 'warn', '', f"after {len(losses)} steps the training loss ended at {_fmt(last)}, above "
                    f"its first value {_fmt(first)}, and the validation loss {_fmt(valid)} is {_fmt(valid / base)}x a "
                    f"constant predictor's {_fmt(base)}: at a peak lr of {_fmt(lr)} the steps made the model worse.", advice)


def _live_layers(mom, th):
    "Per layer over the last epoch: the largest gradient norm, and whether it is dead (see `dead_rel`)."
    gmax = mom.groupby('layer', sort=False)['grad_norm'].max()
    ref = float(gmax[gmax > 0].median()) if (gmax > 0).any() else 0.
    return gmax, gmax <= th['dead_rel'] * ref


def _lr_too_low(learn, mom, th):
    losses = _train_losses(learn)
    gmax, dead = _live_layers(mom, th)
    ratios = mom[mom['layer'].isin(gmax.index[~dead])].groupby('layer')['update_ratio'].median().dropna()
    if not len(ratios) or not len(losses): return None
    ratio, drop = float(ratios.median()), 1 - float(losses[-1]) / float(losses[0])
    if not (ratio < th['low_ratio'] and drop < th['stuck']): return None
    lr, n = _peak_lr(learn), _fit_epochs(learn)
    new_lr = lr * min(1e3, 1e-3 / max(ratio, 1e-12))
    return _finding('lr_too_low', 'warn', '', f"the median update/param ratio over the last epoch was {ratio:.2e} "
                    f"(the usual is ~1e-3) and the training loss changed by only {-100 * drop:+.1f}% "
                    f"(from {_fmt(losses[0])} to {_fmt(losses[-1])}) at a peak lr of {_fmt(lr)}.",
                    f"raise the learning rate, e.g. `learn.fit_one_cycle({n}, {_fmt(new_lr)})`, "
                    "or pick one with `learn.lr_find()`")


def _stale_bn(pdf, th):
    last = pdf[pdf['epoch'] == pdf['epoch'].max()]
    run, pop = float(last['valid_loss'].iloc[0]), float(last['valid_loss_precise'].iloc[0])
    if not (math.isfinite(run) and math.isfinite(pop)) or pop > (1 - th['bn_gain']) * run: return None
    worst = last.loc[last['mean_gap'].idxmax()]
    return _finding('stale_bn_stats', 'warn', str(worst['layer']),
                    f"the validation loss was {_fmt(run)} with BN's running statistics and {_fmt(pop)} with "
                    f"population statistics ({100 * (1 - pop / run):.0f}% lower); {worst['layer']} had the largest "
                    f"mean_gap, {worst['mean_gap']:.3g}.",
                    "refresh the statistics with `learn.precise_bn()` before `learn.export()`, attach "
                    "`PreciseBNCallback()`, or raise BN's momentum (e.g. `m.momentum = 0.1` for each BatchNorm)")


@contextlib.contextmanager
def _untouched(learn):
    """Leave no trace of a measurement: module modes, dropout p's, parameter gradients, the RNGs (torch, python,
    numpy) and the training loader's own `rng` are put back on exit."""
    model = learn.model
    ps = [(m, m.p) for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    try:
        with module_modes(model), preserved_rng(learn.dls.train): yield
    finally:
        for p, g in zip(params, grads): p.grad = g
        for m, p in ps: m.p = p


def _train_batches(learn, n):
    "The first `n` (inputs, targets) batches of the training loader, on the model's device."
    device = next(learn.model.parameters()).device
    n_inp = getattr(learn.dls, 'n_inp', 1)
    out = []
    for b in learn.dls.train:
        b = tuple(t.to(device) for t in b)
        out.append((b[:n_inp], b[n_inp:]))
        if len(out) >= n: break
    return out


def _dropout_losses(learn, last_p, n_batches=4):
    """The loss on `n_batches` training batches at the current weights with every dropout layer at its last
    logged p (BN on its running statistics), and with dropout off: (with dropout, without)."""
    mods = dict(unwrap_model(learn.model).named_modules())
    with _untouched(learn), torch.no_grad():
        batches = _train_batches(learn, n_batches)
        learn.model.eval()
        plain = np.mean([float(learn.loss_func(learn.model(*x), *y)) for x, y in batches])
        for name, p in last_p.items():
            if name in mods: mods[name].p = float(p); mods[name].train()
        dropped = np.mean([float(learn.loss_func(learn.model(*x), *y)) for x, y in batches])
    return float(dropped), float(plain)


def _dropout_too_strong(learn, ddf, th):
    last_p = _last_epoch(ddf).groupby('layer', sort=False)['p'].mean()
    if not len(last_p) or last_p.max() < th['high_p']: return None
    valid = _epoch_value(learn, 'valid_loss')
    if valid is None or not math.isfinite(valid): return None
    dropped, plain = _dropout_losses(learn, last_p)
    if not plain >= th['no_gap'] * valid: return None
    where = str(last_p.idxmax())
    return _finding('dropout_too_strong', 'warn', where,
                    f"{where} dropped with mean p={last_p.max():.2f} in the last epoch; the training loss with dropout "
                    f"was {_fmt(dropped)}, {_fmt(dropped / plain)}x the {_fmt(plain)} of the same weights without it, "
                    f"which is no lower than the validation loss {_fmt(valid)}: the model underfits and the dropout "
                    "holds it back.",
                    f"lower p (e.g. `tabular_config(ps=0.1)`) or drop only early: "
                    f"`DropoutSchedule({{'{where}': early_dropout(0.1)}})`")


def _dead_layer(mom, th):
    gmax, dead = _live_layers(mom, th)
    if not dead.any() or dead.all(): return None
    names = list(gmax.index[dead])
    where, before = names[-1], names[:-1]
    others = f" (so did {len(before)} layer(s) before it: {', '.join(before)})" if before else ''
    return _finding('dead_layer', 'warn', where,
                    f"{where} got a largest gradient norm of {gmax[where]:.3g} over the last epoch against a median "
                    f"of {float(gmax[~dead].median()):.3g} for the live layers{others}: no gradient reaches it.",
                    f"re-initialise {where} (e.g. `learn.model.get_submodule('{where}').reset_parameters()`) and check "
                    "for weights set to zero or units stuck at 0 before a ReLU")


def _data_shift(learn, new_df):
    from .batchnorm import bn_shift
    shift = bn_shift(learn, new_df)
    rows = []
    for r in shift[shift['shifted']].itertuples():
        effect = getattr(r, 'effect', (r.new_mean - r.train_mean) / r.train_std)
        rows.append(_finding('data_shift', 'warn', str(r.feature),
                             f"{r.feature} has mean {_fmt(r.new_mean)} in the new data against {_fmt(r.train_mean)} in "
                             f"training (effect {effect:.3g} training sd, z={r.z:.3g}, std ratio {r.std_ratio:.3g}).",
                             f"check how `{r.feature}` is produced for the new rows (units, encoding, pipeline); if the "
                             "world really moved, retrain on data that includes such rows"))
    return rows


def baseline_loss(learn):
    """The validation loss, under `learn.loss_func`, of the best constant predictor fitted to the training
    targets: their mean for regression (MSE: the variance of the validation targets about it), the logits
    log(class frequency) for classification (their cross-entropy). Returns `(loss, accuracy)`, the accuracy of
    the majority class for classification, None for regression. Targets are on the model's training scale."""
    ys = lambda ds: np.asarray(ds.ys.values)
    y_tr, y_va = ys(learn.dls.train_ds), ys(learn.dls.valid_ds)
    device = next(learn.model.parameters()).device
    if learn.dls.c > 1 and np.issubdtype(y_tr.dtype, np.integer):
        c = int(learn.dls.c)
        freq = np.bincount(y_tr.reshape(-1), minlength=c) + 1e-3  # a class unseen in training: not log(0)
        logits = torch.tensor(np.log(freq / freq.sum()), dtype=torch.float32, device=device).expand(len(y_va), c)
        targ = torch.tensor(y_va.reshape(-1), dtype=torch.long, device=device)
        return float(learn.loss_func(logits, targ)), float(np.mean(y_va.reshape(-1) == freq.argmax()))
    y_tr, y_va = y_tr.astype('float32'), y_va.astype('float32')
    mean = torch.tensor(y_tr.mean(0), device=device)
    targ = torch.tensor(y_va, device=device)
    return float(learn.loss_func(mean.expand_as(targ).clone(), targ)), None


def _worse_than_baseline(learn, th):
    valid = _epoch_value(learn, 'valid_loss')
    if valid is None or not math.isfinite(valid): return None
    base, base_acc = baseline_loss(learn)
    if valid < th['baseline'] * base: return None
    n_steps = len(learn.recorder.losses)
    acc = _epoch_value(learn, 'accuracy')
    acc_txt = f" (accuracy {acc:.3f} against the majority class's {base_acc:.3f})" if acc is not None and base_acc is not None else ''
    cause = (f"; the fit ran only {n_steps} optimizer steps, a handful of batches" if n_steps < th['few_steps']
             else f" after {n_steps} optimizer steps")
    what = 'the class frequencies' if base_acc is not None else 'the training mean'
    n_train = len(learn.dls.train_ds)
    small_bs = max(16, 2 ** int(math.log2(max(n_train / 50, 1))))  # ~50 steps an epoch
    return _finding('worse_than_baseline', 'warn', '', f"the validation loss {_fmt(valid)} is no better than the "
                    f"{_fmt(base)} of a constant predictor ({what}){acc_txt}{cause}.",
                    f"train for more steps: a smaller batch (`bs={small_bs}` in the DataLoaders gives {n_train // small_bs} "
                    f"steps an epoch) or more epochs, and see the other findings")


# ---------------------------------------------------------------------------------------------
# Gradient noise scale

def _flat_grad(learn, xb, yb, params):
    learn.model.zero_grad(set_to_none=True)
    learn.loss_func(learn.model(*xb), *yb).backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).double()


def grad_noise_scale(learn, n_pairs=4, split=8):
    """The simple gradient noise scale B_simple = tr(Σ)/|G|² at the current weights (McCandlish et al. 2018,
    App. A), with G the true gradient and Σ the per-example gradient covariance. For each of `n_pairs` training
    batches of size B (the loader's) and its `split` chunks of size b = B/split, the unbiased estimates
    |G|² ≈ (B‖G_B‖² − b·mean‖G_b‖²)/(B − b) and tr(Σ) ≈ (mean‖G_b‖² − ‖G_B‖²)/(1/b − 1/B); both are
    averaged over the pairs before taking the ratio.

    The model runs in eval mode: the estimator assumes a batch's gradient is the mean of independent
    per-example gradients, which holds with BN on its running statistics and no dropout; in training mode BN
    couples the examples of a batch (and normalises a chunk differently from the whole batch). The eval mode
    also leaves BN's running statistics alone. Gradients, modes and RNG states are put back afterwards.
    Returns a dict: `b_simple` (NaN when |G|² came out ≤ 0: the noise hides the mean), `trace_sigma`, `g2`,
    `b_small`, `b_large`, `n_pairs`."""
    params = [p for p in learn.model.parameters() if p.requires_grad]
    big = int(learn.dls.train.bs)
    small = max(1, big // split)
    big = small * split
    g2s, trs = [], []
    with _untouched(learn):
        learn.model.eval()
        for xb, yb in _train_batches(learn, n_pairs):
            if len(yb[0]) < big: continue
            xb, yb = tuple(x[:big] for x in xb), tuple(y[:big] for y in yb)
            gb = float(_flat_grad(learn, xb, yb, params).square().sum())
            gs = np.mean([float(_flat_grad(learn, tuple(x[i:i + small] for x in xb), tuple(y[i:i + small] for y in yb),
                                           params).square().sum()) for i in range(0, big, small)])
            g2s.append((big * gb - small * gs) / (big - small))
            trs.append((gs - gb) / (1 / small - 1 / big))
    if not g2s: raise ValueError(f"grad_noise_scale needs training batches of {big} rows; the loader has none")
    g2, tr = float(np.mean(g2s)), float(np.mean(trs))
    return dict(b_simple=tr / g2 if g2 > 0 else float('nan'), trace_sigma=tr, g2=g2, b_small=small, b_large=big,
                n_pairs=len(g2s))


def _batch_size(learn, th):
    est = grad_noise_scale(learn, th['noise_pairs'], th['noise_split'])
    bs, b = int(learn.dls.train.bs), est['b_simple']
    how = (f"from {est['n_pairs']} pairs of batches of {est['b_small']} and {est['b_large']} rows, model in eval mode "
           f"(|G|²={est['g2']:.3g}, tr(Σ)={est['trace_sigma']:.3g})")
    if not math.isfinite(b):
        return _finding('batch_size', 'info', '', f"the gradient noise scale could not be measured {how}: |G|² "
                        "came out <= 0, the mean gradient lost in its noise (near a minimum, or where the gradients "
                        f"vanish), so B_simple is above what batches of {bs} can resolve.",
                        "nothing to change on this evidence; measure again with more pairs, "
                        "`grad_noise_scale(learn, n_pairs=16)`")
    later = "; B_simple grows as the loss falls, so measure again later in training"
    if bs > th['bs_factor'] * b:
        verdict = (f"the batch is {bs / b:.0f}x the noise scale, so most of it averages away noise that is already "
                   f"small: a smaller batch (e.g. `bs={max(16, int(round(b)))}` in the DataLoaders) makes more progress "
                   f"per example{later}")
    elif bs < b / th['bs_factor']:
        verdict = (f"the gradient is noisy at this batch size: a larger one (e.g. `bs={int(round(b))}` in the "
                   f"DataLoaders) takes fewer steps for the same progress{later}")
    else: verdict = "the batch size is in the efficient range, nothing to change"
    return _finding('batch_size', 'info', '', f"the gradient noise scale B_simple is {b:.3g} against a batch size "
                    f"of {bs}, {how}.", verdict)


# ---------------------------------------------------------------------------------------------
# diagnose

def _has(model, cls, attr=None):
    return any(isinstance(m, cls) and (attr is None or getattr(m, attr)) for m in unwrap_model(model).modules())


def _info_missing(kinds, attach):
    return _finding('missing_callback', 'info', '', f"no evidence for {kinds}: the callback that logs it was not "
                    "attached to the last fit.", f"attach `{attach}` (e.g. `learn.add_cb({attach})`) and fit again")


def diagnose(learn, new_df=None, thresholds=None):
    """One row per finding about the last fit: `kind`, `severity` (`warn`, `info`, `ok`), `where` (a layer, a
    feature, or '' for the model), `evidence` (the measured numbers) and `advice` (what to do, with code).
    Kinds: `lr_too_high`, `lr_too_low`, `stale_bn_stats`, `dropout_too_strong`, `dead_layer`, `data_shift`
    (given `new_df`), `worse_than_baseline`, `batch_size` (info), `healthy` (ok, when nothing warns) and
    `missing_callback` (info, naming the callback a kind needs). `thresholds` overrides entries of
    `THRESHOLDS`. Call it right after the fit: `learn.validate()`/`get_preds()` reset fastai's Recorder."""
    th = {**THRESHOLDS, **(thresholds or {})}
    unknown = set(th) - set(THRESHOLDS)
    if unknown: raise ValueError(f"unknown thresholds {sorted(unknown)}; the thresholds are {sorted(THRESHOLDS)}")
    if not getattr(learn.recorder, 'losses', None):
        raise ValueError("diagnose reads the last fit from fastai's Recorder, which holds no training batch: fit "
                         "first, and call diagnose before learn.validate()/get_preds() (they reset it)")
    rows = []
    mom = _cb_df(learn, MomentumLogger)
    mom = _last_epoch(mom) if mom is not None else None
    diverged = not np.isfinite(_train_losses(learn)).all()  # then gradient norms say nothing about dead layers
    too_low = _lr_too_low(learn, mom, th) if mom is not None and not diverged else None
    rows += [_lr_too_high(learn, mom, th, too_low is not None), too_low]
    if mom is not None: rows.append(None if diverged else _dead_layer(mom, th))
    else: rows.append(_info_missing('lr_too_low, dead_layer and the momentum half of lr_too_high', 'MomentumLogger()'))
    if _has(learn.model, nn.modules.batchnorm._BatchNorm):
        pdf = _cb_df(learn, BNDrift, 'precise_df')
        if pdf is not None: rows.append(_stale_bn(pdf, th))
        elif _cb_df(learn, PreciseBNCallback) is None:
            rows.append(_info_missing('stale_bn_stats', 'BNDrift(precise_every=1)'))
    if _has(learn.model, nn.modules.dropout._DropoutNd, 'p') or _cb_df(learn, DropoutSchedule) is not None:
        ddf = _cb_df(learn, DropoutSchedule)
        if ddf is not None: rows.append(_dropout_too_strong(learn, ddf, th))
        else: rows.append(_info_missing('dropout_too_strong', 'DropoutSchedule(...)'))
    if new_df is not None: rows += _data_shift(learn, new_df)
    rows.append(_worse_than_baseline(learn, th))
    rows.append(_batch_size(learn, th))
    rows = [r for r in rows if r is not None]
    if not any(r['severity'] == 'warn' for r in rows):
        valid = _epoch_value(learn, 'valid_loss')
        rows.insert(0, _finding('healthy', 'ok', '', f"no check fired on the last fit ({len(learn.recorder.losses)} "
                                f"steps, validation loss {_fmt(valid) if valid is not None else 'n/a'}).",
                                "nothing to fix"))
    order = {'warn': 0, 'ok': 1, 'info': 2}
    return pd.DataFrame(sorted(rows, key=lambda r: order[r['severity']]), columns=COLUMNS)

patch_to(Learner, nm='diagnose')(diagnose)


# ---------------------------------------------------------------------------------------------
# Rendering

_MARK = {'warn': '!!', 'info': 'i ', 'ok': 'ok'}


def findings_lines(findings):
    "The findings as terminal lines: one headline per finding, then its evidence and advice indented."
    lines = ['Findings:']
    for r in findings.itertuples():
        lines.append(f"  [{_MARK.get(r.severity, r.severity)}] {r.kind}" + (f" ({r.where})" if r.where else ''))
        lines += [f"       {r.evidence}", f"       -> {r.advice}"]
    return lines


def findings_html(findings, figures=None):
    """The findings as an HTML section headed "Findings": a table of kind, where, evidence and advice, each row
    coloured by severity, and after it the `figures` (a dict kind -> image file name) that show the evidence."""
    color = {'warn': '#fde2e1', 'info': '#eef3fb', 'ok': '#e3f6e5'}
    rows = ''.join(f'<tr style="background:{color.get(r.severity, "#fff")}"><td>{html.escape(r.severity)}</td>'
                   f'<td><b>{html.escape(r.kind)}</b></td><td>{html.escape(r.where)}</td>'
                   f'<td>{html.escape(r.evidence)}</td><td>{html.escape(r.advice)}</td></tr>'
                   for r in findings.itertuples())
    table = ('<table class="findings" style="border-collapse:collapse;text-align:left"><tr><th>severity</th>'
             f'<th>kind</th><th>where</th><th>evidence</th><th>advice</th></tr>{rows}</table>')
    imgs = ''.join(f'<img src="{html.escape(name)}" alt="{html.escape(kind)}">' for kind, name in (figures or {}).items())
    return f'<h2>Findings</h2>{table}{imgs}'


def _axes(title):
    fig = Figure(figsize=(6, 3.2), layout='constrained')
    ax = fig.subplots()
    ax.set_title(title)
    return fig, ax


def plot_finding(learn, finding, new_df=None, thresholds=None):
    """A `Figure` with the curve behind `finding` (a row of `diagnose`'s frame) and its threshold drawn on it,
    or None for a kind a picture does not help (`batch_size`, `healthy`, `missing_callback`)."""
    th = {**THRESHOLDS, **(thresholds or {})}
    kind, where = finding['kind'], finding['where']
    if kind == 'lr_too_low':
        mom = find_cb(learn, MomentumLogger).df
        fig, ax = _axes('lr_too_low: update/param ratio per layer')
        for layer, g in mom.groupby('layer', sort=False): ax.plot(g['step'], g['update_ratio'], lw=.8, label=str(layer))
        ax.axhline(1e-3, c='k', lw=1, label='the usual ~1e-3')
        ax.axhline(th['low_ratio'], ls='--', c='r', label='threshold')
        ax.set_yscale('log'); ax.set_xlabel('step')
    elif kind in ('lr_too_high', 'worse_than_baseline'):
        losses = _train_losses(learn)
        fig, ax = _axes(f'{kind}: training loss')
        ax.plot(np.arange(1, len(losses) + 1), losses, label='training loss (smoothed)')
        if kind == 'lr_too_high':
            ax.axhline(th['rise'] * np.nanmin(losses), ls='--', c='r', label=f"{th['rise']}x its minimum")
        else:
            ax.axhline(th['baseline'] * baseline_loss(learn)[0], ls='--', c='r', label=f"{th['baseline']}x constant predictor")
            valid = _epoch_value(learn, 'valid_loss')
            if valid is not None: ax.axhline(valid, c='k', lw=1, label='validation loss')
        ax.set_xlabel('batch')
    elif kind == 'stale_bn_stats':
        pdf = find_cb(learn, BNDrift).precise_df.groupby('epoch')[['valid_loss', 'valid_loss_precise']].first()
        fig, ax = _axes('stale_bn_stats: validation loss')
        ax.plot(pdf.index, pdf['valid_loss'], 'o-', label='running statistics')
        ax.plot(pdf.index, pdf['valid_loss_precise'], 's-', label='population statistics')
        ax.plot(pdf.index, (1 - th['bn_gain']) * pdf['valid_loss'], 'r--', label='threshold')
        ax.set_xlabel('epoch')
    elif kind == 'dropout_too_strong':
        ddf = find_cb(learn, DropoutSchedule).df
        fig, ax = _axes('dropout_too_strong: p per layer')
        for layer, g in ddf.groupby('layer', sort=False): ax.plot(g['step'], g['p'], label=str(layer))
        ax.axhline(th['high_p'], ls='--', c='r', label='threshold'); ax.set_xlabel('step')
    elif kind == 'dead_layer':
        mom = find_cb(learn, MomentumLogger).df
        fig, ax = _axes('dead_layer: gradient norm per layer')
        for layer, g in mom.groupby('layer', sort=False):
            ax.plot(g['step'], g['grad_norm'].clip(lower=1e-12), lw=2 if layer == where else .7, label=str(layer))
        gmax, _ = _live_layers(_last_epoch(mom), th)
        ax.axhline(th['dead_rel'] * float(gmax[gmax > 0].median()), ls='--', c='r', label='threshold')
        ax.set_yscale('log'); ax.set_xlabel('step')
    elif kind == 'data_shift' and new_df is not None:
        from .batchnorm import bn_shift
        shift = bn_shift(learn, new_df)
        fig, ax = _axes('data_shift: |z| per feature')
        ax.bar(shift['feature'], shift['z'].abs(), color=['r' if s else 'C0' for s in shift['shifted']])
        ax.axhline(3., ls='--', c='r', label='bn_shift threshold'); ax.set_yscale('log')
        ax.tick_params(axis='x', rotation=45)
    else: return None
    ax.legend(fontsize='x-small', ncols=2)
    return fig


def findings_section(learn, out, new_df=None):
    """The report's opening section: `diagnose(learn, new_df)` as HTML with a PNG per finding that a picture
    helps (written into the folder `out`), and the frame itself as `out/findings.csv`. Returns `(html, findings)`."""
    try: findings = diagnose(learn, new_df)
    except ValueError as e:  # nothing to diagnose (no fit, or its history reset): say so where the findings go
        pd.DataFrame(columns=COLUMNS).to_csv(f'{out}/findings.csv', index=False)
        return f'<h2>Findings</h2><p>{html.escape(str(e))}</p>', pd.DataFrame(columns=COLUMNS)
    findings.to_csv(f'{out}/findings.csv', index=False)
    figures = {}
    for i, r in findings.iterrows():
        fig = plot_finding(learn, r, new_df)
        if fig is None: continue
        name = f"finding_{i}_{r['kind']}.png"
        fig.savefig(f'{out}/{name}', dpi=90)
        figures[f"{r['kind']} {r['where']}".strip()] = name
    return findings_html(findings, figures), findings
