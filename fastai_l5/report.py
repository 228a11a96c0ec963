"""The instrumented training run behind `fastai-l5 demo` and `fastai-l5 report`: a `tabular_learner`
on a `TabularRecipe` (see `fastai_l5.recipe`) with every fastai_l5 callback attached, trained with
`fit_one_cycle` at the lr `lr_find` suggests (below `SKIP_MAX_ROWS` training rows with a linear skip started at the
ridge fit: `fastai_l5.wide`), scored against a constant predictor and a linear model (with a
bootstrap interval and, for a classification, per-class scores: `fastai_l5.audit`), then written out as an HTML
report (the Findings, "What was trained", PNG plots, CSV logs with a legend for every column), `summary.json`,
`findings.csv` and `predictions.csv`. Leaks are looked for before the fit and printed first; the fit goes on."""
from __future__ import annotations

import html
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from fastai.callback.progress import ProgressCallback
from fastai.metrics import accuracy, rmse
from fastai.tabular.all import TabularLearner, get_c, get_emb_sz, tabular_config, tabular_learner
from fastai.torch_core import set_seed
from fastcore.foundation import L

from .audit import balanced_class_weights, classification_scores, fit_key, linear_baseline, target_leak, value_ci
from .batchnorm import BNDrift
from .core import StepCallback, find_cb, new_figure
from .diagnose import COLUMNS as FINDINGS_COLUMNS, findings_html, findings_section
from .dropout import DropoutSchedule, curriculum_dropout, fastai_ps
from .momentum import MomentumLogger
from .optim import adam, opt_state
from .precise import PreciseBNCallback
from .recipe import TabularRecipe, TargetTransform
from .wide import WideTabularModel, init_from_linear, ridge_log_or_not, train_design

__all__ = ['instrumented_learner', 'find_lr', 'plain_progress', 'report_threads', 'SKIP_MAX_ROWS', 'linear_skip_rule',
           'skip_target_scale', 'train_recipe', 'write_summary', 'train_report', 'write_report']

# (callback class, found by type; the stem of its CSV and PNG files; section title; what the section shows)
SECTIONS = [
    (MomentumLogger, 'momentum_logger', 'Momentum (MomentumLogger)',
     "Per layer and step: the gradient, the optimizer's first-moment EWMA, the cosine between them, the share "
     "of entries where the gradient pushes against the momentum, and the update/parameter ratio."),
    (DropoutSchedule, 'dropout_schedule', 'Dropout (DropoutSchedule)',
     "The dropout probability every dropout layer applied at each training batch (curriculum dropout here: "
     "p·(1 − e^(−10·pct)), with fastai's p on the last layer and p/2 before it)."),
    (BNDrift, 'bn_drift', 'Batch norm (BNDrift)',
     "How far each batch's statistics sit from the running EWMA (mean_shift, var_shift), how far the running "
     "statistics moved since the fit began (mean_drift), and, per epoch, the gap between the running and the "
     "population statistics with the validation loss under each."),
]


def instrumented_learner(dls, layers=(200, 100), p=0.2, embed_p=0.05, opt_func=None, metrics=None, y_range=None,
                         loss_func=None, linear_skip=False):
    """A `tabular_learner` on `dls` with fastai's dropout rule (`fastai_ps(p, n)` on the hidden layers,
    `embed_p` on the embeddings), this package's `adam()` and `MomentumLogger`, a curriculum
    `DropoutSchedule` and `BNDrift` (with a PreciseBN comparison every epoch) attached. `loss_func`: fastai's
    default for the target unless given. `linear_skip`: the model is a `WideTabularModel` (the same MLP plus a
    linear part, no `y_range`; start it with `wide.init_from_linear`)."""
    layers = list(layers)
    ps = fastai_ps(p, len(layers))
    if metrics is None: metrics = rmse if dls.c == 1 else accuracy
    cbs = [MomentumLogger(), DropoutSchedule([curriculum_dropout(q) for q in [embed_p] + ps]),
           BNDrift(precise_every=1, precise_batches=max(1, min(20, len(dls.train))))]  # small data: all it holds
    kw = dict(opt_func=opt_func or adam(), metrics=metrics, cbs=cbs, loss_func=loss_func)
    if not linear_skip:
        return tabular_learner(dls, layers=layers, config=tabular_config(ps=ps, embed_p=embed_p), y_range=y_range, **kw)
    model = WideTabularModel(get_emb_sz(dls.train_ds, {}), len(dls.cont_names), get_c(dls), layers,
                             **tabular_config(ps=ps, embed_p=embed_p))
    return TabularLearner(dls, model, **kw)


def find_lr(learn):
    """fastai's `lr_find` suggestion (`valley`), run with fastai_l5's loggers detached (the mock training is not
    logged) and its temporary weights outside the working directory."""
    ours = learn.cbs.filter(lambda cb: isinstance(cb, StepCallback))
    model_dir = learn.model_dir
    with tempfile.TemporaryDirectory() as d, learn.removed_cbs(ours):
        learn.model_dir = d
        try: return float(learn.lr_find(show_plot=False).valley)
        finally: learn.model_dir = model_dir


class EpochLines:
    "A `learn.logger` that prints fastai's per-epoch record as plain aligned lines (for output that is not a terminal)."
    def __init__(self, learn): self.learn, self.names = learn, None

    def __call__(self, log):
        names = list(self.learn.recorder.metric_names)
        if names != self.names: print('  '.join(f'{n:>12}' for n in names)); self.names = names
        print('  '.join(f'{v:>12.6g}' if isinstance(v, float) else f'{v!s:>12}' for v in log), flush=True)


def plain_progress(learn):
    "No progress bars on `learn` (they fill redirected output with carriage returns): one printed line per epoch."
    learn.remove_cbs(learn.cbs.filter(lambda cb: isinstance(cb, ProgressCallback)))
    learn.logger = EpochLines(learn)
    return learn


def validation_score(learn, recipe):
    """The model's metric on the validation rows, on the target's original scale (rmse or accuracy), the
    validation predictions as a `DataFrame` (`row`: the row's 0-based position in the input, `target`,
    `prediction`, original scale; for a classification `proba_<class>`, one column per class) and, for a
    classification, the probabilities as an array (None for a regression)."""
    # get_preds would reset the Recorder, whose history of the fit the report's plots and `diagnose` read
    with learn.removed_cbs(learn.recorder): preds, _ = learn.get_preds(dl=learn.dls.valid)
    truth = recipe.y_raw.iloc[recipe.valid_idx].to_numpy()
    frame = pd.DataFrame({'row': np.asarray(recipe.rows)[recipe.valid_idx], 'target': truth})
    if recipe.is_regression:
        proba, pred = None, recipe.target_transform.decode(preds.float().view(-1).numpy().astype(float))
        value = float(np.sqrt(np.mean((pred - truth.astype(float)) ** 2)))
    else:
        proba = preds.float().numpy()
        pred = np.asarray(learn.dls.vocab)[proba.argmax(1)]
        value = float((pred == truth.astype(str)).mean())
    frame['prediction'] = pred
    if proba is not None:
        for i, c in enumerate(learn.dls.vocab): frame[f'proba_{c}'] = proba[:, i]
    return value, frame, proba


# Threads: a tabular net of this size gains nothing from torch's intra-op threads, and loses a lot when other
# work shares the cores (issue 23: a 263-row report, 84 s of training at the default thread count on a busy
# machine, 17 s at one thread; 4.3 vs 5.0 s on a quiet 2-core machine). More threads only pay on large batches of
# wide inputs; `bench_report_threads` measures it.
THREADS_MIN_ROWS = 100_000


def report_threads(n_train, cpus=None):
    """torch intra-op threads for a report on `n_train` training rows: 1 below `THREADS_MIN_ROWS` (small models:
    thread start-up and contention cost more than the parallel matmuls save), else min(4, the CPU count)."""
    cpus = cpus or os.cpu_count() or 1
    return 1 if n_train < THREADS_MIN_ROWS else max(1, min(4, cpus))


def leak_check(recipe):
    "`target_leak` on `recipe`'s training rows (original-scale target, the recipe's inputs, the user's column names)."
    return target_leak(recipe.df.iloc[recipe.train_idx], recipe.y_raw.iloc[recipe.train_idx].to_numpy(),
                       recipe.cat_names, recipe.cont_names, recipe.task, names=getattr(recipe, 'names', {}))


def _audit(learn, recipe, value, proba, leaks, weights=None):
    """The audit's numbers (see `fastai_l5.audit.audit`) from the recipe's rows: linear baseline (its loss weighted
    by `weights` when the network's was), interval, scores."""
    train, valid = recipe.df.iloc[recipe.train_idx], recipe.df.iloc[recipe.valid_idx]
    y_tr, y_va = recipe.y_raw.iloc[recipe.train_idx].to_numpy(), recipe.y_raw.iloc[recipe.valid_idx].to_numpy()
    metric = 'rmse' if recipe.is_regression else 'accuracy'
    classes = None if recipe.is_regression else [str(c) for c in learn.dls.vocab]
    linear = linear_baseline(train, valid, recipe.target, recipe.cat_names, recipe.cont_names, recipe.task, y_train=y_tr,
                             y_valid=y_va, log_too=recipe.target_transform.kind == 'log' or getattr(recipe, 'skew_log', False),
                             classes=classes,
                             class_weights=weights)
    pred = learn.l5_preds['prediction'].to_numpy()
    out = dict(metric=metric, value=value, value_ci=value_ci(y_va, pred, metric), baseline=recipe.baseline(),
               linear=linear, leaks=leaks, n_valid=len(y_va), weighted=weights is not None)
    if not recipe.is_regression:
        out['scores'] = classification_scores(y_va, pred, classes, proba)
        out['train_counts'] = pd.Series(y_tr.astype(str)).value_counts().to_dict()
    return out


def skip_target_scale(recipe):
    """For a linear skip (see `fastai_l5.wide`): a target the recipe put on log(y) by its skewness rule (not asked
    for) is put back on the standardized scale when ridge regression on the processed training inputs predicts the
    inner split's held-out rows better fitted on y than on log(y) (original-scale rmse). Returns the recipe, or a
    copy with the new `target_transform` and a note saying why."""
    if not recipe.is_regression or recipe.target_transform.kind != 'log' or getattr(recipe, 'log_target', None):
        return recipe
    y = recipe.y_raw.iloc[recipe.train_idx].to_numpy(dtype=float)
    use_log, errs = ridge_log_or_not(train_design(recipe.dls()), y)
    if use_log: return recipe
    tt = TargetTransform.fit(y, log=False)
    df = recipe.df.copy()
    df[recipe.target] = tt.encode(recipe.y_raw.astype(float)).astype('float32')
    note = (f"target trained standardized, not on log(y) as its skewness would have it: ridge regression on the "
            f"training rows' inner split predicts held-out rows better fitted on y (rmse {errs['original']:.4g}) "
            f"than on log(y) ({errs['log']:.4g})")
    return TabularRecipe(**{**recipe.__dict__, 'df': df, 'target_transform': tt, 'notes': [*recipe.notes, note],
                            'skew_log': True})


def _learner(recipe, skip, class_weights, kwargs):
    "The `instrumented_learner` of `train_recipe` (class-weighted loss; a linear skip not yet started): `(learn, weights, vocab)`."
    learn = instrumented_learner(recipe.dls(), metrics=recipe.metric(), y_range=None if skip else recipe.y_range(),
                                 linear_skip=skip, **kwargs)
    weights = vocab = None
    if class_weights and not recipe.is_regression:
        from fastai.losses import CrossEntropyLossFlat
        vocab = [str(c) for c in learn.dls.vocab]  # the order of the model's outputs
        weights = balanced_class_weights(recipe.y_raw.iloc[recipe.train_idx].astype(str), vocab)
        learn.loss_func = CrossEntropyLossFlat(weight=torch.tensor(weights, dtype=torch.float32))
    return learn, weights, vocab


# The linear skip (`fastai_l5.wide`) pays where the MLP alone loses to ridge: small tables. Measured with
# tests/report_table.py (--quick and --suite: 20 runs, the split fixed): the network beats ridge on 14 of them with
# it, 7 without (training seeds 1 and 2: 13 and 13 with it, 8 and 8 without), e.g. mpg 1.225 (1.575 without, ridge
# 1.473), Hitters 269.8 (294.0, 271.6), diamonds 10k 689 (839, 866); but on flights 30k (23,329 training rows) it
# ended at rmse 15.0, level with ridge, against 12.5 without. Tried and dropped: a frozen linear part, lr/10,
# weight decay 0.3, epochs chosen on an inner split.
SKIP_MAX_ROWS = 10_000


def linear_skip_rule(recipe):
    "Whether `train_recipe` adds the linear skip: fewer than `SKIP_MAX_ROWS` training rows."
    return len(recipe.train_idx) < SKIP_MAX_ROWS


def train_recipe(recipe, lr=None, progress=None, seed=42, threads=None, class_weights=False, linear_skip=None, **kwargs):
    """Train an `instrumented_learner` on `recipe` (a `TabularRecipe`) with `fit_one_cycle(recipe.epochs, lr)`,
    `lr` from `find_lr` unless given. `progress`: draw progress bars (default: only when stdout is a
    terminal). `linear_skip`: add a linear part started at the ridge (or logistic) fit to the MLP
    (`fastai_l5.wide.WideTabularModel`; None: `linear_skip_rule`, below `SKIP_MAX_ROWS` training rows), with the target
    put back from log(y) to standardized where ridge says so (`skip_target_scale`). `seed` goes to fastai's
    `set_seed` first (None: leave the random state alone). `threads`: torch's
    intra-op threads while training (default `report_threads`; put back afterwards). `class_weights` (a
    classification): weigh the cross-entropy by n/(K·n_k), the inverse class frequency of the training rows.
    Before the fit, `target_leak` runs on the training rows and prints what it finds (the fit goes on; the
    findings repeat it). Returns the `Learner`, with `l5_summary` (the `summary.json` dict), `l5_trained` (the
    "What was trained" lines), `l5_preds` (see `validation_score`), `l5_audit` (linear baseline, interval,
    classification scores, leaks), `l5_recipe`, `l5_skip` (what the linear part started from, or None) and
    `l5_train_s` (seconds of `fit_one_cycle`)."""
    leaks = leak_check(recipe)
    for f in leaks: print(f"warning: target_leak ({f['where']}): {f['evidence']} -> {f['advice']}", flush=True)
    threads_given = bool(threads)
    threads = int(threads) if threads else report_threads(len(recipe.train_idx))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if seed is not None: set_seed(seed)
        skip = linear_skip_rule(recipe) if linear_skip is None else bool(linear_skip)
        if skip: recipe = skip_target_scale(recipe)
        learn, weights, vocab = _learner(recipe, skip, class_weights, kwargs)
        if not (sys.stdout.isatty() if progress is None else progress): plain_progress(learn)
        # lr_find before the linear part starts at its fit: from there the loss barely moves until the lr is too
        # high, and the valley read noise (diamonds 10k, seed 2: lr 5e-5, rmse 1105 against ridge's 866)
        lr, lr_source = (float(lr), 'user') if lr else (find_lr(learn), 'lr_find (valley)')
        learn.l5_skip = init_from_linear(learn.model, learn.dls, weight=weights) if skip else None
        start = time.time()
        learn.fit_one_cycle(recipe.epochs, lr)
        elapsed = time.time() - start
        value, learn.l5_preds, proba = validation_score(learn, recipe)
    finally: torch.set_num_threads(before)
    learn.l5_recipe, learn.l5_proba, learn.l5_threads_given, learn.l5_train_s = recipe, proba, threads_given, elapsed
    learn.l5_audit = a = _audit(learn, recipe, value, proba, leaks, weights)
    learn.l5_audit_key = fit_key(learn)
    learn.l5_summary = dict(task=recipe.task, target=recipe.user_name(recipe.target),
                            metric='rmse' if recipe.is_regression else 'accuracy', value=value, baseline=recipe.baseline(),
                            target_transform=recipe.target_transform.kind, bs=recipe.bs, epochs=recipe.epochs, lr=lr,
                            lr_source=lr_source, linear_baseline=a['linear']['value'], value_ci=a['value_ci'],
                            threads=threads, linear_skip=_skip_summary(learn.l5_skip))
    if 'scores' in a:
        learn.l5_summary['balanced_accuracy'] = a['scores']['balanced_accuracy']
        if 'roc_auc' in a['scores']: learn.l5_summary['roc_auc'] = a['scores']['roc_auc']
    learn.l5_weights = None if weights is None else dict(zip(vocab, map(float, weights)))
    learn.l5_trained = recipe.describe() + _training_lines(learn, learn.l5_summary, recipe.y_range(), elapsed)
    return learn


def write_summary(learn, out):
    "Write `out/summary.json` (keys as `fastai-l5`'s docs list them) and `out/predictions.csv`; returns the json's path."
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    (out / 'summary.json').write_text(json.dumps(learn.l5_summary, indent=2) + '\n')
    learn.l5_preds.to_csv(out / 'predictions.csv', index=False)
    return out / 'summary.json'


def train_report(recipe, out='l5_report', lr=None, title='fastai_l5 report', progress=None, **kwargs):
    "`train_recipe`, then `write_summary` and `write_report` to `out`; returns `(learn, path of report.html)`."
    learn = train_recipe(recipe, lr=lr, progress=progress, **kwargs)
    write_summary(learn, out)
    return learn, write_report(learn, out, title=title, trained=learn.l5_trained)


def _skip_summary(skip):
    "summary.json's `linear_skip`: None, or what the linear part started from (`kind`, `alpha`, `n_features`)."
    return None if skip is None else {k: skip[k] for k in ('kind', 'alpha', 'n_features')}


def _skip_line(skip):
    "The 'What was trained' line of a linear skip (`fastai_l5.wide`)."
    score = f"held-out rmse {skip['inner']:.4g} on the training scale" if skip['kind'] == 'ridge' else \
        f"held-out cross-entropy {skip['inner']:.4g}"
    what = 'ridge regression' if skip['kind'] == 'ridge' else 'logistic regression (its logits)'
    return ('linear skip', f"wide & deep: output = a linear part + the MLP; the linear part initialised from {what} on the "
                           f"{skip['n_features']} processed inputs (categoricals one-hot, continuous normalized; "
                           f"alpha={skip['alpha']:g}, chosen on an inner 80/20 split of the training rows, {score}), "
                           f"the MLP's output layer zeroed, so training starts at the linear fit; both parts trained "
                           f"(rule: fewer than {SKIP_MAX_ROWS:,} training rows)")


def _better(metric, a, b): return a < b if metric == 'rmse' else a > b


def _training_lines(learn, summary, y_range, elapsed):
    opt = getattr(learn.opt_func, 'func', learn.opt_func).__name__
    args = ', '.join(f'{k}={v}' for k, v in getattr(learn.opt_func, 'keywords', {}).items())
    metric, value = summary['metric'], summary['value']
    const = 'the training mean' if metric == 'rmse' else 'the majority class'
    a = learn.l5_audit
    lin, (lo, hi) = summary['linear_baseline'], summary['value_ci']
    lines = [('optimizer', f'{opt}({args}) under fit_one_cycle (lr warms up then anneals; mom 0.95→0.85→0.95)'),
             ('lr', f"{summary['lr']:.3g}, from {summary['lr_source']}")]
    if getattr(learn, 'l5_weights', None):
        lines.append(('loss', 'cross-entropy weighted by inverse class frequency, n/(K·n_k): ' +
                      ', '.join(f'{c} {w:.3g}' for c, w in learn.l5_weights.items())))
    skip = getattr(learn, 'l5_skip', None)
    if skip: lines.append(_skip_line(skip))
    lines += [('y_range', 'none (classification)' if summary['task'] == 'classification' else
               'none (linear skip: no final sigmoid)' if skip else
               'none (heavy-tailed target: see target scale)' if y_range is None else
               f'({y_range[0]:.4g}, {y_range[1]:.4g}) on the training scale'),
              ('threads', f"{summary['threads']} torch intra-op thread(s) "
                          f"({'given' if getattr(learn, 'l5_threads_given', False) else 'rule: 1 below 100,000 training rows, else min(4, CPUs)'})"),
              ('result', f"validation {metric} {value:.4g} (95% bootstrap interval {lo:.4g}–{hi:.4g}, {a['n_valid']:,} "
                         f"rows) vs {summary['baseline']:.4g} for {const} "
                         f"({'better than' if _better(metric, value, summary['baseline']) else 'NO BETTER THAN'} the constant) "
                         f"and {lin:.4g} for {a['linear']['describe'].split(':')[0]} "
                         f"({'better than' if _better(metric, value, lin) else 'NO BETTER THAN'} the linear model), "
                         f"{elapsed:.1f} s of training")]
    if 'scores' in a:
        sc = a['scores']
        auc = f", ROC AUC {sc['roc_auc']:.3f}" if 'roc_auc' in sc else ''
        lines.append(('classes', f"balanced accuracy {sc['balanced_accuracy']:.3f}{auc}; per class (recall, precision): " +
                      '; '.join(f"{r['class']}: {r['recall']:.2f} ({int(round(r['recall'] * r['support'])) if r['support'] else 0}"
                                f"/{r['support']}), {r['precision']:.2f}" for _, r in sc['per_class'].iterrows())))
        cm = sc['confusion']
        lines.append(('confusion', '; '.join(f"truth {t}: " + ', '.join(f"{p} {cm.loc[t, p]}" for p in cm.columns)
                                             for t in cm.index) + ' (predicted counts per true class)'))
    return lines


# Where a report's links to the docs point: the site `fastai-l5 docs` writes to ./_site, next to ./l5_report. A
# link is written only when the page is there when the report is written (`_docs_pages`); else the report says how
# to build the site.
DOCS_URL = '../_site/'


def _docs_pages(out):
    "The docs pages (names without .html) found in the site next to the report folder `out`."
    site = Path(out).resolve().parent / '_site'
    return {p.stem for p in site.glob('*.html')} if site.is_dir() else set()

# column -> (what it holds, the docs page that explains it). One name per quantity: the progress table's
# per-epoch columns are epoch means of per-step log columns, and say which.
LEGEND = {
    'epoch': ('the epoch, from 0', None),
    'step': ('the optimizer step, from 1 (steps that really ran)', None),
    'layer': ('the layer (module path in the model)', None),
    'train_loss': ("fastai's smoothed training loss at the end of the epoch (on the training scale of the target)", None),
    'valid_loss': ('validation loss (training scale of the target); in bn_drift_precise_df: with the running BN statistics', None),
    'rmse': ('validation root mean squared error on the original scale of the target', None),
    'accuracy': ('share of validation rows classified right', None),
    'dropout_p': ('epoch mean of the dropout p applied (p in dropout_schedule.csv)', '03_dropout'),
    'severity': ("a finding's weight: warn (costs accuracy or time), info (worth knowing), ok", '07_diagnose'),
    'kind': ('what diagnose found: lr_too_high, stale_bn_stats, healthy, ... (its thresholds are on the page)', '07_diagnose'),
    'where': ('the layer or feature the finding is about; empty for the whole model', '07_diagnose'),
    'evidence': ('the measured numbers behind the finding', '07_diagnose'),
    'advice': ('what to do about it, with the code', '07_diagnose'),
    'effect': ('the measured change when the advice was applied to a copy; empty where nothing was measured', '07_diagnose'),
    'class': ('a class of the target', None),
    'support': ('validation rows of that class', None),
    'precision': ('of the rows predicted as that class, the share that are', None),
    'recall': ('of the rows of that class, the share predicted as it', None),
    'param': ('the parameter tensor', '01_optim'),
    'numel': ('number of entries of the tensor', '01_optim'),
    'mom': ("the parameter group's momentum hyper-parameter now", '01_optim'),
    'grad_avg_norm': ("‖first moment‖ (fastai's grad_avg, torch's momentum_buffer or exp_avg)", '01_optim'),
    'grad_mean_norm': ("‖centering mean‖ of a centered RMSprop (grad_mean here, torch's grad_avg); NaN otherwise", '01_optim'),
}


def _telemetry_legend():
    """The legend of every measured column of the telemetry callbacks, read from their declared `logs` (API §10):
    the meaning and docs page are written once, where each log is declared. A column that is also one of the
    progress table's epoch columns (`cos_mom_grad`, `sign_flip`) says that the Training table holds its epoch mean."""
    legend = {}
    for cls in (MomentumLogger, DropoutSchedule, BNDrift, PreciseBNCallback):
        for log in cls.logs:
            for c in log.all_columns:  # the step and index columns too (`pct`): their meanings are shared
                mean = ' (Training table: its epoch mean over steps and layers)' if c in cls.epoch_columns else ''
                legend.setdefault(c, (log.meaning(c) + mean, log.doc or None))
    return legend


LEGEND = {**_telemetry_legend(), **LEGEND}  # the general entries (`valid_loss`) win over a log's narrower one


def _legend_html(columns, pages=()):
    "A legend for `columns`: what each holds and, where it is among `pages` (built docs), the page that explains it."
    items = []
    for c in columns:
        text, page = LEGEND.get(c, ('(not documented)', None))
        link = (f' <a class="doc" href="{DOCS_URL}{page}.html">{page}</a>' if page in pages else
                f' <span class="doc">(docs: {page})</span>' if page else '')
        items.append(f'<dt>{html.escape(c)}</dt><dd>{html.escape(text)}{link}</dd>')
    return f'<dl class="legend">{"".join(items)}</dl>'


def _training_figure(learn):
    "Losses per batch, validation loss per epoch, and the lr and mom schedules fit_one_cycle applied."
    rec = learn.recorder
    fig = new_figure(figsize=(12, 3.4), layout='constrained')
    ax_loss, ax_lr, ax_mom = fig.subplots(1, 3)
    ax_loss.plot(L(rec.losses).map(float), label='train (smoothed)', lw=1)
    if rec.values:
        it = np.asarray(rec.iters) if len(rec.iters) == len(rec.values) else np.arange(1, len(rec.values) + 1)
        ax_loss.plot(it, [v[1] for v in rec.values], 'o-', label='valid')
    ax_loss.set_title('loss'); ax_loss.set_xlabel('batch'); ax_loss.legend()
    hps = getattr(rec, 'hps', {})
    for ax, name in ((ax_lr, 'lr'), (ax_mom, 'mom')):
        if name in hps: ax.plot(hps[name])
        ax.set_title(f'{name} schedule'); ax.set_xlabel('batch')
    return fig


def _figure_file(fig, out, name):
    fig.savefig(out / name, dpi=90)
    plt.close(fig)  # outside notebooks `.plot()`s make pyplot figures: do not keep them open
    return name


def _table_html(df, max_rows=12, pages=()):
    "The first `max_rows` rows as an HTML table, then a legend of its columns."
    table = df.head(max_rows).to_html(index=False, float_format=lambda v: f'{v:.4g}', border=0, classes='tbl')
    return table + _legend_html(df.columns, pages)


def _classification_html(scores, pages=()):
    "Per-class precision and recall, the confusion matrix (rows: truth, columns: predicted) and the summary scores."
    auc = f", ROC AUC {scores['roc_auc']:.3f}" if 'roc_auc' in scores else ''
    cm = scores['confusion']
    head = ''.join(f'<td><b>{html.escape(str(c))}</b></td>' for c in cm.columns)
    body = ''.join(f'<tr><td><b>{html.escape(str(t))}</b></td>' + ''.join(f'<td>{int(v)}</td>' for v in row) + '</tr>'
                   for t, row in zip(cm.index, cm.to_numpy()))
    return (f"<h2>Classes</h2><p>accuracy {scores['accuracy']:.4f}, balanced accuracy (mean recall over the classes) "
            f"{scores['balanced_accuracy']:.4f}{auc}</p>" + _table_html(scores['per_class'], 50, pages) +
            f'<p>Confusion matrix: validation rows by true class (rows) and predicted class (columns).</p>'
            f'<table class="tbl"><tr><td><i>truth \\ predicted</i></td>{head}</tr>{body}</table>')


def _fallback_findings(learn, error):
    "The findings when `diagnose` could not run: the audit's own, and one `info` row saying why the rest are missing."
    from .audit import audit_findings
    rows = audit_findings(learn) if hasattr(learn, 'l5_audit') else []
    rows.append(dict(kind='not_diagnosed', severity='info', where='', evidence=f"diagnose could not read the fit: {error}",
                     advice='train on more rows (at least a few full batches) to get the training diagnosis', effect=''))
    return pd.DataFrame(rows)


def write_report(learn, out='l5_report', title='fastai_l5 report', notes='', trained=()):
    """Write `out/report.html` with what was trained (`trained`: `(label, text)` lines), the training curves
    and, for each fastai_l5 callback attached to `learn`, its plot (PNG) and its log (CSV). Returns the
    report's path."""
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    rec = learn.recorder
    pages = _docs_pages(out)
    parts = [f'<h1>{html.escape(title)}</h1><p>{html.escape(notes)}</p>']
    section, findings = findings_section(learn, out)  # Findings open the report
    if not len(findings):  # diagnose could not run (its reason is in `section`): never an empty Findings table
        findings = _fallback_findings(learn, html.unescape(section.split('<p>', 1)[-1].split('</p>')[0]))
        findings.to_csv(out / 'findings.csv', index=False)
        section = findings_html(findings)
    learn.l5_findings = findings
    parts.append(section + _legend_html(FINDINGS_COLUMNS, pages))
    docs_note = ('Column legends link to the docs pages in ../_site.' if pages else 'Column legends name the docs page '
                 'that explains each column: build the site next to this folder (<code>fastai-l5 docs --out '
                 f'{html.escape(str(out.resolve().parent / "_site"))}</code>, from a checkout) and run the report again '
                 'to get links.')
    if trained: parts.append('<h2>What was trained</h2><table class="what">' + ''.join(
        f'<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>' for k, v in trained) + f'</table><p>{docs_note}</p>')
    scores = getattr(learn, 'l5_audit', {}).get('scores')
    if scores is not None: parts.append(_classification_html(scores, pages))
    if rec.values:
        epochs = pd.DataFrame([list(v) for v in rec.values], columns=rec.metric_names[1:len(rec.values[0]) + 1])
        epochs.insert(0, 'epoch', range(len(epochs)))
        epochs.to_csv(out / 'epochs.csv', index=False)
        parts.append(f'<h2>Training</h2>{_table_html(epochs, 50, pages)}<p><a href="epochs.csv">epochs.csv</a></p>')
    parts.append(f'<img src="{_figure_file(_training_figure(learn), out, "training.png")}" alt="training curves">')
    for cls, attr, heading, text in SECTIONS:
        cb = find_cb(learn, cls)
        if cb is None: continue
        parts.append(f'<h2>{html.escape(heading)}</h2><p>{html.escape(text)}</p>')
        parts.append(f'<img src="{_figure_file(cb.plot(), out, attr + ".png")}" alt="{attr} plot">')
        for log in ('df', 'precise_df'):
            df = getattr(cb, log, None)
            if df is None or not len(df): continue
            name = f'{attr}.csv' if log == 'df' else f'{attr}_{log}.csv'
            df.to_csv(out / name, index=False)
            parts.append(f'<p>{log}: {len(df):,} rows, <a href="{name}">{name}</a> (last rows below)</p>'
                         + _table_html(df.tail(8), pages=pages))
    state = opt_state(learn)
    state.to_csv(out / 'opt_state.csv', index=False)
    parts.append(f'<h2>Optimizer state (opt_state)</h2><p><a href="opt_state.csv">opt_state.csv</a></p>'
                 f'{_table_html(state, 40, pages)}')
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_CSS}</style></head><body>{"".join(parts)}</body></html>')
    path = out / 'report.html'
    path.write_text(page, encoding='utf-8')
    return path


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}.tbl{border-collapse:collapse;font-size:.85em}"
        ".tbl td,.tbl th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}h2{margin-top:2em}"
        ".legend{display:grid;grid-template-columns:max-content auto;gap:0 1em;font-size:.8em;color:#555}"
        ".legend dt{font-family:monospace}.legend dd{margin:0}.what th{text-align:left;padding-right:1em;vertical-align:top}")
