"""The instrumented training run behind `fastai-l5 demo` and `fastai-l5 report`: a `tabular_learner`
with every fastai_l5 callback attached, trained with `fit_one_cycle`, then written out as an HTML
report with PNG plots and CSV logs."""
from __future__ import annotations

import html
import time
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.data.block import CategoryBlock, RegressionBlock
from fastai.data.transforms import RandomSplitter
from fastai.metrics import accuracy, rmse
from fastai.tabular.all import Categorify, FillMissing, Normalize, TabularDataLoaders, tabular_config, tabular_learner
from fastcore.foundation import L
from matplotlib.figure import Figure

from .batchnorm import BNDrift
from .dropout import DropoutSchedule, curriculum_dropout, fastai_ps
from .momentum import MomentumLogger
from .optim import adam, opt_state

__all__ = ['instrumented_learner', 'write_report', 'run_instrumented', 'csv_dls']

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
    is_regression = dls.c == 1
    if metrics is None: metrics = rmse if is_regression else accuracy
    if y_range is None and is_regression: y_range = _y_range(dls)
    cbs = [MomentumLogger(), DropoutSchedule([curriculum_dropout(q) for q in [embed_p] + ps]),
           BNDrift(precise_every=1, precise_batches=20)]
    return tabular_learner(dls, layers=layers, config=tabular_config(ps=ps, embed_p=embed_p), y_range=y_range,
                           opt_func=opt_func or adam(), metrics=metrics, cbs=cbs)


def _y_range(dls):
    "A target range 5% wider than the training targets', for fastai's final sigmoid."
    y = np.asarray(dls.train_ds.ys.values, dtype=float)
    lo, hi = np.nanmin(y), np.nanmax(y)
    pad = 0.05 * (hi - lo)
    return (float(lo - pad), float(hi + pad))


def run_instrumented(dls, epochs=3, out='l5_report', lr=3e-3, title='fastai_l5 report', **kwargs):
    "Train an `instrumented_learner` with `fit_one_cycle(epochs, lr)`, write the report to `out`; returns `(learn, path)`."
    learn = instrumented_learner(dls, **kwargs)
    start = time.time()
    learn.fit_one_cycle(epochs, lr)
    elapsed = time.time() - start
    return learn, write_report(learn, out, title=title, notes=f"{epochs} epochs of fit_one_cycle at lr={lr}, {elapsed:.1f} s")


def csv_dls(path, target, cat_names=None, cont_names=None, bs=1024, valid_pct=0.2, seed=42):
    """`TabularDataLoaders` for a user's CSV file. Columns not named are sorted by dtype: numbers are
    continuous, everything else categorical. A numeric target with more than 20 distinct values is a
    regression, anything else a classification. Raises `ValueError` with a one-line reason on bad input."""
    path = Path(path)
    if path.is_dir(): raise ValueError(f"{path} is a directory; give the path of a CSV file")
    if not path.is_file(): raise ValueError(f"no such file: {path}")
    try: df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"could not read {path} as CSV: {str(e).splitlines()[0]}") from e
    if df.empty: raise ValueError(f"{path} has no data rows")
    named = [target] + list(cat_names or []) + list(cont_names or [])
    unknown = [c for c in named if c not in df.columns]
    if unknown: raise ValueError(f"unknown column(s) {unknown} in {path}; its columns are {list(df.columns)}")
    df = df.dropna(subset=[target]).reset_index(drop=True)
    if len(df) < 10: raise ValueError(f"{path} has {len(df)} rows with a target; at least 10 are needed")
    rest = [c for c in df.columns if c not in named]
    numeric = {c for c in rest if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])}
    cat_names = list(cat_names or []) + [c for c in rest if c not in numeric]
    cont_names = list(cont_names or []) + [c for c in rest if c in numeric]
    is_regression = pd.api.types.is_numeric_dtype(df[target]) and df[target].nunique() > 20
    if is_regression: df[target] = df[target].astype('float32')
    else: df[target] = df[target].astype(str)
    splits = RandomSplitter(valid_pct, seed=seed)(range(len(df)))
    return TabularDataLoaders.from_df(df, procs=[Categorify, FillMissing, Normalize], cat_names=cat_names,
                                      cont_names=cont_names, y_names=target,
                                      y_block=RegressionBlock() if is_regression else CategoryBlock(),
                                      valid_idx=splits[1], bs=min(bs, max(2, len(splits[0]) // 2)))


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


def write_report(learn, out='l5_report', title='fastai_l5 report', notes=''):
    """Write `out/report.html` with the training curves and, for each fastai_l5 callback attached to
    `learn`, its plot (PNG) and its log (CSV). Returns the report's path."""
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    rec = learn.recorder
    parts = [f'<h1>{html.escape(title)}</h1><p>{html.escape(notes)}</p>']
    from .diagnose import findings_section  # Findings open the report, before any plot
    parts.append(findings_section(learn, out)[0])
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
