"""The instrumented training run behind `fastai-l5 demo` and `fastai-l5 report`: a `tabular_learner`
with every fastai_l5 callback attached, trained with `fit_one_cycle`, then written out as an HTML
report with PNG plots and CSV logs."""
from __future__ import annotations

import html
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.callback.progress import ProgressCallback
from fastai.metrics import accuracy, rmse
from fastai.tabular.all import tabular_config, tabular_learner
from fastcore.foundation import L
from matplotlib.figure import Figure

from .batchnorm import BNDrift
from .core import StepCallback
from .dropout import DropoutSchedule, curriculum_dropout, fastai_ps
from .momentum import MomentumLogger
from .optim import adam, opt_state

__all__ = ['instrumented_learner', 'find_lr', 'plain_progress', 'train_report', 'write_report']

# (attribute on the Learner, section title, what the section shows)
SECTIONS = [
    ('momentum_logger', 'Momentum (MomentumLogger)',
     "Per layer and step: the gradient, the optimizer's first-moment EWMA, the cosine between them, the share "
     "of entries where the gradient pushes against the momentum, and the update/parameter ratio."),
    ('dropout_schedule', 'Dropout (DropoutSchedule)',
     "The dropout probability every dropout layer applied at each training batch (curriculum dropout here: "
     "p·(1 − e^(−10·pct)), with fastai's p on the last layer and p/2 before it)."),
    ('bn_drift', 'Batch norm (BNDrift)',
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
           BNDrift(precise_every=1, precise_batches=20)]
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
    preds, targs = learn.get_preds(dl=learn.dls.valid)
    truth = recipe.y_raw.iloc[recipe.valid_idx].to_numpy()
    if recipe.is_regression:
        pred = recipe.target_transform.decode(preds.float().view(-1).numpy().astype(float))
        value = float(np.sqrt(np.mean((pred - truth.astype(float)) ** 2)))
    else:
        pred = np.asarray(learn.dls.vocab)[preds.argmax(dim=1).numpy()]
        value = float((pred == truth.astype(str)).mean())
    return value, pd.DataFrame({'target': truth, 'prediction': pred})


def train_report(recipe, out='l5_report', lr=None, title='fastai_l5 report', progress=None, **kwargs):
    """Train an `instrumented_learner` on `recipe` (a `TabularRecipe`) with `fit_one_cycle(recipe.epochs, lr)`,
    `lr` from `find_lr` unless given, and write the report, `summary.json` and `predictions.csv` to `out`.
    `progress`: draw progress bars (default: only when stdout is a terminal). Returns `(learn, path)`;
    `learn.l5_summary` holds the summary and `learn.l5_trained` the "What was trained" lines."""
    learn = instrumented_learner(recipe.dls(), metrics=recipe.metric(), y_range=recipe.y_range(), **kwargs)
    if not (sys.stdout.isatty() if progress is None else progress): plain_progress(learn)
    lr, lr_source = (float(lr), 'user') if lr else (find_lr(learn), 'lr_find (valley)')
    start = time.time()
    learn.fit_one_cycle(recipe.epochs, lr)
    elapsed = time.time() - start
    value, preds = validation_score(learn, recipe)
    metric = 'rmse' if recipe.is_regression else 'accuracy'
    learn.l5_summary = dict(task=recipe.task, target=recipe.target, metric=metric, value=value, baseline=recipe.baseline(),
                            target_transform=recipe.target_transform.kind, bs=recipe.bs, epochs=recipe.epochs, lr=lr,
                            lr_source=lr_source)
    learn.l5_trained = recipe.describe() + _training_lines(learn, learn.l5_summary, recipe.y_range(), elapsed)
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    (out / 'summary.json').write_text(json.dumps(learn.l5_summary, indent=2) + '\n')
    preds.to_csv(out / 'predictions.csv', index=False)
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


def _training_figure(learn):
    "Losses per batch, validation loss per epoch, and the lr and mom schedules fit_one_cycle applied."
    rec = learn.recorder
    fig = Figure(figsize=(12, 3.4), layout='constrained')
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
    return name


def _table_html(df, max_rows=12):
    return df.head(max_rows).to_html(index=False, float_format=lambda v: f'{v:.4g}', border=0, classes='tbl')


def write_report(learn, out='l5_report', title='fastai_l5 report', notes='', trained=()):
    """Write `out/report.html` with what was trained (`trained`: `(label, text)` lines), the training curves
    and, for each fastai_l5 callback attached to `learn`, its plot (PNG) and its log (CSV). Returns the
    report's path."""
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    rec = learn.recorder
    parts = [f'<h1>{html.escape(title)}</h1><p>{html.escape(notes)}</p>']
    if trained: parts.append('<h2>What was trained</h2><table class="what">' + ''.join(
        f'<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>' for k, v in trained) + '</table>')
    if rec.values:
        epochs = pd.DataFrame([list(v) for v in rec.values], columns=rec.metric_names[1:len(rec.values[0]) + 1])
        epochs.insert(0, 'epoch', range(len(epochs)))
        epochs.to_csv(out / 'epochs.csv', index=False)
        parts.append(f'<h2>Training</h2>{_table_html(epochs, 50)}<p><a href="epochs.csv">epochs.csv</a></p>')
    parts.append(f'<img src="{_figure_file(_training_figure(learn), out, "training.png")}" alt="training curves">')
    for attr, heading, text in SECTIONS:
        cb = getattr(learn, attr, None)
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
        ".tbl td,.tbl th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}h2{margin-top:2em}")
