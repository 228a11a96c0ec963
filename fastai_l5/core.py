"""What every fastai_l5 callback shares: the declared logs (`Log`: each log's tag prefix, step column, index
and the meaning of every measured column, written once; `log_table` renders them), the telemetry pipeline
(`StepCallback`: real-step counting, staging on the device, one flush policy, rank 0, per-epoch columns in
fastai's progress table) and its host side (`LogTable`: numpy blocks, CSV streaming, a sink for TensorBoard/W&B),
finding a callback by type (`find_cb`), argument checks with one message shape (`check_arg`, `check_in_range`,
`check_count`), layer names, and per-layer plots.

This module imports no other module of the package. The loggers (`fastai_l5.loggers`) sit above it: when
imported (every telemetry module imports them) they add their hook to `LOGGER_HOOKS`, which
`StepCallback.before_fit` calls; so `core` never names them."""
from __future__ import annotations

import csv
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from fastai.callback.core import Callback
from fastai.learner import ValueMetric, noop
from fastai.torch_core import rank_distrib  # this `noop` is the one `Learner.no_logging` installs
from fastcore.foundation import L
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ['Log', 'log_table', 'find_cb', 'StepCallback', 'LogTable', 'rank0_log', 'is_rank0', 'unwrap_model',
           'layer_params', 'param_layer_names', 'plot_per_layer', 'new_figure', 'check_arg', 'check_in_range',
           'check_count', 'LOGGER_HOOKS']


# ---------------------------------------------------------------------------------------------------
# Argument checks: one place, one message shape (torch's `Invalid learning rate: -1`)

def check_arg(name, value, ok, want):
    "`value`, or `ValueError(f'Invalid {name}: {value!r} (must be {want})')` unless `ok`."
    if not ok: raise ValueError(f"Invalid {name}: {value!r} (must be {want})")
    return value


def _num(x): return f'{x:g}' if isinstance(x, float) else str(x)


def check_in_range(name, value, lo=0., hi=1., lo_open=False, hi_open=True):
    "`value`, or a `ValueError` naming `name` and `value` unless it is a number in the interval lo..hi (NaN never is)."
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    return check_arg(name, value, ok, f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}")


def check_count(name, value, lo=1):
    "`value` as an `int`, or a `ValueError` naming `name` unless it is an integer ≥ `lo`."
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= lo
    return int(check_arg(name, value, ok, f"an integer >= {lo}"))


# ---------------------------------------------------------------------------------------------------
# Declared logs

INDEX_MEANINGS = {
    'step': 'the optimizer step that ran (counted from 1, across fits; skipped steps are not steps)',
    'epoch': "fastai's epoch within the fit",
    'pct': 'the fraction of this fit done, as `ParamScheduler` sees it (`learn.pct_train`)',
    'layer': 'the module, by its path in `model.named_modules()`'}


@dataclass(frozen=True)
class Log:
    """One log a callback keeps, declared once: `name` is the tag prefix the loggers use (`{name}/{column}/{layer}`),
    `x` the step column (`step` or `epoch`), `index` the other columns that place a row (e.g. `layer`), `columns`
    `{column: meaning}` of the measured columns (the math, one sentence each). `attr` is the callback's property
    that reads the log as a DataFrame; `tags` the measured columns sent to TensorBoard/W&B (default all);
    `doc` the docs page that explains it."""
    name: str
    x: str
    index: tuple
    columns: dict
    attr: str = 'df'
    tags: tuple = None
    doc: str = ''

    @property
    def all_columns(self):
        "Every column of the log, in order: `x`, the index, the measured columns."
        return [self.x, *self.index, *self.columns]

    @property
    def tagged(self):
        "The measured columns the loggers send."
        return list(self.columns) if self.tags is None else list(self.tags)

    def meaning(self, column):
        "What `column` holds (the index columns' meanings are shared: `INDEX_MEANINGS`)."
        return self.columns[column] if column in self.columns else INDEX_MEANINGS.get(column, '')


def log_table(cls, fmt='markdown'):
    """The column table of a callback class's declared `logs` (or of one `Log`): one row per column, with the log
    it belongs to (`.df`, `.precise_df`), whether it is the step or index column, and its meaning. `fmt`:
    'markdown', 'html' or 'frame' (a DataFrame)."""
    logs = (cls,) if isinstance(cls, Log) else tuple(getattr(cls, 'logs', ()))
    if not logs: raise ValueError(f"{getattr(cls, '__name__', cls)!r} declares no logs (a class attribute `logs`)")
    rows = [(f'.{log.attr}', c, 'x' if c == log.x else ('index' if c in log.index else 'measured'), log.meaning(c))
            for log in logs for c in log.all_columns]
    df = pd.DataFrame(rows, columns=['log', 'column', 'kind', 'meaning'])
    if fmt == 'frame': return df
    if fmt == 'html': return df.to_html(index=False, escape=True)
    if fmt != 'markdown': raise ValueError(f"Invalid fmt: {fmt!r} (must be 'markdown', 'html' or 'frame')")
    esc = lambda v: str(v).replace('|', r'\|')
    lines = ['| ' + ' | '.join(df.columns) + ' |', '| ' + ' | '.join('---' for _ in df.columns) + ' |']
    lines += ['| ' + ' | '.join(esc(v) if i != 1 else f'`{v}`' for i, v in enumerate(r)) + ' |' for r in df.itertuples(index=False)]
    return '\n'.join(lines)


def find_cb(learn, cls):
    "The callback of type `cls` (or a subclass) attached to `learn`, or None: found by type, so a renamed subclass is found."
    return next((cb for cb in getattr(learn, 'cbs', ()) if isinstance(cb, cls)), None)


# callables `hook(cb)` that `StepCallback.before_fit` runs to wire a callback's tables to the fit's loggers;
# `fastai_l5.loggers` adds its `attach_sinks` when imported (core imports no module of the package)
LOGGER_HOOKS = []


def unwrap_model(model):
    "The module inside `DistributedDataParallel`/`DataParallel` wrappers, so layer names read the same on every rank."
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)): model = model.module
    return model


def layer_params(model):
    "`L` of `(layer, param_name, param)` for every trainable parameter, `layer` being the owning module's path (outside DDP)."
    return L((layer, f'{layer}.{pname}' if layer else pname, p)
             for layer, mod in unwrap_model(model).named_modules()
             for pname, p in mod.named_parameters(recurse=False) if p.requires_grad)


def param_layer_names(model):
    "Dict `id(param) -> (layer, param_name)` for every parameter of `model`."
    return {id(p): (layer, name) for layer, name, p in layer_params(model)}


class LogTable:
    """The host side of a log: columnar rows that arrive in blocks (scalars, lists, numpy arrays or tensors),
    are kept as numpy arrays, and become a `DataFrame` on demand. `append` only queues a block (tensors stay
    where they were computed); `flush` moves every queued block to the host at once (one device sync), appends
    it to the CSV file at `path` if there is one, hands it to `sink` if one is set, and keeps it unless
    `keep=False` (then `.df` reads the file back). When to flush is the caller's choice: `StepCallback`'s
    pipeline flushes every `flush_every` logged steps and at the end of each training phase.

    `sink`: None, or a callable taking each flushed host block, a dict column -> numpy array (how the
    rows reach TensorBoard or W&B: see `StepCallback.attach_loggers`)."""
    sink = None

    def __init__(self, columns, path=None, keep=True):
        if not keep and path is None: raise ValueError("keep=False needs a `path` to stream the rows to")
        self.columns, self.path, self.keep = list(columns), path, keep
        self.clear()

    def clear(self):
        "Forget every row, and start `path` again if there is one."
        self._queued, self._blocks, self._n_rows = [], [], 0
        if self.path is not None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, 'w', newline='') as f: csv.writer(f).writerow(self.columns)

    def append(self, **cols):
        "Queue a block of rows: every column is given, scalars are repeated to the block's length."
        missing = set(self.columns) - set(cols)
        if missing: raise KeyError(f"LogTable.append is missing columns {sorted(missing)}")
        n = max((len(v) for v in cols.values() if _is_seq(v)), default=1)
        self._queued.append((n, {c: cols[c] for c in self.columns}))

    def flush(self):
        "Move the queued blocks to the host as one numpy block per column; returns that block (None if none was queued)."
        if not self._queued: return None
        queued, self._queued = self._queued, []
        n = sum(k for k, _ in queued)
        block = {c: _concat([_to_host(cols[c], k) for k, cols in queued]) for c in self.columns}
        self._n_rows += n
        if self.path is not None:
            pd.DataFrame(block, columns=self.columns).to_csv(self.path, mode='a', header=False, index=False)
        if self.keep: self._blocks.append(block)
        if self.sink is not None: self.sink(block)
        return block

    def __len__(self): return self._n_rows + sum(k for k, _ in self._queued)

    @property
    def df(self):
        "All rows logged so far, as a `DataFrame` with the table's columns."
        self.flush()
        if not self.keep and self.path is not None: return pd.read_csv(self.path)
        if not self._blocks: return pd.DataFrame({c: [] for c in self.columns})
        return pd.DataFrame({c: _concat([b[c] for b in self._blocks]) for c in self.columns})

    def nbytes(self):
        "Bytes held in memory by the flushed rows."
        return sum(a.nbytes for b in self._blocks for a in b.values())


def is_rank0():
    "Whether this process keeps the logs: always without `torch.distributed`, rank 0 alone under it."
    return rank_distrib() == 0


def rank0_log(columns, path=None, keep=True):
    """A `LogTable` that only rank 0 streams to `path`: under `torch.distributed` the other processes keep
    theirs in memory (and log nothing into it), so they never truncate or write the file."""
    if not is_rank0() and path is not None: path, keep = None, True
    return LogTable(columns, path=path, keep=keep)


def _is_seq(v):
    if isinstance(v, torch.Tensor): return v.ndim > 0
    return isinstance(v, (list, tuple, np.ndarray)) and np.ndim(v) > 0


def _to_host(v, n):
    if isinstance(v, torch.Tensor):
        # floats as float32 (half/bfloat16 widened), float64 kept
        if v.is_floating_point() and v.dtype != torch.float64: v = v.float()
        v = v.detach().cpu().numpy()
    if not _is_seq(v): return np.full(n, v, dtype=object if isinstance(v, str) else None)
    return np.asarray(v)


def _concat(arrays):
    arrays = [a.reshape(-1) for a in arrays]
    return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]


class StepCallback(Callback):
    """The telemetry pipeline every fastai_l5 callback shares: a subclass declares *what* it logs (`logs`, a
    tuple of `Log`) and measures it; this class owns how a measurement becomes a logged row.

    - **Logs.** One `LogTable` per declared `Log`, in `self.tables[log.name]`; the first is the step log that
      staging feeds (`self.table`, read by `.df`), any other is appended by the subclass itself (BNDrift's
      `precise_df`). `log_df(name)` reads any of them.
    - **Steps.** `n_step` counts optimizer steps that really ran, from 1, across fits. fastai fires `after_step`
      even when `MixedPrecision` or `GradientAccumulation` cancelled the step, so a subclass calls
      `self.count_step()` once in `after_step`: True (and `n_step` advanced) if the step ran.
    - **Staging.** `self.stage(entry)` keeps one logged step's measurement, any object (its tensors stay on
      their device: no host sync per step). The staged entries are flushed every `flush_every` entries, at the
      end of every training phase, after the fit and when `.df` is read: the subclass's `rows(entries)` turns
      them into one block (dict column -> sequence of values, tensors allowed) and `self.table` moves it to the
      host, its CSV file and its `sink` in one copy.
    - **Rank 0.** Under `torch.distributed` only rank 0 logs: `self.logs_here` (set in `before_fit`) is False
      elsewhere, and a subclass measures and stages only where it is True. `open_log(path, keep)` (called in
      `__init__`) streams the step log to `path` on rank 0 only.
    - **Pickling** (`learn.export`). The tables, the staged entries and the names a subclass adds to
      `_stateattrs` are left out; an unpickled callback (`load_learner`) runs `_init_state` and starts fresh
      logs in memory, never touching the CSV file. `n_step` is kept.
    - **Progress table.** `epoch_columns` `{name: method_name}` become `ValueMetric`s appended to
      `learn.metrics` in `before_fit` (so they reach `CSVLogger`, W&B and TensorBoard too) and removed in
      `after_fit`; not under `validate`/`get_preds` (logger `noop`), so those return what they always return.
      `self.epoch_mean(column)` is the mean of a logged column over this epoch's rows (NaN left out).
    - **Loggers.** `before_fit` runs the `LOGGER_HOOKS` (`fastai_l5.loggers` wires each table's `sink` to a
      TensorBoard/W&B logger of the same fit, by the table's `Log`).

    A subclass calls `super().__init__()` and, if it defines `before_fit`, `before_epoch`, `after_train`,
    `after_fit` or `after_backward`, `super()` there."""
    # after MixedPrecision (10, unscales grads) and DistributedTrainer (11, swaps modules), before
    # Recorder (50), whose before_fit reads the metric names
    order, n_step, epoch_columns = 40, 0, {}
    logs = ()          # the declared logs (`Log`); the first is the staged step log
    flush_every = 64   # staged entries that move to the host together
    logs_here, table = True, None
    _stateattrs = ('table', 'tables', '_staged', '_epoch_sums')

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._init_state()  # fastai's `Callback.__init__` does not reach `Stateful`'s

    def _init_state(self):
        "Fresh, empty logs in memory: what a new callback starts with and what an unpickled one gets."
        super()._init_state()
        tables = {log.name: LogTable(log.all_columns) for log in self.logs}
        self._set(tables=tables, table=next(iter(tables.values()), None), _staged=[], _epoch_sums={})

    def open_log(self, path=None, keep=True):
        "Start the step log: in memory (`keep`) and, on rank 0, streamed to the CSV file at `path` (see `LogTable`)."
        table = rank0_log(self.logs[0].all_columns, path=path, keep=keep)
        self._set(table=table, tables={**self.tables, self.logs[0].name: table})

    def log_df(self, name):
        "The rows of the declared log `name`, as a `DataFrame`."
        if name == self.logs[0].name: self.flush_log()
        return self.tables[name].df

    def _set(self, **attrs):
        """Set attributes without `Callback.__setattr__`'s check for names that shadow the `Learner`'s (a lookup
        through the learner per write, on the hot path; our names never shadow)."""
        self.__dict__.update(attrs)

    # ---- steps
    def count_step(self):
        "Call once in `after_step`: True, and `n_step` advanced, if the optimizer really stepped."
        ran = not self.__dict__.get('_step_cancelled', False)
        if ran: self._set(n_step=self.n_step + 1)
        else: self._set(_step_cancelled=False)
        return ran

    def after_backward(self): self._set(_step_cancelled=False)
    def after_cancel_step(self): self._set(_step_cancelled=True)

    # ---- staging and flushing
    def stage(self, entry):
        "Keep one logged measurement until the next flush."
        self._staged.append(entry)
        if len(self._staged) >= self.flush_every: self.flush_log()

    def rows(self, entries):
        "The log block of `entries` (as staged): a dict `{column: sequence or scalar}` over the step log's columns."
        raise NotImplementedError

    def flush_log(self):
        "Move the staged entries into the log as one block, and add them to this epoch's column means."
        if not self._staged: return
        staged = self._staged
        self._set(_staged=[])
        self.table.append(**self.rows(staged))
        block = self.table.flush()
        for c, a in block.items():
            if a.dtype.kind != 'f': continue
            ok = ~np.isnan(a)
            s = self._epoch_sums.setdefault(c, [0., 0])
            s[0] += float(a[ok].sum()); s[1] += int(ok.sum())

    def epoch_mean(self, column):
        "Mean of `column` over the rows logged since this epoch began (NaN where none are, or none is a number)."
        self.flush_log()
        total, n = self._epoch_sums.get(column, (0., 0))
        return total / n if n else math.nan

    def clear_log(self):
        "Forget every logged row of every log (a streamed CSV file starts again)."
        self._set(_staged=[], _epoch_sums={})
        for t in self.tables.values(): t.clear()

    @property
    def df(self):
        "Every row of the step log (the first declared `Log`), as a `DataFrame`."
        return self.log_df(self.logs[0].name)

    def attach_loggers(self):
        "Wire this callback's tables to the fit's `TensorBoardCallback`/`WandbCallback`, if any (`LOGGER_HOOKS`)."
        for hook in LOGGER_HOOKS: hook(self)

    # ---- events
    def before_fit(self):
        self.logs_here = is_rank0()
        self.attach_loggers()
        self._epoch_value_metrics = L()
        if self.learn.logger is noop or not self.epoch_columns: return
        self._epoch_value_metrics = L(ValueMetric(getattr(self, meth), name) for name, meth in self.epoch_columns.items())
        self.learn.metrics = L(self.learn.metrics) + self._epoch_value_metrics

    def before_epoch(self): self._set(_epoch_sums={})

    def after_train(self): self.flush_log()  # a streamed log on disk is never more than an epoch behind

    def after_fit(self):
        self.flush_log()
        ours = set(map(id, getattr(self, '_epoch_value_metrics', [])))
        if ours: self.learn.metrics = L(m for m in self.learn.metrics if id(m) not in ours)
        self._epoch_value_metrics = L()


def _in_notebook():
    try: from IPython import get_ipython
    except ImportError: return False
    return hasattr(get_ipython(), 'kernel')


def new_figure(**kwargs):
    """A figure for a `.plot()` to draw in. In a Jupyter kernel a plain `matplotlib.figure.Figure` (the notebook
    shows the returned figure once); elsewhere a pyplot figure, so a script can `plt.show()` it (close it with
    `plt.close(fig)` when done). `fig.savefig(path)` works in both."""
    if _in_notebook(): return Figure(**kwargs)
    import matplotlib.pyplot as plt
    return plt.figure(**kwargs)


def plot_per_layer(df, stats, layers=None, x='step', title=None, ncols=2, logy=(), fmt='-', ax=None):
    """One panel per column in `stats`, one line per layer; returns the figure (see `new_figure`). `x` and `fmt`
    (a matplotlib format string) are one for all panels or a dict `{stat: value}` (default 'step', '-'); a panel
    shows the rows whose `x` is known, so one frame can hold logs of different granularity. With `ax` (one stat
    only) it draws that single panel into the given matplotlib `Axes`."""
    stats = L(stats)
    if not len(df): raise ValueError("nothing logged yet: train with the callback attached, then plot")
    unknown = [s for s in stats if s not in df.columns]
    if unknown: raise ValueError(f"unknown stats {unknown}; choose from {list(df.columns)}")
    if ax is not None and len(stats) != 1: raise ValueError(f"ax= draws one panel: pass one stat, not {len(stats)}")
    if layers is not None:
        layers = L(layers)
        bad = [l for l in layers if l not in set(df['layer'])]
        if bad: raise ValueError(f"unknown layers {bad}; logged layers are {sorted(set(df['layer']))}")
        df = df[df['layer'].isin(layers)]
    if ax is None:
        ncols = min(ncols, len(stats)); nrows = math.ceil(len(stats) / ncols)
        fig = new_figure(figsize=(6 * ncols, 3.2 * nrows), layout='constrained')
        axs = fig.subplots(nrows, ncols, squeeze=False).flatten()
        if title: fig.suptitle(title)
    else: fig, axs = ax.figure, [ax]
    for ax, stat in zip(axs, stats):
        xs, style = (x.get(stat, 'step') if isinstance(x, dict) else x), (fmt.get(stat, '-') if isinstance(fmt, dict) else fmt)
        for layer, g in df[df[xs].notna()].groupby('layer', sort=False):
            ax.plot(g[xs].to_numpy(), g[stat].to_numpy(), style, label=str(layer), lw=1, ms=3)
        ax.set_xlabel(xs); ax.set_title(stat)
        if xs == 'epoch': ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if stat in L(logy): ax.set_yscale('log')
    for ax in axs[len(stats):]: ax.set_visible(False)
    axs[0].legend(fontsize='small', ncols=2)
    return fig
