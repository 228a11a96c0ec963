"""Telemetry in the loggers fastai users already run: when fastai's `TensorBoardCallback` or `WandbCallback`
is in the same fit, every per-step, per-layer column of our callbacks goes there as scalars too, tagged
`momentum/{stat}/{layer}`, `dropout/p/{layer}`, `bn/{stat}/{layer}` (at the callback's `step`) and
`bn_precise/{stat}/{layer}` (at the measured `epoch`). What goes where is read from each callback's declared
`logs` (`core.Log`: the tag prefix, the x column, the columns sent), never guessed from column names.

The writes ride on the callbacks' own flushes: `LogTable.flush` hands each host block it builds to the table's
`sink`, so the hot path gains nothing. With neither logger in `learn.cbs` no sink is set and neither package
is imported (they are looked up in `sys.modules`: a fastai logger callback exists only if its module was
imported). Under distributed training only rank 0 sends.

Importing this module adds `attach_sinks` to `core.LOGGER_HOOKS`, which every `StepCallback` runs in
`before_fit` (core imports nothing of the package; each telemetry module imports this one).

TensorBoard takes any step, so a block goes to the event file as it is flushed, one event per step. W&B
keeps one history row per step of its own, which `WandbCallback` advances once per training batch, and
refuses rows at earlier steps; so each callback's rows are plotted against its own x-axis
(`define_metric('momentum/*', step_metric='momentum/step')`) and merged into W&B's rows one per training
batch as they come, the rows still queued when the fit ends being written after `WandbCallback` closes it."""
from __future__ import annotations

import sys
from collections import deque

import numpy as np
from fastai.callback.core import Callback
from fastai.torch_core import rank_distrib

from .core import LOGGER_HOOKS, find_cb

__all__ = ['attach_sinks', 'fix_wandb_config', 'LoggerBridge', 'log_tables']

_TENSORBOARD, _WANDB = ('fastai.callback.tensorboard', 'TensorBoardCallback'), ('fastai.callback.wandb', 'WandbCallback')


def declared_tables(cb):
    "`[(Log, LogTable)]` for every log `cb` declares (none for a callback that declares no `logs`)."
    tables = getattr(cb, 'tables', None) or {}
    return [(log, tables[log.name]) for log in getattr(cb, 'logs', ()) if log.name in tables]


def log_tables(cb):
    "Every `LogTable` of the logs a callback declares."
    return [t for _, t in declared_tables(cb)]


def _logger_class(where):
    "fastai's logger callback class, if its module was imported (else no instance of it can exist)."
    return getattr(sys.modules.get(where[0]), where[1], None)


def logger_callbacks(learn):
    "fastai's `TensorBoardCallback`s and `WandbCallback`s in `learn.cbs`, found without importing either package."
    classes = tuple(c for c in map(_logger_class, (_TENSORBOARD, _WANDB)) if c is not None)
    return [cb for cb in learn.cbs if classes and isinstance(cb, classes)]


def block_rows(block, prefix, x, stats):
    """The rows of a host block (column -> array, rows grouped by `x`) as `[(x value, tags, values)]`, one per x,
    tags `{prefix}/{stat}/{layer}`."""
    xs = block[x]
    if not len(xs): return []
    cut = np.flatnonzero(xs[1:] != xs[:-1]) + 1
    bounds = zip(np.r_[0, cut], np.r_[cut, len(xs)])
    layers = [str(l) for l in block['layer']]
    tags = np.array([[f'{prefix}/{s}/{l}' for s in stats] for l in layers], dtype=object)
    vals = np.stack([np.asarray(block[s], dtype=np.float64) for s in stats], 1)
    return [(int(xs[a]), tags[a:b].ravel().tolist(), vals[a:b].ravel().tolist()) for a, b in bounds]


class _TensorBoard:
    """Writes a block's rows to a `TensorBoardCallback`'s event file, at their own step: one event per step holding
    all its scalars (a tenth of the time of one `add_scalar` call per scalar). Without TensorFlow installed,
    TensorBoard checksums its records in Python, about a microsecond per byte of tags and values, in its writer
    thread: per-layer scalars at every step of a large model cost that much; `every=10` a tenth of it."""
    def __init__(self, cb): self.cb = cb
    def send(self, route, rows):
        writer = getattr(self.cb, 'writer', None)  # made in its before_fit, which runs after ours
        if writer is None or not getattr(self.cb, 'run', False): return
        from tensorboard.compat.proto.summary_pb2 import Summary
        for x, tags, vals in rows:
            values = [Summary.Value(tag=t, simple_value=v) for t, v in zip(tags, vals)]
            writer.file_writer.add_summary(Summary(value=values), x)


class _Wandb:
    """Queues a block's rows for W&B, each row a dict with its own x-axis value (`{prefix}/{x}`); `pump` merges one
    queued row per route into W&B's current row, `drain` writes the rest as rows of their own."""
    def __init__(self): self.queues, self.defined = {}, set()

    def send(self, route, rows):
        prefix, x, _ = route
        if prefix not in self.defined:
            import wandb
            wandb.define_metric(f'{prefix}/{x}')
            wandb.define_metric(f'{prefix}/*', step_metric=f'{prefix}/{x}')
            self.defined.add(prefix)
        self.queues.setdefault(prefix, deque()).extend({f'{prefix}/{x}': xv, **dict(zip(tags, vals))}
                                                        for xv, tags, vals in rows)

    def _merged(self):
        row = {}
        for q in self.queues.values():
            if q: row.update(q.popleft())
        return row

    def pump(self):
        import wandb
        row = self._merged()
        if row and wandb.run is not None: wandb.log(row, commit=False)

    def drain(self):
        import wandb
        while wandb.run is not None and (row := self._merged()): wandb.log(row)


class _Sink:
    "A table's `sink`: sends every flushed block to the attached loggers."
    def __init__(self, route, targets): self.route, self.targets = route, targets
    def __call__(self, block):
        rows = block_rows(block, *self.route)
        for t in self.targets: t.send(self.route, rows)


class LoggerBridge(Callback):
    """Added to the `Learner` for a fit with TensorBoard or W&B attached: after `WandbCallback` (order 51) logs a
    training batch it merges one queued row per callback into that batch's W&B row; after the fit it writes the
    rows still queued and takes the sinks off the tables."""
    order, _stateattrs = 52, ('targets', 'wandb', 'tables')

    def __init__(self, loggers):
        super().__init__()
        tb_cls, wandb_cls = _logger_class(_TENSORBOARD), _logger_class(_WANDB)
        tb = [_TensorBoard(cb) for cb in loggers if tb_cls is not None and isinstance(cb, tb_cls)]
        self.wandb = _Wandb() if wandb_cls is not None and any(isinstance(cb, wandb_cls) for cb in loggers) else None
        self.targets, self.tables = tb + ([self.wandb] if self.wandb else []), []

    def attach(self, cb):
        "Send every log `cb` declares: tags `{log.name}/{column}/{layer}` at the log's `x`, for its tagged columns."
        for log, t in declared_tables(cb):
            t.sink = _Sink((log.name, log.x, log.tagged), self.targets)
            self.tables.append(t)

    def after_batch(self):
        if self.wandb is not None and self.learn.training: self.wandb.pump()

    def after_fit(self):
        if self.wandb is not None: self.wandb.drain()
        for t in self.tables: t.sink = None
        self.tables = []
        self.learn.remove_cb(self)




def attach_sinks(cb):
    """Call in a callback's `before_fit`: when the fit has a `TensorBoardCallback` or `WandbCallback` (and this is
    rank 0), set a `sink` on each of `cb`'s tables that sends every flushed block there; else set none."""
    for t in log_tables(cb): t.sink = None
    learn = cb.learn
    if rank_distrib() != 0: return
    bridge = find_cb(learn, LoggerBridge)
    if bridge is None:
        loggers = logger_callbacks(learn)
        if not loggers: return
        bridge = LoggerBridge(loggers)
        learn.add_cb(bridge)
    bridge.attach(cb)


if attach_sinks not in LOGGER_HOOKS: LOGGER_HOOKS.append(attach_sinks)


def _plain(v, depth=0):
    """`v` rebuilt as W&B's config can store it, leaving `v` itself untouched: numbers and strings as they are; lists
    and dicts as new ones; an object as a dict of its `__init__` arguments (fastcore's `init_args`) with its name
    under `_name`, or by its name alone (a function, a model past `depth` 6)."""
    from fastcore.basics import init_args
    if v is None or isinstance(v, (bool, int, float, str)): return v
    if isinstance(v, (list, tuple)): return [_plain(x, depth + 1) for x in v]
    if isinstance(v, dict): return {str(k): _plain(x, depth + 1) for k, x in v.items()}
    name = getattr(v, '__name__', None) or type(v).__name__
    try: args = init_args(v) if depth < 6 else None
    except (TypeError, ValueError): args = None
    return {**{str(k): _plain(a, depth + 1) for k, a in args.items()}, '_name': name} if args else name


def fix_wandb_config():
    """Work around fastai issue #4173 (open): with fastcore ≥ 2.2.21 fastai's `WandbCallback.before_fit` raises
    `TypeError: vars() argument must have __dict__ attribute` while formatting the run's config, for any learner,
    because its `_format_config_value` asks every value (ints, strings, ...) for its `__init__` arguments; and the
    config it builds keeps objects (the model, the loss function) that W&B cannot store, so it prints "WandbCallback
    could not log config parameters" and logs none. Call this once before fitting with `WandbCallback`: each entry of
    the config is rebuilt from plain values (objects by their name and `__init__` arguments), in new containers, so
    the callbacks' own attributes that fastai's config holds (a `ParamScheduler`'s `scheds`) are never changed.
    Changes nothing else, and nothing twice."""
    import fastai.callback.wandb as fw
    if getattr(fw._format_config, 'fixed_by_fastai_l5', False): return
    def _format_config(config):
        "Replace each entry of `config` (fastai reads it back in place) by its plain copy."
        for k, v in config.items(): config[k] = _plain(v)
        return config
    _format_config.fixed_by_fastai_l5 = True
    fw._format_config = _format_config
