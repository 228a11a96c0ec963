"""`fastai-l5 bench`: the numbers behind fastai_l5's cost claims, measured side by side in one run.

Five sections, each a `DataFrame` whose rows state their target and whether it was met:

1. `overhead`: one epoch of `fit_one_cycle` on the flights `tabular_learner`, plain and with each of our
   callbacks, all three, fastai's `ActivationStats`, `ReadFloor` (the least any per-step optimizer telemetry
   costs: copy p, then read g, p, the copy and the optimizer state once), and, when `wandb` is installed,
   fastai's `WandbCallback` (offline) alone, with W&B's gradient histograms (`wandb.watch(log='gradients')`
   at `log_freq` 1000, 10 and 1) and with `MomentumLogger` sending its columns to it, and likewise
   fastai's `TensorBoardCallback` alone and with `MomentumLogger` sending to it. Variants run interleaved
   (A B C … A B C …) after a warm-up round; every run builds a fresh learner from the same seed and times only
   the fit. Two measures per variant:
   - `ratio`: the median over rounds of t(variant)/t(plain) *within* a round, so slow phases of a shared
     machine hit both sides alike; a second plain run per round (A/A) shows how finely it resolves (±5% on a
     shared machine, too coarse for a callback costing 1%).
   - `share`: the time spent inside the variant's callbacks' own event methods, as a share of the fit's wall
     time. The callbacks carry no timing code: `EventClock` wraps their event methods from outside during the
     fit. It resolves what the wall time cannot, so the targets are judged on it. (Work a callback does in
     hooks inside the model, as `ActivationStats` and `wandb.watch` do, is not in its share: see its ratio.)
   Both at torch's default thread count, as users run, and at one thread (`threads` column).
2. `optimizer`: `opt.step()` time of ours against fastai's native optimizers and torch.optim's foreach
   ones, same hyper-parameters, on the flights model and on 70-tensor models, narrow (per-tensor overhead
   dominates) and wide (memory traffic dominates), gradients fixed.
3. `precise_bn`: `precise_bn` against a no-grad training-mode forward over the same batches.
4. `memory`: bytes the logs hold per 1,000 steps, and `learn.export()` size with and without callbacks.
5. `scaling`: overhead and log size of all three callbacks as the model widens and the data grows.

`bench(quick=True)` is a smoke run of tiny sizes (used by the tests: it checks structure, not speed);
`bench(only=['overhead'])` runs one section. On a machine shared with other jobs torch's default of one thread
per core makes its threads wait on each other whenever one is descheduled, which drowns the default-thread
ratios in noise: the one-thread rows are the steadier ones there (the thread count is in every row).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import gc
import io
import json
import math
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import fastai
from fastai.callback.core import Callback, event
from fastai.callback.hook import ActivationStats
import fastai.callback.progress  # noqa: F401 (fastai's default bar, and `Learner.no_bar`)
from fastai.callback.schedule import SchedNo  # also patches in `Learner.fit_one_cycle`
from fastai.optimizer import SGD, RMSProp, Adam
from fastai.tabular.learner import tabular_learner
from fastai.tabular.model import tabular_config
from fastai.torch_core import set_seed

from . import __version__
from .data import example_dls
from .loggers import _LoggerBridge, fix_wandb_config, log_tables

__all__ = ['bench', 'BenchConfig', 'EventClock']

SECTIONS = ('overhead', 'optimizer', 'precise_bn', 'memory', 'scaling')


@dataclass
class BenchConfig:
    "Sizes and repeats of a run. `BenchConfig()` is the full run; `BenchConfig.quick()` a one-minute smoke run."
    n_rows: int | None = None            # flights rows (None: all 327,346)
    bs: int = 1024
    layers: list = field(default_factory=lambda: [400, 200])
    p: float = 0.1                       # every dropout module's p
    rounds: int = 5                      # counted rounds of the overhead section, after `warmup` rounds
    warmup: int = 1
    threads: tuple = (None, 1)           # torch threads of the overhead section's passes (None: torch's default)
    wandb: bool = True                   # the W&B and TensorBoard rows, when wandb and tensorboard are installed
    wandb_freqs: tuple = (1000, 10, 1)   # wandb.watch(log='gradients') log_freq of the W&B reference rows
    deep_depth: int = 20
    deep_widths: list = field(default_factory=lambda: [64, 256])
    opt_rounds: int = 9
    opt_steps: int = 50
    opt_warmup: int = 5
    pbn_batches: int = 100
    pbn_rounds: int = 5
    scale_rows: int = 40_000
    widths: list = field(default_factory=lambda: [[200, 100], [400, 200], [800, 400], [1600, 800]])
    row_counts: list = field(default_factory=lambda: [10_000, 40_000])
    scale_rounds: int = 3
    scale_warmup: int = 1
    is_quick: bool = False

    @classmethod
    def quick(cls, **kwargs):
        "Tiny sizes, one round, one thread: checks that everything runs in about a minute; its numbers mean nothing."
        return cls(**{**dict(n_rows=3_000, bs=256, layers=[40, 20], rounds=1, warmup=0, threads=(1,), deep_widths=[16],
                             opt_rounds=2, opt_steps=5, opt_warmup=1, pbn_batches=5, pbn_rounds=1, scale_rows=1_500,
                             widths=[[20, 10]], row_counts=[1_500], scale_rounds=1, scale_warmup=0, is_quick=True),
                      **kwargs})


# Targets. The overhead section's are judged on the share of the fit spent inside the callback (issue 16).
FLOOR_FACTOR = 1.1                                # MomentumLogger(every=1) share ≤ 1.1 × ReadFloor's share
SHARE_TARGETS = {'every10': 0.012, 'BNDrift': 0.01, 'DropoutSchedule': 0.005, 'all three': 0.04}
ALL_TARGET = 1.04                                 # scaling: all three callbacks' wall-time ratio
VS_FASTAI_TARGET, VS_TORCH_TARGET = 0.5, 1.1      # ours/fastai ≤ 0.5 is "≥ 2× faster"
PRECISE_BN_TARGET, EXPORT_TARGET = 1.2, 1.01


def _log(msg): print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _status(value, target):
    "'ok' if `value` ≤ `target`, 'MISSED' if not, 'n/a' if nothing was measured."
    if value is None or target is None or not (math.isfinite(value) and math.isfinite(target)): return 'n/a'
    return 'ok' if value <= target else 'MISSED'


def judged(value, limit, label):
    "A row's `target` and `status` columns: `label` says what is compared with what; 'ok' when `value` ≤ `limit`."
    return dict(target=label, status=_status(value, limit))


# what a row that is not judged says instead, by role
ROLE_COLUMNS = {'baseline': dict(target='baseline', status='baseline'),
                'noise': dict(target='reference (noise floor)', status='info'),
                'floor': dict(target='reference (read floor)', status='info'),
                'reference': dict(target='reference', status='info'),
                'wandb': dict(target='reference (W&B)', status='info'),
                'tensorboard': dict(target='reference (TensorBoard)', status='info')}


def _paired(times, base):
    "Median, min and max over rounds of times[r]/base[r]: each ratio compares runs of the same round."
    r = [t / b for t, b in zip(times, base)]
    return statistics.median(r), min(r), max(r)


def _interleave(runs, rounds, warmup, label=None):
    """Call every function of the dict `runs` once per round, in order, for `warmup + rounds` rounds;
    each returns seconds. Returns `{name: [seconds of each counted round]}`."""
    times = {k: [] for k in runs}
    for r in range(warmup + rounds):
        if label: _log(f"{label}: {'warm-up' if r < warmup else 'round'} {r + 1}/{warmup + rounds}")
        for name, run in runs.items():
            t = run()
            if r >= warmup: times[name].append(t)
    return times


# ---------------------------------------------------------------------------------------------
# Machine

def machine_info():
    "What the numbers were measured on: CPU, cores, threads, versions, date, load."
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): cpu = line.split(':', 1)[1].strip(); break
    except OSError: pass
    # `-dirty` when the checkout has uncommitted changes: then the commit alone does not name the code measured
    try: commit = subprocess.run(['git', 'describe', '--always', '--dirty', '--abbrev=7'], capture_output=True, text=True,
                                 cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except Exception: commit = None
    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                fastai=fastai.__version__, fastai_l5=__version__, git_commit=commit,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                load_avg_start=_load())


def _load():
    try: return round(os.getloadavg()[0], 2)
    except OSError: return None


# ---------------------------------------------------------------------------------------------
# Variants: what each overhead run attaches, and the role its row plays

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


def _wandb_name(freq): return f'+W&B gradients, log_freq={freq}'


def _share_target(limit, what):
    return lambda rows: ('share', limit, f'share <= {limit:.1%}{what}')


def _floor_target(rows):
    floor = rows[READ_FLOOR]['share'] if READ_FLOOR in rows else math.nan
    return 'share', FLOOR_FACTOR * floor, f'share <= {FLOOR_FACTOR}x read floor ({FLOOR_FACTOR * floor:.2%})'


def _variants(cfg, with_wandb=False, tb_dir=None):
    "Every overhead variant, plain first; the W&B ones `with_wandb`, the TensorBoard ones writing under `tb_dir`."
    from .momentum import MomentumLogger
    from .dropout import DropoutSchedule
    from .batchnorm import BNDrift
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
        v += [Variant(_wandb_name(f), lambda: [wandb_cb()], 'wandb', watch_freq=f) for f in cfg.wandb_freqs]
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


def _installed(module):
    try: __import__(module)
    except ImportError: return False
    return True


@contextmanager
def _wandb_run(active):
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
def _watched(learn, freq):
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


# ---------------------------------------------------------------------------------------------
# Time inside callbacks, measured from outside

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


def _learner(dls, layers, p, cbs=()):
    """A fresh flights learner from a fixed seed; every variant gets the same model, whose every dropout
    module (embeddings and hidden layers) has p, so a constant schedule of p changes no work."""
    set_seed(0)
    return tabular_learner(dls, layers=layers, config=tabular_config(ps=[p] * len(layers), embed_p=p), cbs=list(cbs))


def _timed_fit(learn, classes=()):
    """`(wall, cpu, share)` for one epoch of `fit_one_cycle` (no progress bar, no logging), nothing else timed: wall
    and process CPU seconds (the latter less sensitive to other jobs), and the share of the wall time spent inside
    the event methods of callbacks of `classes`."""
    gc.collect()
    with learn.no_bar(), learn.no_logging(), EventClock(classes) as clock:
        t0, c0 = time.perf_counter(), time.process_time()
        learn.fit_one_cycle(1)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, clock.seconds / wall


def _fit_runs(dls, layers, p, variants, keep, extra):
    """One run function per variant, returning wall seconds; its CPU seconds and in-callback share go to
    `extra[name]` as `(cpu, share)` and its learner to `keep[name]` (the last run's is kept)."""
    def make(v):
        def run():
            keep.pop(v.name, None)
            cbs = v.make_cbs()
            learn = _learner(dls, layers, p, cbs)
            # fastai's WandbCallback prints a config warning each fit: kept out of the table
            quiet = contextlib.redirect_stdout(io.StringIO()) if v.role == 'wandb' else contextlib.nullcontext()
            with _watched(learn, v.watch_freq), quiet:
                wall, c, share = _timed_fit(learn, [type(cb) for cb in cbs] + [_LoggerBridge])
            keep[v.name] = learn
            extra.setdefault(v.name, []).append((c, share))
            return wall
        return run
    return {v.name: make(v) for v in variants}


def _counted(extra, rounds):
    "`(cpu, share)` lists of the counted rounds (the warm-up's left out)."
    return {k: tuple(map(list, zip(*v[len(v) - rounds:]))) for k, v in extra.items()}


# ---------------------------------------------------------------------------------------------
# 1. Training overhead

@contextmanager
def _threads(n):
    "torch's intra-op threads set to `n` (None: leave the default) while inside; yields the count in use."
    before = torch.get_num_threads()
    if n is not None: torch.set_num_threads(n)
    try: yield torch.get_num_threads()
    finally: torch.set_num_threads(before)


def overhead_section(dls, cfg, keep):
    """Every variant's fit time, its ratio to the plain fit of the same round and its in-callback share, at each
    thread count of `cfg.threads`. Returns the rows and the first pass's `(wall times, (cpu, share))`."""
    with_wandb, with_tb = cfg.wandb and _installed('wandb'), cfg.wandb and _installed('tensorboard')
    if cfg.wandb and not (with_wandb and with_tb):
        _log("overhead: wandb or tensorboard is not installed, so not all logger rows (pip install fastai_l5[loggers])")
    frames, first, done = [], None, set()
    with _wandb_run(with_wandb), tempfile.TemporaryDirectory() as tb_dir:
        variants = _variants(cfg, with_wandb, tb_dir if with_tb else None)
        for n in cfg.threads:
            with _threads(n) as threads:
                if threads in done: continue   # torch's default is this count already
                done.add(threads)
                _log(f"overhead at {threads} torch thread(s): {len(variants)} variants x ({cfg.warmup} warm-up + "
                     f"{cfg.rounds} rounds), {len(dls.train)} steps per fit")
                extra = {}
                times = _interleave(_fit_runs(dls, cfg.layers, cfg.p, variants, keep, extra), cfg.rounds, cfg.warmup,
                                    label=f'overhead, {threads} thread(s)')
                extra = _counted(extra, cfg.rounds)
                frames.append(_overhead_rows(variants, times, extra, threads))
                if first is None: first = (times, extra)
    return pd.concat(frames, ignore_index=True), first


def _overhead_rows(variants, times, extra, threads):
    "One thread setting's rows: measures first, then each row judged by its role."
    base, rows = times['plain'], {}
    for v in variants:
        t, (cpu, share) = times[v.name], extra[v.name]
        ratio, lo, hi = _paired(t, base)
        rows[v.name] = dict(threads=threads, variant=v.name, median_s=statistics.median(t), min_s=min(t), max_s=max(t),
                            ratio=ratio, ratio_min=lo, ratio_max=hi, cpu_ratio=_paired(cpu, extra['plain'][0])[0],
                            share=statistics.median(share), share_min=min(share), share_max=max(share), rounds=len(t))
    for v in variants:
        row = rows[v.name]
        if v.target is None: row.update(ROLE_COLUMNS[v.role])
        else:
            measure, limit, label = v.target(rows)
            row.update(judged(row[measure], limit, label))
        row['vs_wandb_grads'] = _vs_wandb(v, rows)
    return pd.DataFrame(list(rows.values()))


def _vs_wandb(v, rows):
    """For a variant with MomentumLogger at every k steps (`v.every`): its time over the plain fit as a share of the
    time W&B's gradient histograms at log_freq=k add, (ratio − 1)/(ratio_W&B − 1); NaN for other rows."""
    ref = rows.get(_wandb_name(v.every)) if v.every else None
    if ref is None or ref['ratio'] <= 1: return math.nan
    return (rows[v.name]['ratio'] - 1) / (ref['ratio'] - 1)


# ---------------------------------------------------------------------------------------------
# 2. Optimizer step

def _families():
    "Per family: ours, fastai's native optimizer and torch's foreach optimizer, with the same hypers."
    from .optim import sgd_momentum, rmsprop, adam
    return {
        'SGD momentum 0.9 (heavy ball)': dict(
            ours=lambda ps, lr: sgd_momentum(mom=0.9, dampening=False)(ps, lr=lr),
            fastai=lambda ps, lr: SGD(ps, lr, mom=0.9),
            torch=lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, foreach=True)),
        'RMSProp': dict(
            ours=lambda ps, lr: rmsprop(sqr_mom=0.99, eps=1e-8)(ps, lr=lr),
            fastai=lambda ps, lr: RMSProp(ps, lr, sqr_mom=0.99, eps=1e-8),
            torch=lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, alpha=0.99, eps=1e-8, foreach=True)),
        'Adam, decoupled wd 0.01': dict(
            ours=lambda ps, lr: adam(mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01)(ps, lr=lr),
            fastai=lambda ps, lr: Adam(ps, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01),
            torch=lambda ps, lr: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01,
                                                   foreach=True)),
    }


def _step_timer(model, grads, make_opt, steps, warmup):
    "A function timing `steps` optimizer steps on a private copy of `model` whose gradients are `grads`."
    m = copy.deepcopy(model)
    ps = [p for p in m.parameters() if p.requires_grad]
    for p, g in zip(ps, grads): p.grad = g.clone()
    opt = make_opt(ps, 1e-3)
    for _ in range(warmup): opt.step()     # creates the state
    def run():
        t0 = time.perf_counter()
        for _ in range(steps): opt.step()
        return (time.perf_counter() - t0) / steps
    return run


def optimizer_section(models, cfg):
    "Per-step time of ours, fastai native and torch foreach, for each family and model."
    rows = []
    for model_name, model in models.items():
        ps = [p for p in model.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(0)
        grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in ps]
        n_tensors, numel = len(ps), sum(p.numel() for p in ps)
        for fam, impls in _families().items():
            _log(f"optimizer: {fam} on {model_name}")
            runs = {k: _step_timer(model, grads, f, cfg.opt_steps, cfg.opt_warmup) for k, f in impls.items()}
            t = _interleave(runs, cfg.opt_rounds, 0)
            for other, target, label in (('fastai', VS_FASTAI_TARGET, 'fastai native'),
                                         ('torch', VS_TORCH_TARGET, 'torch foreach')):
                ratio, lo, hi = _paired(t['ours'], t[other])
                rows.append(dict(family=fam, model=model_name, n_tensors=n_tensors, numel=numel,
                                 versus=label, ours_us=1e6 * statistics.median(t['ours']),
                                 other_us=1e6 * statistics.median(t[other]), ratio=ratio, ratio_min=lo,
                                 ratio_max=hi, speedup=1 / ratio,
                                 **judged(ratio, target, f'ours/{other} <= {target:.2f}x'
                                          + (' (>= 2x faster)' if other == 'fastai' else ''))))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# 3. precise_bn

def precise_bn_section(learn, cfg):
    """`precise_bn` over n batches against a no-grad training-mode forward over the same batches, both
    reading the training loader (unshuffled, so the batches are the same) and both given the batches
    already in memory (the cost of the pass itself, loading left out)."""
    from .batchnorm import precise_bn
    n = min(cfg.pbn_batches, len(learn.dls.train))
    dl = learn.dls.train.new(shuffle=False, drop_last=False)
    preloaded = [b for _, b in zip(range(n), dl)]
    model = copy.deepcopy(learn.model)          # the forward's own BN updates stay off `learn`
    n_inp = learn.dls.n_inp

    def forward(batches):
        def run():
            model.train()
            t0 = time.perf_counter()
            with torch.no_grad():
                for _, b in zip(range(n), batches): model(*b[:n_inp])
            return time.perf_counter() - t0
        return run

    def pbn(batches):
        def run():
            t0 = time.perf_counter()
            precise_bn(learn, n_batches=n, dl=batches)
            return time.perf_counter() - t0
        return run

    rows = []
    for source, batches in (('training loader', dl), ('preloaded batches', preloaded)):
        _log(f"precise_bn: {n} batches from the {source} x (1 warm-up + {cfg.pbn_rounds} rounds)")
        t = _interleave({'forward': forward(batches), 'precise_bn': pbn(batches)}, cfg.pbn_rounds, 1)
        ratio, lo, hi = _paired(t['precise_bn'], t['forward'])
        rows.append(dict(batches_from=source, n_batches=n, bs=dl.bs, precise_bn_s=statistics.median(t['precise_bn']),
                         forward_s=statistics.median(t['forward']), ratio=ratio, ratio_min=lo, ratio_max=hi,
                         rounds=len(t['forward']), **judged(ratio, PRECISE_BN_TARGET, f'<= {PRECISE_BN_TARGET:.1f}x')))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# 4. Memory

def log_size(learn):
    """`(rows, bytes held, DataFrame bytes)` of everything our callbacks on `learn` logged; for fastai's
    `ActivationStats`, its pickled `stats` stand in for both byte counts."""
    rows = held = frame = 0
    for cb in learn.cbs:
        if isinstance(cb, ActivationStats):
            n = len(pickle.dumps(list(getattr(cb, 'stats', []))))
            rows += sum(len(s) for s in getattr(cb, 'stats', [])); held += n; frame += n
        for t in log_tables(cb):
            t.flush()
            rows += len(t); held += t.nbytes()
            frame += int(t.df.memory_usage(deep=True).sum()) if len(t) else 0
    return rows, held, frame


def export_size(learn, folder):
    "Bytes of `learn.export()`."
    fname = Path(folder) / f'export_{id(learn)}.pkl'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.export(fname)
    n = fname.stat().st_size
    fname.unlink()
    return n


MEMORY_ROLES = ('baseline', 'ours', 'reference')  # the A/A repeat, the read floor and the W&B runs log nothing of ours


def memory_section(learners, roles, n_steps):
    "Log bytes per 1,000 steps and export size for the learner each overhead variant (`roles`: name -> role) ended with."
    _log("memory: log sizes and learn.export() sizes")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = export_size(learners['plain'], tmp)
        for name, role in roles.items():
            if role not in MEMORY_ROLES: continue
            learn = learners[name]
            n_rows, held, frame = log_size(learn)
            exp = base if role == 'baseline' else export_size(learn, tmp)
            ratio = exp / base
            status = (judged(ratio, EXPORT_TARGET, f'export <= {EXPORT_TARGET:.2f}x plain (logs not pickled)')
                      if role == 'ours' else ROLE_COLUMNS[role])
            rows.append(dict(variant=name, steps=n_steps, log_rows=n_rows, log_bytes_per_1k_steps=held * 1000 / n_steps,
                             df_bytes_per_1k_steps=frame * 1000 / n_steps, export_bytes=exp, export_ratio=ratio,
                             **status))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# 5. Scaling

def _scale_point(dls, layers, cfg, n_rows):
    "Plain against all three callbacks, interleaved, on one (data, width) setting."
    variants = [v for v in _variants(cfg) if v.name in ('plain', '+all three')]
    keep, extra = {}, {}
    t = _interleave(_fit_runs(dls, layers, cfg.p, variants, keep, extra), cfg.scale_rounds, cfg.scale_warmup)
    return _scale_row(dls, layers, n_rows, (t, _counted(extra, cfg.scale_rounds)), keep)


def _scale_row(dls, layers, n_rows, times, keep):
    t, extra = times
    cpu = {k: v[0] for k, v in extra.items()}
    ratio, lo, hi = _paired(t['+all three'], t['plain'])
    n_steps = len(dls.train)
    _, held, _ = log_size(keep['+all three'])
    n_params = sum(p.numel() for p in keep['plain'].model.parameters())
    return dict(layers=str(list(layers)), params=n_params, rows=n_rows, steps=n_steps,
                plain_s=statistics.median(t['plain']), all_three_s=statistics.median(t['+all three']),
                ratio=ratio, ratio_min=lo, ratio_max=hi, cpu_ratio=_paired(cpu['+all three'], cpu['plain'])[0],
                rounds=len(t['plain']), log_bytes_per_1k_steps=held * 1000 / n_steps,
                **judged(ratio, ALL_TARGET, f'<= {ALL_TARGET:.2f}x'))


def scaling_section(cfg, main_dls, main_times, main_learners):
    "Overhead and log size of all three callbacks against model width and number of rows."
    rows, cache, dls_cache = [], {}, {}

    def dls_for(n):
        if n not in dls_cache: dls_cache[n] = example_dls('flights', bs=cfg.bs, n_rows=n)
        return dls_cache[n]

    def point(n, layers):
        key = (n, tuple(layers))
        if key not in cache:
            _log(f"scaling: {n} rows, layers {list(layers)}")
            cache[key] = _scale_point(dls_for(n), layers, cfg, n)
        return cache[key]

    for layers in cfg.widths: rows.append(dict(axis='width', **point(cfg.scale_rows, layers)))
    for n in cfg.row_counts: rows.append(dict(axis='rows', **point(n, cfg.layers)))
    # the largest data set is the overhead section's run: reuse its rounds (first thread setting) rather than rerun it
    if main_times is not None:
        n_main = len(main_dls.train_ds) + len(main_dls.valid_ds)
        rows.append(dict(axis='rows', **_scale_row(main_dls, cfg.layers, n_main, main_times, main_learners)))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Output

def _fmt(col, v):
    "A cell as text: bytes with thousands separators, times and ratios rounded for reading."
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v): return 'nan'
        if 'bytes' in col: return f'{v:,.0f}'
        if col.startswith('share'): return f'{v:.2%}'
        if 'ratio' in col or col.endswith('_s'): return f'{v:.3f}'
        if col.endswith('_us') or col == 'speedup': return f'{v:.2f}' if v < 100 else f'{v:.1f}'
        return f'{v:.4g}'
    if isinstance(v, (int, np.integer)) and ('bytes' in col or col in ('numel', 'params', 'rows')): return f'{v:,}'
    return str(v)


def format_table(df):
    "A `DataFrame` as aligned plain text, numbers rounded for reading."
    cells = [[_fmt(c, v) for c, v in zip(df.columns, row)] for row in df.itertuples(index=False)]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(df.columns)]
    lines = ['  '.join(c.ljust(w) for c, w in zip(df.columns, widths))]
    lines.append('  '.join('-' * w for w in widths))
    lines += ['  '.join(v.rjust(w) if _is_num(v) else v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return '\n'.join(lines)


def _is_num(s):
    try: float(s.replace(',', '')); return True
    except ValueError: return False


def _markdown(df):
    cells = [[_fmt(c, v) for c, v in zip(df.columns, row)] for row in df.itertuples(index=False)]
    return '\n'.join(['| ' + ' | '.join(df.columns) + ' |', '|' + '---|' * len(df.columns)]
                     + ['| ' + ' | '.join(r) + ' |' for r in cells])


_TITLES = {'overhead': '1. Training overhead: one epoch of fit_one_cycle, flights tabular_learner',
           'optimizer': '2. Optimizer step: ours vs fastai native vs torch.optim foreach (time per step)',
           'precise_bn': '3. precise_bn vs a no-grad forward over the same batches',
           'memory': '4. Memory: logs per 1,000 steps and learn.export() size',
           'scaling': '5. Scaling: all three callbacks vs plain, by model width and by rows'}


def _machine_line(m):
    return (f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
            f"fastai {m['fastai']}, fastai_l5 {m['fastai_l5']}{' @' + m['git_commit'] if m['git_commit'] else ''}, "
            f"{m['date']}, load avg {m['load_avg_start']} -> {m['load_avg_end']}")


def write_results(results, machine, config, out):
    "Write every section as CSV, all of it as JSON (with the machine) and as a markdown summary."
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    for name, df in results.items(): df.to_csv(out / f'{name}.csv', index=False)
    doc = dict(machine=machine, config=config, notes=[noise_note(results['overhead'])] if 'overhead' in results else [],
               sections={k: json.loads(df.to_json(orient='records')) for k, df in results.items()})
    (out / 'bench.json').write_text(json.dumps(doc, indent=1))
    md = [f"Measured on {_machine_line(machine)}{' (quick smoke run)' if config['quick'] else ''}.", '']
    for name, df in results.items():
        md += [f'### {_TITLES[name]}', '', _markdown(df), '']
        if name == 'overhead': md += [noise_note(df), '']
    (out / 'bench.md').write_text('\n'.join(md))


def noise_note(overhead):
    "What the A/A repeat says about how finely this run resolves a ratio, and what the targets are judged on."
    aa = overhead[overhead['variant'] == 'plain (A/A repeat)']
    floors = '; '.join(f"{r.threads} thread(s): {r.ratio:.3f}x, spread {r.ratio_min:.3f}-{r.ratio_max:.3f}x"
                       for r in aa.itertuples())
    return (f"Noise floor: the plain fit against itself (A/A) gave {floors} over rounds; wall-time ratios closer to 1 "
            "than that are not resolved by this run (cpu_ratio: the same from process CPU time). The targets are "
            "judged on `share`, the time spent inside the callbacks' own event methods as a share of the fit's wall "
            "time, which resolves what the wall time cannot: MomentumLogger(every=1) <= 1.1x the read floor's share, "
            "MomentumLogger(every=10) <= 1.2%, BNDrift <= 1%, DropoutSchedule <= 0.5%. `vs_wandb_grads`: "
            "MomentumLogger's time over the plain fit as a share of what W&B's gradient histograms at the same "
            "frequency add. Hooks inside the model (ActivationStats, wandb.watch) are not in `share`.")


def print_results(results, machine, config):
    print(f"fastai-l5 bench{' --quick' if config['quick'] else ''}: {_machine_line(machine)}")
    for name, df in results.items():
        print(f"\n{_TITLES[name]}\n{format_table(df)}")
        if name == 'overhead': print(noise_note(df))
    missed = sum(int((df['status'] == 'MISSED').sum()) for df in results.values())
    checked = sum(int(df['status'].isin(['ok', 'MISSED']).sum()) for df in results.values())
    print(f"\n{checked - missed} of {checked} targets met"
          + (" (quick run: tiny sizes, the ratios are not meaningful)" if config['quick'] else ''))


# ---------------------------------------------------------------------------------------------

def bench(quick=False, out='l5_bench', only=None, config=None):
    """Run the benchmark, print its table, write `out/{section}.csv`, `out/bench.json` (with the machine
    description) and `out/bench.md`; return `{section: DataFrame}`. `quick=True`: tiny sizes, one round, about a
    minute: a smoke run whose numbers mean nothing. `only`: the sections to run (the memory section needs the
    overhead section's learners, so it runs that too). `config`: a `BenchConfig` instead of the full or quick one."""
    cfg = config or (BenchConfig.quick() if quick else BenchConfig())
    sections = _sections(only)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='The given NumPy array is not writable')
        warnings.filterwarnings('ignore', message=r'You are shadowing an attribute \(modules\)')  # fastai's ActivationStats
        return _run(cfg, sections, out)


def _sections(only):
    "The sections to run, in order; raises `ValueError` naming any unknown one."
    if not only: return list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown: raise ValueError(f"unknown bench section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    wanted = set(only) | ({'overhead'} if 'memory' in only else set())
    return [s for s in SECTIONS if s in wanted]


def _run(cfg, sections, out):
    start = time.perf_counter()
    machine = machine_info()
    _log(f"{'quick' if cfg.is_quick else 'full'} run of {', '.join(sections)}; results go to {Path(out).resolve()}")
    dls = example_dls('flights', bs=cfg.bs, n_rows=cfg.n_rows)
    learners, results, times = {}, {}, None
    if 'overhead' in sections:
        results['overhead'], times = overhead_section(dls, cfg, learners)
    plain = learners.get('plain') or _learner(dls, cfg.layers, cfg.p)
    if 'optimizer' in sections:
        models = {f"flights {cfg.layers}": plain.model}
        for width in cfg.deep_widths:  # many tensors: narrow ones show per-tensor overhead, wide ones memory traffic
            deep = _learner(dls, [width] * cfg.deep_depth, cfg.p).model
            n_deep = sum(1 for p in deep.parameters() if p.requires_grad)
            models[f"deep {cfg.deep_depth}x{width} ({n_deep} tensors)"] = deep
        results['optimizer'] = optimizer_section(models, cfg)
    if 'precise_bn' in sections: results['precise_bn'] = precise_bn_section(plain, cfg)
    if 'memory' in sections:
        roles = {v.name: v.role for v in _variants(cfg)}
        results['memory'] = memory_section(learners, roles, len(dls.train))
    if 'scaling' in sections: results['scaling'] = scaling_section(cfg, dls, times, learners)
    machine.update(load_avg_end=_load(), total_s=round(time.perf_counter() - start, 1))
    config = dict(dataclasses.asdict(cfg), quick=cfg.is_quick, sections=sections,
                  flights_rows=len(dls.train_ds) + len(dls.valid_ds))
    write_results(results, machine, config, out)   # files first: a closed stdout pipe must not lose them
    print_results(results, machine, config)
    _log(f"done in {machine['total_s']:.0f} s; wrote {Path(out).resolve()}")
    return results


def main(argv=None):
    "`python -m fastai_l5.bench ...`: the same as `fastai-l5 bench ...` (the options live in `fastai_l5.cli`)."
    from .cli import main as cli_main
    return cli_main(['bench', *(sys.argv[1:] if argv is None else argv)])


if __name__ == '__main__': sys.exit(main())
