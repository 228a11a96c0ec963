"""The timed fits behind the overhead, memory and scaling sections: the variants (which callbacks a run attaches,
and the role its row plays), `ReadFloor`, W&B's offline run and gradient hooks, and `EventClock`, which measures
the time spent inside callbacks from outside them."""
from __future__ import annotations

import contextlib
import gc
import io
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from fastai.callback.core import Callback, event
from fastai.callback.hook import ActivationStats
import fastai.callback.progress  # noqa: F401 (fastai's default bar, and `Learner.no_bar`)
from fastai.callback.schedule import SchedNo  # also patches in `Learner.fit_one_cycle`
from fastai.tabular.learner import tabular_learner
from fastai.tabular.model import tabular_config
from fastai.torch_core import set_seed

from ..loggers import LoggerBridge, fix_wandb_config

__all__ = ['Variant', 'ReadFloor', 'EventClock', 'variants', 'learner', 'timed_fit', 'fit_runs', 'counted', 'installed',
           'wandb_run', 'FLOOR_FACTOR', 'SHARE_TARGETS', 'READ_FLOOR', 'WANDB_ALONE', 'TB_ALONE', 'wandb_name']

# Targets of our variants, judged on the share of the fit spent inside the callback (issue 16).
FLOOR_FACTOR = 1.1                                # MomentumLogger(every=1) share ≤ 1.1 × ReadFloor's share
SHARE_TARGETS = {'every10': 0.012, 'BNDrift': 0.01, 'DropoutSchedule': 0.005, 'all three': 0.04}


@dataclass
class Variant:
    """One overhead run: `make_cbs()` builds its callbacks afresh; `role` is 'baseline' (the plain fit), 'noise' (the
    plain fit again, A/A), 'ours' (judged on `target`), 'floor' (`ReadFloor`), 'reference' (fastai's) or 'wandb'
    (fastai's W&B callback, with `watch_freq`: `wandb.watch(log='gradients', log_freq=watch_freq)` before the fit).
    `target(rows)` gives `(measure, limit, label)`, `rows` being this thread setting's rows by variant name.
    `every`: for a variant with `MomentumLogger`, its logging period (compared with W&B's histograms at that frequency)."""
    name: str
    make_cbs: Callable
    role: str
    target: Callable | None = None
    watch_freq: int | None = None
    every: int | None = None


class ReadFloor(Callback):
    """A reference for the cost of per-step optimizer telemetry, not a feature: the least any such callback must do
    to see the update, the gradient and the moments. It copies p before the step, and after it reads g, p, that copy
    and every tensor of the optimizer state once (one 2-norm each, one multi-tensor call), computing nothing else."""
    order = 40

    @torch.no_grad()
    def before_step(self):
        self.ps = [p for pg in self.opt.param_lists for p in pg if p.grad is not None]
        if len(getattr(self, 'before', ())) != len(self.ps): self.before = [torch.empty_like(p) for p in self.ps]
        torch._foreach_copy_(self.before, self.ps)

    @torch.no_grad()
    def after_step(self):
        moments = [t for p in self.ps for t in self.opt.state[p].values() if isinstance(t, torch.Tensor)]
        torch._foreach_norm([p.grad for p in self.ps] + self.before + self.ps + moments)

    def after_fit(self): self.ps = self.before = None



READ_FLOOR = '+read floor (reference)'
WANDB_ALONE = '+W&B (WandbCallback, log=None)'
TB_ALONE = '+TensorBoard (TensorBoardCallback)'


def wandb_name(freq): return f'+W&B gradients, log_freq={freq}'


def _share_target(limit, what):
    return lambda rows: ('share', limit, f'share <= {limit:.1%}{what}')


def _floor_target(rows):
    floor = rows[READ_FLOOR]['share'] if READ_FLOOR in rows else math.nan
    return 'share', FLOOR_FACTOR * floor, f'share <= {FLOOR_FACTOR}x read floor ({FLOOR_FACTOR * floor:.2%})'


def variants(cfg, with_wandb=False, tb_dir=None):
    "Every overhead variant, plain first; the W&B ones `with_wandb`, the TensorBoard ones writing under `tb_dir`."
    from ..momentum import MomentumLogger
    from ..dropout import DropoutSchedule
    from ..batchnorm import BNDrift
    # a schedule (called every batch, p set on every module) that keeps the model's own p: a schedule that
    # lowers p would also make dropout itself cheaper (torch skips p=0) and hide the callback's cost
    sched = SchedNo(cfg.p, cfg.p)
    ours = dict(MomentumLogger=lambda: [MomentumLogger()], DropoutSchedule=lambda: [DropoutSchedule(sched)],
                BNDrift=lambda: [BNDrift()])
    v = [Variant('plain', lambda: [], 'baseline'), Variant('plain (A/A repeat)', lambda: [], 'noise'),
         Variant('+MomentumLogger', ours['MomentumLogger'], 'ours', _floor_target, every=1),
         Variant('+MomentumLogger(every=10)', lambda: [MomentumLogger(every=10)], 'ours',
                 _share_target(SHARE_TARGETS['every10'], ''), every=10),
         Variant('+DropoutSchedule', ours['DropoutSchedule'], 'ours', _share_target(SHARE_TARGETS['DropoutSchedule'], '')),
         Variant('+BNDrift', ours['BNDrift'], 'ours', _share_target(SHARE_TARGETS['BNDrift'], '')),
         Variant('+all three', lambda: [cb for f in ours.values() for cb in f()], 'ours',
                 _share_target(SHARE_TARGETS['all three'], ' (was: <= 1.04x wall)')),
         Variant(READ_FLOOR, lambda: [ReadFloor()], 'floor'),
         Variant('+ActivationStats (fastai)', lambda: [ActivationStats()], 'reference')]
    if with_wandb:
        from fastai.callback.wandb import WandbCallback
        wandb_cb = lambda: WandbCallback(log=None, log_preds=False)
        v.append(Variant(WANDB_ALONE, lambda: [wandb_cb()], 'wandb'))
        v += [Variant(wandb_name(f), lambda: [wandb_cb()], 'wandb', watch_freq=f) for f in cfg.wandb_freqs]
        v += [Variant('+MomentumLogger -> W&B', lambda: [MomentumLogger(), wandb_cb()], 'wandb', every=1),
              Variant('+MomentumLogger(every=10) -> W&B', lambda: [MomentumLogger(every=10), wandb_cb()], 'wandb',
                      every=10)]
    if tb_dir is not None:
        from fastai.callback.tensorboard import TensorBoardCallback
        tb_cb = lambda: TensorBoardCallback(tempfile.mkdtemp(dir=tb_dir), trace_model=False, log_preds=False)
        v += [Variant(TB_ALONE, lambda: [tb_cb()], 'tensorboard'),
              Variant('+MomentumLogger -> TensorBoard', lambda: [MomentumLogger(), tb_cb()], 'tensorboard', every=1),
              Variant('+MomentumLogger(every=10) -> TensorBoard', lambda: [MomentumLogger(every=10), tb_cb()],
                      'tensorboard', every=10)]
    return v


def installed(module):
    try: __import__(module)
    except ImportError: return False
    return True


@contextmanager
def wandb_run(active):
    "An offline W&B run for the W&B variants (no account, no network), finished afterwards; nothing when not `active`."
    if not active: yield; return
    import wandb
    saved = {k: os.environ.get(k) for k in ('WANDB_MODE', 'WANDB_SILENT')}
    os.environ.update(WANDB_MODE='offline', WANDB_SILENT='true')
    fix_wandb_config()
    with tempfile.TemporaryDirectory() as tmp:
        run = wandb.init(project='fastai_l5_bench', dir=tmp)
        try: yield
        finally:
            run.finish()
            for k, v in saved.items():
                if v is None: os.environ.pop(k, None)
                else: os.environ[k] = v


@contextmanager
def watched(learn, freq):
    "W&B's gradient histograms on `learn.model` every `freq` steps (what `WandbCallback(log='gradients')` sets up)."
    if freq is None: yield; return
    import wandb
    from fastai.callback.wandb import WandbCallback
    called = WandbCallback._wandb_watch_called
    WandbCallback._wandb_watch_called = True   # else fastai's callback watches (once per process) at log_freq=1000
    wandb.watch(learn.model, log='gradients', log_freq=freq)
    try: yield
    finally:
        wandb.unwatch(learn.model)
        WandbCallback._wandb_watch_called = called


# time inside callbacks, measured from outside

_EVENTS = [e for e in vars(event) if not e.startswith('_')]


class EventClock:
    """Seconds spent inside the event methods (`before_fit`, `after_step`, ...) of callbacks of the given classes.
    While the clock is entered each event method those classes have is replaced, on the class, by a wrapper that
    adds the call's `perf_counter` time to `seconds` (calls nested in a timed one are not counted twice); leaving
    restores the classes. The callbacks themselves carry no timing code."""
    def __init__(self, classes): self.classes, self.seconds, self._depth, self._saved = list(dict.fromkeys(classes)), 0., 0, []

    def _timed(self, f):
        clock, perf = self, time.perf_counter
        def timed(*args, **kwargs):
            if clock._depth: return f(*args, **kwargs)
            clock._depth = 1
            t0 = perf()
            try: return f(*args, **kwargs)
            finally:
                clock.seconds += perf() - t0
                clock._depth = 0
        return timed

    def __enter__(self):
        for cls in self.classes:
            for ev in _EVENTS:
                f = getattr(cls, ev, None)
                if not callable(f): continue
                self._saved.append((cls, ev, cls.__dict__.get(ev)))
                setattr(cls, ev, self._timed(f))
        return self

    def __exit__(self, *exc):
        for cls, ev, own in reversed(self._saved):
            if own is None: delattr(cls, ev)
            else: setattr(cls, ev, own)
        self._saved = []


def learner(dls, layers, p, cbs=()):
    """A fresh flights learner from a fixed seed; every variant gets the same model, whose every dropout
    module (embeddings and hidden layers) has p, so a constant schedule of p changes no work."""
    set_seed(0)
    return tabular_learner(dls, layers=layers, config=tabular_config(ps=[p] * len(layers), embed_p=p), cbs=list(cbs))


def timed_fit(learn, classes=()):
    """`(wall, cpu, share)` for one epoch of `fit_one_cycle` (no progress bar, no logging), nothing else timed: wall
    and process CPU seconds (the latter less sensitive to other jobs), and the share of the wall time spent inside
    the event methods of callbacks of `classes`."""
    gc.collect()
    with learn.no_bar(), learn.no_logging(), EventClock(classes) as clock:
        t0, c0 = time.perf_counter(), time.process_time()
        learn.fit_one_cycle(1)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, clock.seconds / wall


def fit_runs(dls, layers, p, variants, keep, extra):
    """One run function per variant, returning wall seconds; its CPU seconds and in-callback share go to
    `extra[name]` as `(cpu, share)` and its learner to `keep[name]` (the last run's is kept)."""
    def make(v):
        def run():
            keep.pop(v.name, None)
            cbs = v.make_cbs()
            learn = learner(dls, layers, p, cbs)
            # fastai's WandbCallback prints a config warning each fit: kept out of the table
            quiet = contextlib.redirect_stdout(io.StringIO()) if v.role == 'wandb' else contextlib.nullcontext()
            with watched(learn, v.watch_freq), quiet:
                wall, c, share = timed_fit(learn, [type(cb) for cb in cbs] + [LoggerBridge])
            keep[v.name] = learn
            extra.setdefault(v.name, []).append((c, share))
            return wall
        return run
    return {v.name: make(v) for v in variants}


def counted(extra, rounds):
    "`(cpu, share)` lists of the counted rounds (the warm-up's left out)."
    return {k: tuple(map(list, zip(*v[len(v) - rounds:]))) for k, v in extra.items()}


