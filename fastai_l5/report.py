"""The instrumented training run behind `fastai-l5 demo` and `fastai-l5 report`: a `tabular_learner`
on a `TabularRecipe` (see `fastai_l5.recipe`) with every fastai_l5 callback attached, trained with
`fit_one_cycle` at the lr `lr_find` suggests, scored against a constant predictor, then written out as an
HTML report ("What was trained", PNG plots, CSV logs with a legend for every column) and `summary.json`."""
from __future__ import annotations

import html
import json
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from fastai.callback.progress import ProgressCallback
from fastai.metrics import accuracy, rmse
from fastai.tabular.all import tabular_config, tabular_learner
from fastai.torch_core import set_seed
from fastcore.foundation import L

from .batchnorm import BNDrift
from .core import StepCallback, find_cb, new_figure
from .diagnose import COLUMNS as FINDINGS_COLUMNS, findings_section
from .dropout import DropoutSchedule, curriculum_dropout, fastai_ps
from .momentum import MomentumLogger
from .optim import adam, opt_state

__all__ = ['instrumented_learner', 'find_lr', 'plain_progress', 'train_recipe', 'write_summary', 'train_report', 'write_report']

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


def instrumented_learner(dls, layers=(200, 100), p=0.2, embed_p=0.05, opt_func=None, metrics=None, y_range=None):
    """A `tabular_learner` on `dls` with fastai's dropout rule (`fastai_ps(p, n)` on the hidden layers,
    `embed_p` on the embeddings), this package's `adam()` and `MomentumLogger`, a curriculum
    `DropoutSchedule` and `BNDrift` (with a PreciseBN comparison every epoch) attached."""
    layers = list(layers)
    ps = fastai_ps(p, len(layers))
    if metrics is None: metrics = rmse if dls.c == 1 else accuracy
    cbs = [MomentumLogger(), DropoutSchedule([curriculum_dropout(q) for q in [embed_p] + ps]),
           BNDrift(precise_every=1, precise_batches=max(1, min(20, len(dls.train))))]  # small data: all it holds
    return tabular_learner(dls, layers=layers, config=tabular_config(ps=ps, embed_p=embed_p), y_range=y_range,
                           opt_func=opt_func or adam(), metrics=metrics, cbs=cbs)


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
    """The model's metric on the validation rows, on the target's original scale (rmse or accuracy), and the
    validation predictions as a `DataFrame` (`target`, `prediction`, original scale)."""
    # get_preds would reset the Recorder, whose history of the fit the report's plots and `diagnose` read
    with learn.removed_cbs(learn.recorder): preds, _ = learn.get_preds(dl=learn.dls.valid)
    truth = recipe.y_raw.iloc[recipe.valid_idx].to_numpy()
    if recipe.is_regression:
        pred = recipe.target_transform.decode(preds.float().view(-1).numpy().astype(float))
        value = float(np.sqrt(np.mean((pred - truth.astype(float)) ** 2)))
    else:
        pred = np.asarray(learn.dls.vocab)[preds.argmax(dim=1).numpy()]
        value = float((pred == truth.astype(str)).mean())
    return value, pd.DataFrame({'target': truth, 'prediction': pred})


def train_recipe(recipe, lr=None, progress=None, seed=42, **kwargs):
    """Train an `instrumented_learner` on `recipe` (a `TabularRecipe`) with `fit_one_cycle(recipe.epochs, lr)`,
    `lr` from `find_lr` unless given. `progress`: draw progress bars (default: only when stdout is a
    terminal). `seed` goes to fastai's `set_seed` first (None: leave the random state alone). Returns the
    `Learner`, with `l5_summary` (the `summary.json` dict), `l5_trained` (the "What was trained" lines) and
    `l5_preds` (validation targets and predictions on the original scale)."""
    if seed is not None: set_seed(seed)
    learn = instrumented_learner(recipe.dls(), metrics=recipe.metric(), y_range=recipe.y_range(), **kwargs)
    if not (sys.stdout.isatty() if progress is None else progress): plain_progress(learn)
    lr, lr_source = (float(lr), 'user') if lr else (find_lr(learn), 'lr_find (valley)')
    start = time.time()
    learn.fit_one_cycle(recipe.epochs, lr)
    elapsed = time.time() - start
    value, learn.l5_preds = validation_score(learn, recipe)
    learn.l5_summary = dict(task=recipe.task, target=recipe.target, metric='rmse' if recipe.is_regression else 'accuracy',
                            value=value, baseline=recipe.baseline(), target_transform=recipe.target_transform.kind,
                            bs=recipe.bs, epochs=recipe.epochs, lr=lr, lr_source=lr_source)
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


def _training_lines(learn, summary, y_range, elapsed):
    opt = getattr(learn.opt_func, 'func', learn.opt_func).__name__
    args = ', '.join(f'{k}={v}' for k, v in getattr(learn.opt_func, 'keywords', {}).items())
    better = summary['value'] < summary['baseline'] if summary['metric'] == 'rmse' else summary['value'] > summary['baseline']
    const = 'the training mean' if summary['metric'] == 'rmse' else 'the majority class'
    return [('optimizer', f'{opt}({args}) under fit_one_cycle (lr warms up then anneals; mom 0.95→0.85→0.95)'),
            ('lr', f"{summary['lr']:.3g}, from {summary['lr_source']}"),
            ('y_range', 'none (classification)' if y_range is None else
             f'({y_range[0]:.4g}, {y_range[1]:.4g}) on the training scale'),
            ('result', f"validation {summary['metric']} {summary['value']:.4g} vs {summary['baseline']:.4g} for {const} "
                       f"({'better than' if better else 'NO BETTER THAN'} the constant), {elapsed:.1f} s of training")]


# Where a report's links to the docs point: the site `fastai-l5 docs` writes to ./_site, next to ./l5_report
DOCS_URL = '../_site/'

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
    'valid_loss_precise': ('validation loss with population (PreciseBN) statistics instead of the running ones',
                           '04_batchnorm'),
    'grad_norm': ('‖g‖, the gradient of the layer', '02_momentum'),
    'mom_norm': ("‖m‖, the optimizer's first-moment EWMA (momentum)", '02_momentum'),
    'cos_mom_grad': ('⟨g, m_{t−1}⟩ / (‖g‖‖m_{t−1}‖): how much the gradient agrees with the momentum carried in from '
                     'the steps before (Training table: the epoch mean over steps and layers)', '02_momentum'),
    'sign_flip': ('share of entries where the gradient pushes against the momentum carried in (g·m_{t−1} < 0; '
                  'Training table: the epoch mean)', '02_momentum'),
    'update_norm': ('‖Δp‖, the change the step made to the parameters', '02_momentum'),
    'param_norm': ('‖p‖ after the step', '02_momentum'),
    'update_ratio': ('‖Δp‖ / ‖p‖', '02_momentum'),
    'beta': ('the mom hyper-parameter of the step (EWMA window about 1/(1−β) steps)', '02_momentum'),
    'sqr_avg_rms': ('√mean of the second moment (squared-gradient EWMA); NaN without one', '01_optim'),
    'pct': ('share of training done at that batch, 0..1', '03_dropout'),
    'p': ('the dropout probability the layer applied at that batch', '03_dropout'),
    'mean_shift': ("|batch mean − running mean| / running sd, averaged over the layer's channels", '04_batchnorm'),
    'var_shift': ("|log(batch variance / running variance)|, averaged over channels", '04_batchnorm'),
    'mean_drift': ('how far the running mean moved since the fit began, in sds of the starting statistics', '04_batchnorm'),
    'mean_gap': ('|running mean − population mean| / population sd, averaged over channels', '04_batchnorm'),
    'var_gap': ('|log(running variance / population variance)|, averaged over channels', '04_batchnorm'),
    'severity': ("a finding's weight: warn (costs accuracy or time), info (worth knowing), ok", '07_diagnose'),
    'kind': ('what diagnose found: lr_too_high, stale_bn_stats, healthy, ... (its thresholds are on the page)', '07_diagnose'),
    'where': ('the layer or feature the finding is about; empty for the whole model', '07_diagnose'),
    'evidence': ('the measured numbers behind the finding', '07_diagnose'),
    'advice': ('what to do about it, with the code', '07_diagnose'),
    'param': ('the parameter tensor', '01_optim'),
    'numel': ('number of entries of the tensor', '01_optim'),
    'mom': ("the parameter group's momentum hyper-parameter now", '01_optim'),
    'grad_avg_norm': ("‖first moment‖ (fastai's grad_avg, torch's momentum_buffer or exp_avg)", '01_optim'),
    'grad_mean_norm': ("‖centering mean‖ of a centered RMSprop (grad_mean here, torch's grad_avg); NaN otherwise", '01_optim'),
}


def _legend_html(columns):
    "A legend for `columns`: what each holds and the docs page that explains it."
    items = []
    for c in columns:
        text, page = LEGEND.get(c, ('(not documented)', None))
        link = f' <a class="doc" href="{DOCS_URL}{page}.html">{page}</a>' if page else ''
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


def _table_html(df, max_rows=12):
    "The first `max_rows` rows as an HTML table, then a legend of its columns."
    table = df.head(max_rows).to_html(index=False, float_format=lambda v: f'{v:.4g}', border=0, classes='tbl')
    return table + _legend_html(df.columns)


def write_report(learn, out='l5_report', title='fastai_l5 report', notes='', trained=()):
    """Write `out/report.html` with what was trained (`trained`: `(label, text)` lines), the training curves
    and, for each fastai_l5 callback attached to `learn`, its plot (PNG) and its log (CSV). Returns the
    report's path."""
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    rec = learn.recorder
    parts = [f'<h1>{html.escape(title)}</h1><p>{html.escape(notes)}</p>']
    parts.append(findings_section(learn, out)[0] + _legend_html(FINDINGS_COLUMNS))  # Findings open the report
    if trained: parts.append('<h2>What was trained</h2><table class="what">' + ''.join(
        f'<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>' for k, v in trained) + '</table>'
        f'<p>Column legends link to the docs pages (the site <code>fastai-l5 docs</code> builds in ./_site).</p>')
    if rec.values:
        epochs = pd.DataFrame([list(v) for v in rec.values], columns=rec.metric_names[1:len(rec.values[0]) + 1])
        epochs.insert(0, 'epoch', range(len(epochs)))
        epochs.to_csv(out / 'epochs.csv', index=False)
        parts.append(f'<h2>Training</h2>{_table_html(epochs, 50)}<p><a href="epochs.csv">epochs.csv</a></p>')
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
                         + _table_html(df.tail(8)))
    state = opt_state(learn)
    state.to_csv(out / 'opt_state.csv', index=False)
    parts.append(f'<h2>Optimizer state (opt_state)</h2><p><a href="opt_state.csv">opt_state.csv</a></p>{_table_html(state, 40)}')
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
