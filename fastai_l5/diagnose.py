"""Diagnosis: turn what the callbacks logged into findings a user can act on. `diagnose(learn)` reads
`MomentumLogger`, `DropoutSchedule`, `BNDrift`/`PreciseBNCallback` and fastai's `Recorder` from the last fit
(and `bn_shift` given new data) and returns one row per finding: `kind`, `severity`, `where`, `evidence`
(the measured numbers), `advice` (what to do, with code). Every threshold lives in `THRESHOLDS`."""
from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd
import torch
from fastai.learner import Learner
from fastcore.basics import patch_to
from matplotlib.figure import Figure

from .audit import audit_findings, rank_auc
from .batchnorm import BNDrift
from .core import find_cb, unwrap_model
from .counterfactual import Sandbox, effect_text, peak_lr
from .dropout import DROPOUT_TYPES, DropoutSchedule, dropout_layers
from .momentum import MomentumLogger
from .precise import BN_TYPES, batch_to_device, bn_layers, model_device, preserved_rng, split_batch

__all__ = ['THRESHOLDS', 'diagnose', 'grad_noise_scale', 'baseline_loss', 'findings_lines', 'findings_html',
           'plot_finding', 'findings_section', 'actionable']

COLUMNS = ['kind', 'severity', 'where', 'evidence', 'advice', 'effect']

# Every threshold of the diagnosis, with the evidence behind it (measured on diamonds and flights, 4,000-8,000
# rows, layers [64, 32], adam() and sgd_momentum(), fit_one_cycle; nbs/07_diagnose.ipynb states them in prose).
THRESHOLDS = dict(
    # lr_too_high, three ways. A non-finite loss is divergence. Or the smoothed training loss ends >= `rise` x
    # its minimum in the fit (healthy runs end at their minimum) and either >= `explode` x where it started or
    # while momentum and gradient fight over the last epoch: mean cos(m_{t-1}, g) < `fight_cos` or mean sign_flip >
    # `fight_flip` (re-derived when MomentumLogger moved to the momentum before the step, on tests/diagnose_suite.py's
    # data: healthy fits cos 0.09-0.25, flip 0.32-0.41; lr 300x lr_find's valley, loss 2.6-8.9x its minimum: cos
    # -0.15-0.08, flip 0.36-0.45). Or, after >= `few_steps` steps, it ends above its first
    # value while the validation loss is >= `worse` x a constant predictor's (lr 1000x too high: 2.1-50x; the
    # same nets after one step, 1.07-1.33x) and lr_too_low does not hold: the steps made the model worse.
    # The rising-loss rules need the loss to end >= `rise_floor` x a constant predictor's validation loss: below it the
    # fit is near exact and a rise costs nothing (the report's linear skip started at an exact ridge fit on a leaked
    # target: Caschool's loss rose 376x, from 3e-8 to 1e-5 of the constant's ~1; Fatalities' from 8e-4 to 1.6e-3).
    rise=1.5, explode=2., fight_cos=0.05, fight_flip=0.45, worse=1.5, rise_floor=0.01,
    # lr_too_low, measured: a candidate when the median update/param ratio of the live layers over the last epoch is
    # below `low_ratio` (healthy fits at lr_find's valley: 2.9e-4..1.1e-3 on the suite, tests/diagnose_suite.py; lr
    # 30x below it 2.3e-5..1.3e-4, 100x below 1.1e-5..5.4e-5); then `cf_steps` steps from the final weights on a copy
    # on one cycle up to 10x, 100x and 1000x the peak lr, against the same steps up to the peak lr: a warning when
    # one lowers the validation loss by >= `lr_gain`, the smallest such raise being the advice (lr 30-100x too low,
    # both suites: 11-65%, 34 of 36 >= 15%; healthy runs, measured without the gate: -28%..+12%, and a healthy sgd fit
    # just under the gate, 12%). 8 steps at a constant lr missed a quarter of the low-lr runs on the holdout data
    # (-5%..+2%). Without MomentumLogger the counterfactual alone decides, at `lr_gain_alone`.
    low_ratio=2e-4, lr_gain=0.15, lr_gain_alone=0.2, cf_steps=32,
    # stale_bn_stats, measured: a copy's BN running statistics replaced by the population statistics over up to
    # `pop_batches` training batches lowers the validation loss by >= `bn_gain` (healthy 4-epoch fits: -3%..+6%; BN
    # momentum 0.01-0.03 on 1-2 epoch fits that cost >= 1.1x: 12-51%).
    bn_gain=0.1, pop_batches=16,
    # dropout_too_strong, measured: some layer's p >= `high_p` (the p of the modules, or the last epoch's logged by
    # DropoutSchedule); `drop_steps` steps on a copy with every dropout at `advised_p` against the same steps at the
    # current p's, both on a one-cycle schedule peaking at the fit's peak lr (each arm ends annealed): a warning when
    # the validation loss is >= `drop_gain` lower. On tests/diagnose_suite.py: p 0.5-0.7 that cost >= 1.1x, 4-25%
    # (17-18 of 20 above 6%); the 4 runs it did not hurt (noisy labels), 1-5.7%. 32 steps at a constant peak lr were
    # too noisy to separate them (1-18% against 1-5%).
    high_p=0.5, advised_p=0.1, drop_gain=0.06, drop_steps=64,
    # dead_layer: the largest gradient norm a layer got in the last epoch <= `dead_rel` x the median layer's
    # (healthy layers sit within 3 orders of each other; a layer no gradient reaches has exactly 0).
    dead_rel=1e-6,
    # worse_than_baseline: the validation loss >= `baseline` x a constant predictor's (the training mean, or the
    # class frequencies): within 5% of a constant the model has learned nothing usable. Fewer than `few_steps`
    # optimizer steps in the fit is named as the likely cause.
    baseline=0.95, few_steps=20,
    # batch_size (info): B_simple from `noise_pairs` training batches, each cut into `noise_split` chunks whose
    # gradients give |G|^2 and tr(Sigma) (their mean and spread), with a jackknife interval over the batches; the batch
    # is called too large above `bs_factor` x the interval's top, too small below 1/`bs_factor` x its bottom.
    noise_pairs=8, noise_split=4, bs_factor=4.,
    # worse_than_baseline: also needs the task metric (accuracy) no better than the majority class's by more than
    # `acc_margin` binomial standard errors of the validation accuracy; with two classes, also not when the model's
    # ROC AUC on the validation rows beats chance (0.5) by `acc_margin` of its standard error under chance,
    # √((n₊ + n₋ + 1)/(12·n₊·n₋)) (Mann-Whitney): it ranks usefully, its probabilities are miscalibrated (AER HMDA,
    # 12% denials, valley lr: cross-entropy 1.06-1.3x the constant's with accuracy at the majority's).
    acc_margin=2.,
)


def _finding(kind, severity, where, evidence, advice, effect=''):
    return dict(kind=kind, severity=severity, where=where, evidence=evidence, advice=advice, effect=effect)


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
    """Divergence (a non-finite loss) always; the rising-loss rules only when the fit is not near exact
    (`rise_floor`) and `too_low` (lr_too_low's counterfactual found a higher lr measurably better) is False."""
    losses = _train_losses(learn)
    lr, n = peak_lr(learn), _fit_epochs(learn)
    advice = (f"lower the learning rate tenfold, e.g. `learn.fit_one_cycle({n}, {_fmt(lr / 10)})`, "
              "or pick one with `learn.lr_find()`")
    valid = _epoch_value(learn, 'valid_loss')
    if not np.isfinite(losses).all() or (valid is not None and not math.isfinite(valid)):
        bad = int(np.argmax(~np.isfinite(losses))) + 1 if not np.isfinite(losses).all() else len(losses)
        return _finding('lr_too_high', 'warn', '', f"the loss diverged: it became non-finite at batch {bad} of "
                        f"{len(losses)} with the lr peaking at {_fmt(lr)}.", advice)
    if too_low: return None  # a copy measurably better at a higher lr: the lr is not too high, whatever the telemetry
    first, lo, last = float(losses[0]), float(losses.min()), float(losses[-1])
    rose = f"the training loss rose to {_fmt(last)}, {_fmt(last / lo)}x its minimum {_fmt(lo)}"
    # a near-exact fit (a linear skip started at an exact ridge solution) can double a tiny loss: no cost to name
    base = baseline_loss(learn)[0]
    material = last >= th['rise_floor'] * base
    if material and last >= th['rise'] * lo and last >= th['explode'] * first:
        return _finding('lr_too_high', 'warn', '', f"{rose} and {_fmt(last / first)}x its first value {_fmt(first)}: "
                        f"it exploded at a peak lr of {_fmt(lr)}.", advice)
    if material and last >= th['rise'] * lo and mom is not None:
        cos, flip = float(mom['cos_mom_grad'].mean()), float(mom['sign_flip'].mean())
        if cos < th['fight_cos'] or flip > th['fight_flip']:
            return _finding('lr_too_high', 'warn', '', f"{rose}, while momentum and gradient fought over the last "
                            f"epoch (mean cos_mom_grad {cos:.3f}, mean sign_flip {flip:.3f}) at a peak lr of {_fmt(lr)}.",
                            advice)
    if last < first or len(losses) < th['few_steps'] or valid is None: return None
    if valid < th['worse'] * base: return None
    return _finding('lr_too_high', 'warn', '', f"after {len(losses)} steps the training loss ended at {_fmt(last)}, above "
                    f"its first value {_fmt(first)}, and the validation loss {_fmt(valid)} is {_fmt(valid / base)}x a "
                    f"constant predictor's {_fmt(base)}: at a peak lr of {_fmt(lr)} the steps made the model worse.", advice)


def _live_layers(mom, th):
    "Per layer over the last epoch: the largest gradient norm, and whether it is dead (see `dead_rel`)."
    gmax = mom.groupby('layer', sort=False)['grad_norm'].max()
    ref = float(gmax[gmax > 0].median()) if (gmax > 0).any() else 0.
    return gmax, gmax <= th['dead_rel'] * ref


def _update_ratio(mom, th):
    "The median over live layers of each layer's median update/param ratio in the last epoch (NaN when none)."
    gmax, dead = _live_layers(mom, th)
    ratios = mom[mom['layer'].isin(gmax.index[~dead])].groupby('layer')['update_ratio'].median().dropna()
    return float(ratios.median()) if len(ratios) else float('nan')


def _lr_too_low(learn, mom, th, box):
    """A candidate when the update/param ratio is below `low_ratio` (without MomentumLogger: always); then measured:
    `cf_steps` steps from the final weights on a copy, on one cycle up to 10x, 100x and 1000x the peak lr, against
    the same steps up to the peak lr. The advice is the smallest raise that clears the bar."""
    ratio = _update_ratio(mom, th) if mom is not None else float('nan')
    if mom is not None and not ratio < th['low_ratio']: return None
    lr, n = peak_lr(learn), _fit_epochs(learn)
    steps = th['cf_steps']
    at_lr = box.continued(lr=lr, steps=steps, one_cycle=True)
    tried = {f: box.continued(lr=lr * f, steps=steps, one_cycle=True) for f in (10, 100, 1000)}
    gains = {f: 1 - v / at_lr for f, v in tried.items() if math.isfinite(v)}
    if not (math.isfinite(at_lr) and gains): return None
    need = th['lr_gain'] if mom is not None else th['lr_gain_alone']
    # the smallest raise that clears the bar: a copy's short cycle tolerates a higher lr than a whole fit would
    factor = min([f for f, g in gains.items() if g >= need] or [max(gains, key=gains.get)])
    best, gain = tried[factor], gains[factor]
    why = (f"the median update/param ratio over the last epoch was {ratio:.2e} (healthy fits: ~3e-4 to 1e-3); "
           if mom is not None else '')
    ev = (f"{why}{steps} more steps from the final weights on a copy, one cycle up to {_fmt(lr * factor)} ({factor}x the "
          f"peak lr {_fmt(lr)}), give a validation loss of {_fmt(best)} against {_fmt(at_lr)} up to the peak lr "
          f"({100 * gain:.0f}% lower")
    eff = effect_text(at_lr, best)
    if gain < need:
        if mom is None: return None
        return _finding('lr_too_low', 'info', '', ev + f", under the {100 * need:.0f}% that would make it a warning): the "
                        "updates are small, but a higher lr does not measurably help.", "nothing to change on this evidence", eff)
    return _finding('lr_too_low', 'warn', '', ev + ").", f"raise the learning rate, e.g. `learn.fit_one_cycle({n}, "
                    f"{_fmt(lr * factor)})`, or pick one with `learn.lr_find()`", eff)


def _bn_momenta(learn):
    return [m.momentum for _, m in bn_layers(learn.model)]


def _stale_bn(learn, th, box):
    """Measured on a copy: its BN running statistics replaced by the population statistics over up to `pop_batches`
    training batches (`precise_bn`'s pass), against the running ones, on the same validation rows. Returns
    `(finding or None, population-statistics loss)`."""
    run, pop = box.baseline, box.population(th['pop_batches'])
    if not (math.isfinite(run) and math.isfinite(pop)) or pop > (1 - th['bn_gain']) * run: return None, pop
    pdf = _cb_df(learn, BNDrift, 'precise_df')
    where, gap = '', ''
    if pdf is not None:
        last = pdf[pdf['epoch'] == pdf['epoch'].max()]
        worst = last.loc[last['mean_gap'].idxmax()]
        where, gap = str(worst['layer']), f"; {worst['layer']} had the largest mean_gap, {worst['mean_gap']:.3g}"
    low = sorted({m for m in _bn_momenta(learn) if m is not None and m < 0.1})
    mom_txt = (f", or raise BN's momentum from {', '.join(map(_fmt, low))} to 0.1 (`m.momentum = 0.1` for each "
               "BatchNorm)") if low else ''
    return _finding('stale_bn_stats', 'warn', where,
                    f"the validation loss was {_fmt(run)} with BN's running statistics and {_fmt(pop)} with "
                    f"population statistics ({100 * (1 - pop / run):.0f}% lower, measured on a copy){gap}.",
                    "refresh the statistics with `learn.precise_bn()` before `learn.export()`, attach "
                    f"`PreciseBNCallback()`{mom_txt}", effect_text(run, pop)), pop


def _dropout_ps(learn, ddf):
    "Each dropout layer's p: the last epoch's mean from DropoutSchedule's log, else the module's own p."
    ps = {name: float(m.p) for name, m in dropout_layers(learn.model).items()}
    if ddf is not None: ps.update(_last_epoch(ddf).groupby('layer', sort=False)['p'].mean().astype(float).to_dict())
    return ps


def _dropout_too_strong(learn, ddf, th, box):
    """A candidate when some layer's p >= `high_p`; measured: `drop_steps` steps on a copy (one cycle up to the peak
    lr) with every dropout at most `advised_p`, against the same steps with the p's as they are. Names every strong
    layer."""
    ps = _dropout_ps(learn, ddf)
    strong = {k: p for k, p in ps.items() if p >= th['high_p']}
    if not strong: return None
    lr, steps, adv = peak_lr(learn), th['drop_steps'], th['advised_p']
    as_is = box.continued(lr=lr, ps=ps, steps=steps, one_cycle=True)
    lower = box.continued(lr=lr, ps={k: min(p, adv) for k, p in ps.items()}, steps=steps, one_cycle=True)
    if not (math.isfinite(as_is) and math.isfinite(lower)): return None
    gain = 1 - lower / as_is
    where = ', '.join(strong)
    ev = (f"{where} dropped with p {', '.join(f'{p:.2f}' for p in strong.values())}; {steps} more steps on a copy "
          f"(one cycle up to the peak lr {_fmt(lr)}) give a validation loss of {_fmt(lower)} with p={adv} against {_fmt(as_is)} "
          f"with the p's as they are ({100 * gain:.1f}% lower")
    eff = effect_text(as_is, lower)
    if gain < th['drop_gain']:
        return _finding('dropout_too_strong', 'info', where, ev + f", under the {100 * th['drop_gain']:.0f}% that would "
                        "make it a warning): this dropout does no measurable harm.", "nothing to change on this evidence", eff)
    emb = [k for k in strong if 'emb' in k]
    hidden = [k for k in strong if k not in emb]
    code = ('`tabular_config(' + ', '.join(([f'ps={adv}'] if hidden else []) + ([f'embed_p={adv}'] if emb else [])) + ')`')
    sched = ', '.join(f"'{k}': early_dropout({adv})" for k in strong)
    return _finding('dropout_too_strong', 'warn', where, ev + "): the dropout holds the model back.",
                    f"lower p on {where} (e.g. {code}) or drop only early: `DropoutSchedule({{{sched}}})`", eff)


def _train_batches(learn, n):
    "The first `n` (inputs, targets) batches of the training loader, on the model's device (`precise`'s batch helpers)."
    device = model_device(learn)
    return [split_batch(learn, batch_to_device(b, device)) for _, b in zip(range(n), learn.dls.train)]


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


def _labelled(learn, df):
    names = list(getattr(learn.dls, 'y_names', []) or [])
    return bool(names) and all(n in df.columns and df[n].notna().all() for n in names)


def _new_data_loss(learn, df):
    "The validation-style loss of the user's model on labelled new data (NaN when that fails)."
    from .precise import valid_loss
    try:
        dl = learn.dls.test_dl(df, with_labels=True)
        with preserved_rng(dl): return valid_loss(learn, dl)
    except Exception: return float('nan')


def _data_shift(learn, new_df):
    """`shift_table`'s flagged features, strongest first; with labels in `new_df`, the loss there against the
    validation loss is the measured effect (on every row: it is the data's, not a feature's)."""
    from .shift import shift_table
    table = shift_table(learn, new_df)
    hits = table[table['shifted']].sort_values('stat', ascending=False) if len(table) else table
    if not len(hits): return []
    eff = ''
    if _labelled(learn, new_df):
        valid = _epoch_value(learn, 'valid_loss')
        eff = effect_text(valid, _new_data_loss(learn, new_df), 'loss valid -> new data') if valid is not None else ''
    return [_finding('data_shift', 'warn', str(r.feature), r.evidence,
                     f"check how `{r.feature}` is produced for the new rows (units, encoding, pipeline, the mix of "
                     "sources); if the world really moved, retrain on data that includes such rows", eff)
            for r in hits.itertuples()]


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


def _valid_auc(learn, box):
    """With two classes: the model's ROC AUC on the sandbox's validation rows (eval mode, the second class's
    probability as the score) and how many standard errors under chance it sits above 0.5; else NaNs."""
    if box is None or int(learn.dls.c) != 2 or not box.valid: return float('nan'), float('nan')
    out, targ = box.outputs(learn.model)
    score, truth = out.softmax(-1)[:, 1].cpu().numpy(), targ.cpu().numpy() == 1
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if not n_pos or not n_neg: return float('nan'), float('nan')
    auc = rank_auc(score, truth)
    return auc, (auc - 0.5) / math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg))


def _worse_than_baseline(learn, th, stale=None, pop=float('nan'), box=None):
    """The validation loss within `baseline` of a constant predictor's, judged with the task metric too: a model whose
    accuracy beats the majority class's by more than `acc_margin` standard errors is not "no better than a constant"
    (its loss is badly calibrated: an info). When stale BN statistics explain the loss (with population statistics it
    beats the constant), the row says so and is an info: the cause is the `stale_bn_stats` row."""
    valid = _epoch_value(learn, 'valid_loss')
    if valid is None or not math.isfinite(valid): return None
    base, base_acc = baseline_loss(learn)
    if valid < th['baseline'] * base: return None
    n_steps = len(learn.recorder.losses)
    acc = _epoch_value(learn, 'accuracy')
    acc_txt = f" (accuracy {acc:.3f} against the majority class's {base_acc:.3f})" if acc is not None and base_acc is not None else ''
    what = 'the class frequencies' if base_acc is not None else 'the training mean'
    if stale is not None and math.isfinite(pop) and pop < th['baseline'] * base:
        return _finding('worse_than_baseline', 'info', '', f"the validation loss {_fmt(valid)} is no better than the "
                        f"{_fmt(base)} of a constant predictor ({what}){acc_txt}, but with population BN statistics it "
                        f"is {_fmt(pop)}: stale BN statistics explain it (see stale_bn_stats).",
                        "refresh BN's statistics with `learn.precise_bn()` (the stale_bn_stats row)", effect_text(valid, pop))
    if acc is not None and base_acc is not None:
        se = math.sqrt(max(base_acc * (1 - base_acc), 1e-12) / max(len(learn.dls.valid_ds), 1))
        if acc > base_acc + th['acc_margin'] * se:
            return _finding('worse_than_baseline', 'info', '', f"the validation loss {_fmt(valid)} is no better than the "
                            f"{_fmt(base)} of a constant predictor ({what}), yet the accuracy {acc:.3f} beats the "
                            f"majority class's {base_acc:.3f} by {(acc - base_acc) / se:.1f} standard errors: the model "
                            "ranks the classes usefully but its probabilities are badly calibrated.",
                            "nothing to change for accuracy; for calibrated probabilities train longer or at a lower lr")
    auc, auc_z = _valid_auc(learn, box) if base_acc is not None else (float('nan'), float('nan'))
    if auc_z > th['acc_margin']:
        return _finding('worse_than_baseline', 'info', '', f"the validation loss {_fmt(valid)} is no better than the "
                        f"{_fmt(base)} of a constant predictor ({what}){acc_txt}, yet the model ranks the validation "
                        f"rows with ROC AUC {auc:.3f}, {auc_z:.1f} standard errors above chance (0.5): it learned "
                        "something usable, and its probabilities are badly calibrated.",
                        "for a better loss or accuracy train longer or at a lower lr; for decisions, choose the "
                        "threshold on the predicted probability instead of taking the most likely class")
    cause = (f"; the fit ran only {n_steps} optimizer steps, a handful of batches" if n_steps < th['few_steps']
             else f" after {n_steps} optimizer steps")
    n_train = len(learn.dls.train_ds)
    small_bs = max(16, 2 ** int(math.log2(max(n_train / 50, 1))))  # ~50 steps an epoch
    return _finding('worse_than_baseline', 'warn', '', f"the validation loss {_fmt(valid)} is no better than the "
                    f"{_fmt(base)} of a constant predictor ({what}){acc_txt}{cause}.",
                    f"train for more steps: a smaller batch (`bs={small_bs}` in the DataLoaders gives {n_train // small_bs} "
                    f"steps an epoch) or more epochs, and see the other findings")


# ---------------------------------------------------------------------------------------------
# Gradient noise scale

def _flat_grad(model, loss_func, xb, yb, params):
    model.zero_grad(set_to_none=True)
    loss_func(model(*xb), *yb).backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).double()


def grad_noise_scale(learn, n_pairs=8, split=8, batches=None):
    """The simple gradient noise scale B_simple = tr(Σ)/|G|² at the current weights (McCandlish et al. 2018,
    App. A), with G the true gradient and Σ the per-example gradient covariance: the batch size at which a batch
    gradient's noise is as large as its signal. Each of `n_pairs` training batches of B rows (the loader's) is cut
    into `split` chunks of b = B/split rows; their gradients g_1..g_split give the unbiased estimates
    tr(Σ) ≈ b·Σ‖g_i − ḡ‖²/(split − 1) and |G|² ≈ ‖ḡ‖² − tr(Σ)/B (ḡ is the batch's gradient), averaged over the
    batches. `b_low`, `b_high`: the interval tr(Σ)/(|G|² ± 2 SE), SE the standard error of |G|² over the batches
    (`b_high` is inf when |G|² − 2 SE ≤ 0: the noise may hide the mean).

    Runs on a copy of the model in eval mode: the estimator assumes a batch's gradient is the mean of independent
    per-example gradients, which holds with BN on its running statistics and no dropout. The user's model, its
    gradients and every RNG are untouched. `batches` (a list of `(xb, yb)`) replaces drawing from the loader.
    Returns a dict: `b_simple` (NaN when |G|² came out ≤ 0), `b_low`, `b_high`, `trace_sigma`, `g2`, `b_small`,
    `b_large`, `n_pairs`."""
    big = int(learn.dls.train.bs)
    small = max(1, big // split)
    big = small * split
    if batches is None:
        with preserved_rng(learn.dls.train, learn.dls.valid): batches = _train_batches(learn, n_pairs)
    from copy import deepcopy
    model = deepcopy(learn.model).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    g2s, trs = [], []
    with preserved_rng(learn.dls.train):
        for xb, yb in batches[:n_pairs]:
            if len(yb[0]) < big: continue
            gs = torch.stack([_flat_grad(model, learn.loss_func, tuple(x[i:i + small] for x in xb),
                                         tuple(y[i:i + small] for y in yb), params) for i in range(0, big, small)])
            mean = gs.mean(0)
            tr = float(small * (gs - mean).square().sum() / (split - 1))
            trs.append(tr); g2s.append(float(mean.square().sum()) - tr / big)
    if not g2s: raise ValueError(f"grad_noise_scale needs training batches of {big} rows; the loader has none")
    g2, tr = float(np.mean(g2s)), float(np.mean(trs))
    se = float(np.std(g2s, ddof=1) / math.sqrt(len(g2s))) if len(g2s) > 1 else abs(g2)
    hi_g2, lo_g2 = g2 + 2 * se, g2 - 2 * se
    return dict(b_simple=tr / g2 if g2 > 0 else float('nan'), b_low=tr / hi_g2 if hi_g2 > 0 else float('nan'),
                b_high=tr / lo_g2 if lo_g2 > 0 else float('inf'), trace_sigma=tr, g2=g2, b_small=small, b_large=big,
                n_pairs=len(g2s))


_NOT_ACTIONABLE = 'nothing to change'


def _pow2(x): return 2 ** int(round(math.log2(max(x, 1))))


def _batch_size(learn, th, box=None):
    """An info row. The advised batch lies in [8, a quarter of the training rows] and is never the one in use; the
    row is actionable (its advice does not start with 'nothing to change') only when the batch in use lies outside
    the measured interval by more than `bs_factor`."""
    est = grad_noise_scale(learn, th['noise_pairs'], th['noise_split'], batches=box.train if box is not None else None)
    bs, b, lo, hi = int(learn.dls.train.bs), est['b_simple'], est['b_low'], est['b_high']
    n_train = len(learn.dls.train_ds)
    top = max(8, n_train // 4)
    target = b if math.isfinite(b) else (lo if math.isfinite(lo) else bs)
    adv = min(max(_pow2(target), 8), top)
    if adv == bs: adv = bs * 2 if bs * 2 <= top else max(8, bs // 2)
    if adv == bs: adv = 8 if bs != 8 else 16
    rng = f"{_fmt(lo) if math.isfinite(lo) else '?'} to {_fmt(hi) if math.isfinite(hi) else 'beyond what this batch can resolve'}"
    what = (f"the batch size at which a step's gradient is as noisy as it is informative is about "
            f"{_fmt(b) if math.isfinite(b) else 'more than ' + _fmt(lo)} rows at the final weights (likely {rng}; "
            f"measured on {est['n_pairs']} batches of {est['b_large']}), against the {bs} in use.")
    if math.isfinite(hi) and bs > th['bs_factor'] * hi:
        advice = (f"a smaller batch, e.g. `bs={adv}` in the DataLoaders: most of each batch of {bs} averages away "
                  "noise that is already small, so more, smaller steps make more progress per row")
    elif math.isfinite(lo) and bs * th['bs_factor'] < lo:
        advice = (f"a larger batch, e.g. `bs={adv}` in the DataLoaders: the gradients of {bs} rows are mostly noise, "
                  "so fewer, larger steps make the same progress")
    else:
        advice = (f"{_NOT_ACTIONABLE}: the batch is within a factor {th['bs_factor']:g} of that range (another that "
                  f"would do, e.g. `bs={adv}`)")
    return _finding('batch_size', 'info', '', what, advice)


# ---------------------------------------------------------------------------------------------
# diagnose

def _has(model, cls, attr=None):
    return any(isinstance(m, cls) and (attr is None or getattr(m, attr)) for m in unwrap_model(model).modules())


def _info_missing(kinds, attach):
    return _finding('missing_callback', 'info', '', f"no evidence for {kinds}: the callback that logs it was not "
                    "attached to the last fit.", f"attach `{attach}` (e.g. `learn.add_cb({attach})`) and fit again")


# causes before symptoms: among warnings, a row earlier here explains those after it
_CAUSE_ORDER = ['target_leak', 'stale_bn_stats', 'lr_too_high', 'lr_too_low', 'dead_layer', 'dropout_too_strong',
                'data_shift', 'class_imbalance', 'worse_than_baseline', 'worse_than_linear', 'small_validation']


def diagnose(learn, new_df=None, thresholds=None):
    """One row per finding about the last fit: `kind`, `severity` (`warn`, `info`, `ok`), `where` (a layer, a
    feature, or '' for the model), `evidence` (the measured numbers), `advice` (what to do, with code) and `effect`
    (the validation loss measured with the advice applied to a copy of the learner, or '').
    Kinds: `lr_too_high`, `lr_too_low`, `stale_bn_stats`, `dropout_too_strong`, `dead_layer`, `data_shift`
    (given `new_df`), `worse_than_baseline`, `batch_size` (info), `healthy` (ok, when nothing warns) and
    `missing_callback` (info, naming the callback a kind needs and what to pass it). A candidate is a `warn` only
    when its counterfactual's effect is material (see `THRESHOLDS`), else an `info`. Warnings come causes first.
    `thresholds` overrides entries of `THRESHOLDS`. Call it right after the fit: `learn.validate()`/`get_preds()`
    reset fastai's Recorder. The learner is left as it was: weights, buffers, optimizer state, dropout p's, modes,
    gradients, callbacks, Recorder and random states."""
    th = {**THRESHOLDS, **(thresholds or {})}
    unknown = set(th) - set(THRESHOLDS)
    if unknown: raise ValueError(f"unknown thresholds {sorted(unknown)}; the thresholds are {sorted(THRESHOLDS)}")
    if not getattr(learn.recorder, 'losses', None):
        raise ValueError("diagnose reads the last fit from fastai's Recorder, which holds no training batch: fit "
                         "first, and call diagnose before learn.validate()/get_preds() (they reset it)")
    if new_df is not None and not isinstance(new_df, pd.DataFrame):
        raise ValueError(f"new_df must be a pandas DataFrame of new rows, got {type(new_df).__name__}")
    # training batches drawn once for every counterfactual; longer ones (dropout's) go round them again
    box = Sandbox(learn, k=max(th['cf_steps'], th['pop_batches'], th['noise_pairs'], 32))
    rows = []
    mom = _cb_df(learn, MomentumLogger)
    mom = _last_epoch(mom) if mom is not None else None
    diverged = not np.isfinite(_train_losses(learn)).all()  # then gradient norms say nothing about dead layers
    too_low = _lr_too_low(learn, mom, th, box) if not diverged else None
    rows += [_lr_too_high(learn, mom, th, too_low is not None and too_low['severity'] == 'warn'), too_low]
    if mom is not None: rows.append(None if diverged else _dead_layer(mom, th))
    else: rows.append(_info_missing('dead_layer and the momentum half of lr_too_high', 'MomentumLogger()'))
    stale, pop = None, float('nan')
    if _has(learn.model, BN_TYPES) and not diverged:
        stale, pop = _stale_bn(learn, th, box)
        rows.append(stale)
        drift = find_cb(learn, BNDrift)
        if drift is not None and not getattr(drift, 'precise_every', None):
            rows.append(_finding('missing_callback', 'info', '', "BNDrift is attached without `precise_every`, so the "
                                 "per-epoch validation loss with population statistics (the history behind "
                                 "stale_bn_stats and its plot) was not logged.",
                                 "pass precise_every=1 to the BNDrift you attach: `BNDrift(precise_every=1)`"))
    schedule = _cb_df(learn, DropoutSchedule)
    if (_has(learn.model, DROPOUT_TYPES, 'p') or schedule is not None) and not diverged:
        rows.append(_dropout_too_strong(learn, schedule, th, box))
    if new_df is not None: rows += _data_shift(learn, new_df)
    rows.append(_worse_than_baseline(learn, th, stale, pop, box))
    if not diverged: rows.append(_batch_size(learn, th, box))
    rows += audit_findings(learn, box=box)  # issue 23: target_leak, worse_than_linear, class_imbalance, small_validation
    rows = [r for r in rows if r is not None]
    if not any(r['severity'] == 'warn' for r in rows):
        valid = _epoch_value(learn, 'valid_loss')
        rows.insert(0, _finding('healthy', 'ok', '', f"no check fired on the last fit ({len(learn.recorder.losses)} "
                                f"steps, validation loss {_fmt(valid) if valid is not None else 'n/a'}).",
                                "nothing to fix"))
    order = {'warn': 0, 'ok': 1, 'info': 2}
    rank = {k: i for i, k in enumerate(_CAUSE_ORDER)}
    rows = sorted(rows, key=lambda r: (order[r['severity']], rank.get(r['kind'], len(rank)) if r['severity'] == 'warn' else 0))
    return pd.DataFrame(rows, columns=COLUMNS)

patch_to(Learner, nm='diagnose')(diagnose)


# ---------------------------------------------------------------------------------------------
# Rendering

_MARK = {'warn': '!!', 'info': 'i ', 'ok': 'ok'}


def actionable(findings):
    "A boolean mask of the rows worth showing a user: every warn and ok row, and info rows whose advice is an action."
    return (findings['severity'] != 'info') | ~findings['advice'].astype(str).str.startswith(_NOT_ACTIONABLE)


def findings_lines(findings, all_rows=False):
    """The findings as terminal lines: one headline per finding, then its evidence, measured effect and advice
    indented. Info rows with nothing to act on are left out unless `all_rows` (the frame keeps them)."""
    lines = ['Findings:']
    shown = findings if all_rows or not len(findings) else findings[actionable(findings)]
    for r in shown.itertuples():
        lines.append(f"  [{_MARK.get(r.severity, r.severity)}] {r.kind}" + (f" ({r.where})" if r.where else ''))
        lines.append(f"       {r.evidence}")
        effect = getattr(r, 'effect', '')
        if isinstance(effect, str) and effect: lines.append(f"       measured: {effect}")
        lines.append(f"       -> {r.advice}")
    return lines


def findings_html(findings, figures=None):
    """The findings as an HTML section headed "Findings": a table of kind, where, evidence, advice and the measured
    effect, each row coloured by severity, and after it the `figures` (a dict kind -> image file name) that show the
    evidence."""
    color = {'warn': '#fde2e1', 'info': '#eef3fb', 'ok': '#e3f6e5'}
    eff = lambda r: getattr(r, 'effect', '') if isinstance(getattr(r, 'effect', ''), str) else ''
    rows = ''.join(f'<tr style="background:{color.get(r.severity, "#fff")}"><td>{html.escape(r.severity)}</td>'
                   f'<td><b>{html.escape(r.kind)}</b></td><td>{html.escape(r.where)}</td>'
                   f'<td>{html.escape(r.evidence)}</td><td>{html.escape(r.advice)}</td><td>{html.escape(eff(r))}</td></tr>'
                   for r in findings.itertuples())
    table = ('<table class="findings" style="border-collapse:collapse;text-align:left"><tr><th>severity</th>'
             f'<th>kind</th><th>where</th><th>evidence</th><th>advice</th><th>effect</th></tr>{rows}</table>')
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
    elif kind == 'stale_bn_stats' and _cb_df(learn, BNDrift, 'precise_df') is not None:
        pdf = find_cb(learn, BNDrift).precise_df.groupby('epoch')[['valid_loss', 'valid_loss_precise']].first()
        fig, ax = _axes('stale_bn_stats: validation loss')
        ax.plot(pdf.index, pdf['valid_loss'], 'o-', label='running statistics')
        ax.plot(pdf.index, pdf['valid_loss_precise'], 's-', label='population statistics')
        ax.plot(pdf.index, (1 - th['bn_gain']) * pdf['valid_loss'], 'r--', label='threshold')
        ax.set_xlabel('epoch')
    elif kind == 'dropout_too_strong' and _cb_df(learn, DropoutSchedule) is not None:
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
        from .shift import shift_table
        shift = shift_table(learn, new_df)  # the table the finding came from: same features, same verdicts
        fig, ax = _axes('data_shift: |z| (continuous) or -log10 p (categorical) per feature')
        ax.bar(shift['feature'], shift['stat'], color=['r' if s else 'C0' for s in shift['shifted']],
               label='red: shifted under one rule over all the tests'); ax.set_yscale('log')
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
