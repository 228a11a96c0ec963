"""What every fastai_l5 callback shares: real-step counting, columnar logs, per-epoch columns in
fastai's progress table, layer names, and per-layer plots."""
from __future__ import annotations

import csv
import math
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

__all__ = ['StepCallback', 'LogTable', 'rank0_log', 'unwrap_model', 'layer_params', 'param_layer_names', 'plot_per_layer',
           'check_in_range']


def check_in_range(name, value, lo=0., hi=1., lo_open=False, hi_open=True):
    "Raise `ValueError` naming `name` and `value` unless `value` lies in the interval lo..hi."
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi) or (isinstance(value, float) and math.isnan(value)):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name}={value!r} is outside {interval}")
    return value


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
    """A columnar log: rows arrive in blocks (scalars, lists, numpy arrays or tensors), are kept as
    numpy arrays, and become a `DataFrame` on demand. Tensor blocks stay where they were computed
    until `flush` moves them to the host together, so logging adds no host sync per row.

    With `path`, every flushed block is also appended to a CSV file as training goes (a crash loses
    at most the unflushed rows); with `keep=False` too, memory holds only the unflushed rows and
    `.df` reads the file back."""
    def __init__(self, columns, path=None, keep=True, flush_every=64):
        if not keep and path is None: raise ValueError("keep=False needs a `path` to stream the rows to")
        self.columns, self.path, self.keep, self.flush_every = list(columns), path, keep, flush_every
        self.clear()

    def clear(self):
        "Forget every row, and start `path` again if there is one."
        self._pending, self._blocks, self._n_rows = [], [], 0
        if self.path is not None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, 'w', newline='') as f: csv.writer(f).writerow(self.columns)

    def append(self, **cols):
        "Add a block of rows: every column is given, scalars are repeated to the block's length."
        missing = set(self.columns) - set(cols)
        if missing: raise KeyError(f"LogTable.append is missing columns {sorted(missing)}")
        n = max((len(v) for v in cols.values() if _is_seq(v)), default=1)
        self._pending.append((n, {c: cols[c] for c in self.columns}))
        if len(self._pending) >= self.flush_every: self.flush()

    def flush(self):
        "Move the pending blocks to the host as one numpy block per column."
        if not self._pending: return
        pending, self._pending = self._pending, []
        n = sum(k for k, _ in pending)
        block = {c: _concat([_to_host(cols[c], k) for k, cols in pending]) for c in self.columns}
        self._n_rows += n
        if self.path is not None:
            pd.DataFrame(block, columns=self.columns).to_csv(self.path, mode='a', header=False, index=False)
        if self.keep: self._blocks.append(block)

    def __len__(self): return self._n_rows + sum(k for k, _ in self._pending)

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


def rank0_log(columns, path=None, keep=True, **kwargs):
    """A `LogTable` that only rank 0 streams to `path`: under `torch.distributed` the other processes keep
    theirs in memory (and log nothing into it), so they never truncate or write the file."""
    if rank_distrib() != 0 and path is not None: path, keep = None, True
    return LogTable(columns, path=path, keep=keep, **kwargs)


def _is_seq(v):
    if isinstance(v, torch.Tensor): return v.ndim > 0
    return isinstance(v, (list, tuple, np.ndarray)) and np.ndim(v) > 0


def _to_host(v, n):
    if isinstance(v, torch.Tensor): v = v.detach().float().cpu().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
    if not _is_seq(v): return np.full(n, v, dtype=object if isinstance(v, str) else None)
    return np.asarray(v)


def _concat(arrays):
    arrays = [a.reshape(-1) for a in arrays]
    return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]


class StepCallback(Callback):
    """Base for fastai_l5's loggers. It counts *steps*: optimizer steps that actually ran, from 1,
    across `fit` calls. fastai fires `after_step` even when `MixedPrecision` or
    `GradientAccumulation` cancelled the step, so a cancelled step is noticed in `after_cancel_step`.
    Subclasses that define `after_backward` call `super().after_backward()`; they call
    `self.count_step()` once in `after_step` and log only when it returns True.

    It also puts per-epoch summary columns in fastai's progress table (`epoch_columns`, a dict
    `{name: method_name}`): `ValueMetric`s appended to `learn.metrics` in `before_fit` (so they reach
    `CSVLogger`, W&B and TensorBoard too) and removed in `after_fit`. Subclasses that define
    `before_fit`/`after_fit` call `super()` there too. Not added under `validate`/`get_preds`
    (logger is `noop`), so those return what they always return."""
    # after MixedPrecision (10, unscales grads) and DistributedTrainer (11, swaps modules), before
    # Recorder (50), whose before_fit reads the metric names
    order, n_step, epoch_columns = 40, 0, {}

    # These run every step: they write `__dict__` directly, skipping `Callback.__setattr__`'s
    # check for shadowed Learner attributes (names here are ours alone).
    def count_step(self):
        "Call once in `after_step`: True, and `n_step` advanced, if the optimizer really stepped."
        ran = not self.__dict__.get('_step_cancelled', False)
        self.__dict__['_step_cancelled'] = False
        if ran: self.__dict__['n_step'] = self.n_step + 1
        return ran

    def after_backward(self): self.__dict__['_step_cancelled'] = False
    def after_cancel_step(self): self.__dict__['_step_cancelled'] = True

    def before_fit(self):
        self._epoch_value_metrics = L()
        if self.learn.logger is noop or not self.epoch_columns: return
        self._epoch_value_metrics = L(ValueMetric(getattr(self, meth), name) for name, meth in self.epoch_columns.items())
        self.learn.metrics = L(self.learn.metrics) + self._epoch_value_metrics

    def after_fit(self):
        ours = set(map(id, getattr(self, '_epoch_value_metrics', [])))
        if ours: self.learn.metrics = L(m for m in self.learn.metrics if id(m) not in ours)
        self._epoch_value_metrics = L()


def plot_per_layer(df, stats, layers=None, x='step', title=None, ncols=2, logy=(), fmt='-'):
    """One subplot per column in `stats`, one line per layer: a `matplotlib.figure.Figure`
    (made without pyplot, so a notebook shows it once and scripts stay headless). `x` and `fmt` (a
    matplotlib format string) are one for all subplots or a dict `{stat: value}` (default 'step', '-');
    a subplot shows the rows whose `x` is known, so one frame can hold logs of different granularity."""
    stats = L(stats)
    if not len(df): raise ValueError("nothing logged yet: train with the callback attached, then plot")
    unknown = [s for s in stats if s not in df.columns]
    if unknown: raise ValueError(f"unknown stats {unknown}; choose from {list(df.columns)}")
    if layers is not None:
        layers = L(layers)
        bad = [l for l in layers if l not in set(df['layer'])]
        if bad: raise ValueError(f"unknown layers {bad}; logged layers are {sorted(set(df['layer']))}")
        df = df[df['layer'].isin(layers)]
    ncols = min(ncols, len(stats)); nrows = math.ceil(len(stats) / ncols)
    fig = Figure(figsize=(6 * ncols, 3.2 * nrows), layout='constrained')
    axs = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, stat in zip(axs, stats):
        xs, style = (x.get(stat, 'step') if isinstance(x, dict) else x), (fmt.get(stat, '-') if isinstance(fmt, dict) else fmt)
        for layer, g in df[df[xs].notna()].groupby('layer', sort=False):
            ax.plot(g[xs].to_numpy(), g[stat].to_numpy(), style, label=str(layer), lw=1, ms=3)
        ax.set_xlabel(xs); ax.set_title(stat)
        if xs == 'epoch': ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if stat in L(logy): ax.set_yscale('log')
    for ax in axs[len(stats):]: ax.set_visible(False)
    axs[0].legend(fontsize='small', ncols=2)
    if title: fig.suptitle(title)
    return fig
