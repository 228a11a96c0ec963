"""`fastai-l5 bench`: the numbers behind fastai_l5's cost claims, measured side by side in one run.

Five sections, each a `DataFrame` whose rows state their target and whether it was met:

1. `overhead`: one epoch of `fit_one_cycle` on the flights `tabular_learner`, plain and with each of our
   callbacks, all three, fastai's `ActivationStats`, and `ReadFloor`, the least any per-step optimizer
   telemetry costs (copy p, then read g, p, the copy and the optimizer state once). Variants run interleaved (A B C … A B C …) after a
   warm-up round; every run builds a fresh learner from the same seed and times only the fit. The ratio
   is the median over rounds of t(variant)/t(plain) *within* a round, so slow phases of a shared machine
   hit both sides of a ratio alike; a second plain run per round (A/A) shows the noise floor.
2. `optimizer`: `opt.step()` time of ours against fastai's native optimizers and torch.optim's foreach
   ones, same hyper-parameters, on the flights model and on 70-tensor models, narrow (per-tensor overhead
   dominates) and wide (memory traffic dominates), gradients fixed.
3. `precise_bn`: `precise_bn` against a no-grad training-mode forward over the same batches.
4. `memory`: bytes the logs hold per 1,000 steps, and `learn.export()` size with and without callbacks.
5. `scaling`: overhead and log size of all three callbacks as the model widens and the data grows.

`bench(quick=True)` is a smoke run of tiny sizes (used by the tests: it checks structure, not speed).
On a machine shared with other jobs, run it with `OMP_NUM_THREADS=1`: torch's default of one thread per
core makes its threads wait on each other whenever one is descheduled, which can slow a fit tenfold and
drowns the ratios in noise (the thread count is part of the machine description).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
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
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import fastai
from fastai.callback.core import Callback
from fastai.callback.hook import ActivationStats
import fastai.callback.progress  # noqa: F401 (fastai's default bar, and `Learner.no_bar`)
from fastai.callback.schedule import SchedNo  # also patches in `Learner.fit_one_cycle`
from fastai.optimizer import SGD, RMSProp, Adam
from fastai.tabular.learner import tabular_learner
from fastai.tabular.model import tabular_config
from fastai.torch_core import set_seed

from . import __version__
from .core import LogTable
from .data import example_dls

__all__ = ['bench']

SECTIONS = ('overhead', 'optimizer', 'precise_bn', 'memory', 'scaling')

FULL = dict(n_rows=None, bs=1024, layers=[400, 200], p=0.1, rounds=5, warmup=1,
            deep_depth=20, deep_widths=[64, 256], opt_rounds=9, opt_steps=50, opt_warmup=5,
            pbn_batches=100, pbn_rounds=5,
            scale_rows=40_000, widths=[[200, 100], [400, 200], [800, 400], [1600, 800]],
            row_counts=[10_000, 40_000], scale_rounds=3, scale_warmup=1)
QUICK = dict(n_rows=3_000, bs=256, layers=[40, 20], p=0.1, rounds=1, warmup=0,
             deep_depth=20, deep_widths=[16], opt_rounds=2, opt_steps=5, opt_warmup=1,
             pbn_batches=5, pbn_rounds=1,
             scale_rows=1_500, widths=[[20, 10]],
             row_counts=[1_500], scale_rounds=1, scale_warmup=0)

OURS_TARGET, ALL_TARGET = 1.02, 1.04
VS_FASTAI_TARGET, VS_TORCH_TARGET = 0.5, 1.1     # ours/fastai ≤ 0.5 is "≥ 2× faster"
PRECISE_BN_TARGET, EXPORT_TARGET = 1.2, 1.01


def _log(msg): print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _status(value, target):
    "'ok' if `value` ≤ `target`, 'MISSED' if not, 'n/a' if nothing was measured."
    if value is None or not math.isfinite(value): return 'n/a'
    return 'ok' if value <= target else 'MISSED'


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
# Our callbacks, looked up when the run starts

def _ours(p):
    "Our callback factories, keyed by variant name (built fresh for every run); `p` is the model's dropout."
    from .momentum import MomentumLogger
    from .dropout import DropoutSchedule
    from .batchnorm import BNDrift
    # a schedule (called every batch, p set on every module) that keeps the model's own p: a schedule that
    # lowers p would also make dropout itself cheaper (torch skips p=0) and hide the callback's cost
    sched = SchedNo(p, p)
    return {'MomentumLogger': lambda: [MomentumLogger()],
            'DropoutSchedule': lambda: [DropoutSchedule(sched)],
            'BNDrift': lambda: [BNDrift()]}


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


def _variants(p):
    "Every overhead variant: `{name: (callbacks factory, target or None)}`, plain first."
    ours = _ours(p)
    v = {'plain': (lambda: [], None), 'plain (A/A repeat)': (lambda: [], None)}
    for name, f in ours.items(): v[f'+{name}'] = (f, OURS_TARGET)
    v['+all three'] = (lambda: [cb for f in ours.values() for cb in f()], ALL_TARGET)
    v[READ_FLOOR] = (lambda: [ReadFloor()], None)
    v['+ActivationStats (fastai)'] = (lambda: [ActivationStats()], None)
    return v


def _learner(dls, layers, p, cbs=()):
    """A fresh flights learner from a fixed seed; every variant gets the same model, whose every dropout
    module (embeddings and hidden layers) has p, so a constant schedule of p changes no work."""
    set_seed(0)
    return tabular_learner(dls, layers=layers, config=tabular_config(ps=[p] * len(layers), embed_p=p), cbs=list(cbs))


def _timed_fit(learn):
    """`(wall, cpu)` seconds for one epoch of `fit_one_cycle` (no progress bar, no logging), nothing else
    timed. The process's CPU time is less sensitive than wall time to other jobs on a shared machine."""
    gc.collect()
    with learn.no_bar(), learn.no_logging():
        t0, c0 = time.perf_counter(), time.process_time()
        learn.fit_one_cycle(1)
        return time.perf_counter() - t0, time.process_time() - c0


def _fit_runs(dls, layers, p, variants, keep, cpu):
    """One run function per variant, returning wall seconds; its CPU seconds go to `cpu[name]` and its
    learner to `keep[name]` (the last run's is kept)."""
    def make(name, cbs):
        def run():
            keep.pop(name, None)
            learn = _learner(dls, layers, p, cbs())
            wall, c = _timed_fit(learn)
            keep[name] = learn
            cpu.setdefault(name, []).append(c)
            return wall
        return run
    return {name: make(name, cbs) for name, cbs in variants.items()}


def _counted(cpu, rounds):
    "The CPU times of the counted rounds (the warm-up's left out)."
    return {k: v[len(v) - rounds:] for k, v in cpu.items()}


# ---------------------------------------------------------------------------------------------
# 1. Training overhead

def overhead_section(dls, cfg, keep):
    "Median fit time of every variant and its ratio to the plain fit of the same round."
    variants = _variants(cfg['p'])
    _log(f"overhead: {len(variants)} variants x ({cfg['warmup']} warm-up + {cfg['rounds']} rounds), "
         f"{len(dls.train)} steps per fit")
    cpu = {}
    times = _interleave(_fit_runs(dls, cfg['layers'], cfg['p'], {k: v[0] for k, v in variants.items()}, keep, cpu),
                        cfg['rounds'], cfg['warmup'], label='overhead')
    cpu = _counted(cpu, cfg['rounds'])
    base, rows = times['plain'], []
    for name, (_, target) in variants.items():
        t = times[name]
        ratio, lo, hi = _paired(t, base)
        cpu_ratio = _paired(cpu[name], cpu['plain'])[0]
        if name == 'plain': tgt, status = 'baseline', 'baseline'
        elif target is None: tgt, status = 'reference (noise floor)' if 'A/A' in name else 'reference', 'info'
        else: tgt, status = f'<= {target:.2f}x', _status(ratio, target)
        rows.append(dict(variant=name, median_s=statistics.median(t), min_s=min(t), max_s=max(t),
                         ratio=ratio, ratio_min=lo, ratio_max=hi, cpu_ratio=cpu_ratio, rounds=len(t),
                         target=tgt, status=status))
    return pd.DataFrame(rows), (times, cpu)


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
            runs = {k: _step_timer(model, grads, f, cfg['opt_steps'], cfg['opt_warmup']) for k, f in impls.items()}
            t = _interleave(runs, cfg['opt_rounds'], 0)
            for other, target, label in (('fastai', VS_FASTAI_TARGET, 'fastai native'),
                                         ('torch', VS_TORCH_TARGET, 'torch foreach')):
                ratio, lo, hi = _paired(t['ours'], t[other])
                rows.append(dict(family=fam, model=model_name, n_tensors=n_tensors, numel=numel,
                                 versus=label, ours_us=1e6 * statistics.median(t['ours']),
                                 other_us=1e6 * statistics.median(t[other]), ratio=ratio, ratio_min=lo,
                                 ratio_max=hi, speedup=1 / ratio,
                                 target=f'ours/{other} <= {target:.2f}x'
                                        + (' (>= 2x faster)' if other == 'fastai' else ''),
                                 status=_status(ratio, target)))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# 3. precise_bn

def precise_bn_section(learn, cfg):
    """`precise_bn` over n batches against a no-grad training-mode forward over the same batches, both
    reading the training loader (unshuffled, so the batches are the same) and both given the batches
    already in memory (the cost of the pass itself, loading left out)."""
    from .batchnorm import precise_bn
    n = min(cfg['pbn_batches'], len(learn.dls.train))
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
        _log(f"precise_bn: {n} batches from the {source} x (1 warm-up + {cfg['pbn_rounds']} rounds)")
        t = _interleave({'forward': forward(batches), 'precise_bn': pbn(batches)}, cfg['pbn_rounds'], 1)
        ratio, lo, hi = _paired(t['precise_bn'], t['forward'])
        rows.append(dict(batches_from=source, n_batches=n, bs=dl.bs, precise_bn_s=statistics.median(t['precise_bn']),
                         forward_s=statistics.median(t['forward']), ratio=ratio, ratio_min=lo, ratio_max=hi,
                         rounds=len(t['forward']), target=f'<= {PRECISE_BN_TARGET:.1f}x',
                         status=_status(ratio, PRECISE_BN_TARGET)))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# 4. Memory

def _log_tables(cb):
    "Every `LogTable` a callback holds."
    return [v for v in vars(cb).values() if isinstance(v, LogTable)]


def log_size(learn):
    """`(rows, bytes held, DataFrame bytes)` of everything our callbacks on `learn` logged; for fastai's
    `ActivationStats`, its pickled `stats` stand in for both byte counts."""
    rows = held = frame = 0
    for cb in learn.cbs:
        if isinstance(cb, ActivationStats):
            n = len(pickle.dumps(list(getattr(cb, 'stats', []))))
            rows += sum(len(s) for s in getattr(cb, 'stats', [])); held += n; frame += n
        for t in _log_tables(cb):
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


def memory_section(learners, n_steps):
    "Log bytes per 1,000 steps and export size for the learner each overhead variant ended with."
    _log("memory: log sizes and learn.export() sizes")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = export_size(learners['plain'], tmp)
        for name, learn in learners.items():
            if 'A/A' in name or name == READ_FLOOR: continue
            n_rows, held, frame = log_size(learn)
            exp = base if name == 'plain' else export_size(learn, tmp)
            ratio = exp / base
            is_ours = name != 'plain' and 'fastai' not in name
            rows.append(dict(variant=name, steps=n_steps, log_rows=n_rows,
                             log_bytes_per_1k_steps=held * 1000 / n_steps,
                             df_bytes_per_1k_steps=frame * 1000 / n_steps,
                             export_bytes=exp, export_ratio=ratio,
                             target=f'export <= {EXPORT_TARGET:.2f}x plain (logs not pickled)' if is_ours else
                                    ('baseline' if name == 'plain' else 'reference'),
                             status=_status(ratio, EXPORT_TARGET) if is_ours else
                                    ('baseline' if name == 'plain' else 'info')))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# 5. Scaling

def _scale_point(dls, layers, cfg, n_rows):
    "Plain against all three callbacks, interleaved, on one (data, width) setting."
    v = _variants(cfg['p'])
    keep, cpu = {}, {}
    runs = _fit_runs(dls, layers, cfg['p'], {'plain': v['plain'][0], '+all three': v['+all three'][0]}, keep, cpu)
    t = _interleave(runs, cfg['scale_rounds'], cfg['scale_warmup'])
    return _scale_row(dls, layers, n_rows, (t, _counted(cpu, cfg['scale_rounds'])), keep)


def _scale_row(dls, layers, n_rows, times, keep):
    t, cpu = times
    ratio, lo, hi = _paired(t['+all three'], t['plain'])
    n_steps = len(dls.train)
    _, held, _ = log_size(keep['+all three'])
    n_params = sum(p.numel() for p in keep['plain'].model.parameters())
    return dict(layers=str(list(layers)), params=n_params, rows=n_rows, steps=n_steps,
                plain_s=statistics.median(t['plain']), all_three_s=statistics.median(t['+all three']),
                ratio=ratio, ratio_min=lo, ratio_max=hi, cpu_ratio=_paired(cpu['+all three'], cpu['plain'])[0],
                rounds=len(t['plain']), log_bytes_per_1k_steps=held * 1000 / n_steps,
                target=f'<= {ALL_TARGET:.2f}x', status=_status(ratio, ALL_TARGET))


def scaling_section(cfg, main_dls, main_times, main_learners):
    "Overhead and log size of all three callbacks against model width and number of rows."
    rows, cache, dls_cache = [], {}, {}

    def dls_for(n):
        if n not in dls_cache: dls_cache[n] = example_dls('flights', bs=cfg['bs'], n_rows=n)
        return dls_cache[n]

    def point(n, layers):
        key = (n, tuple(layers))
        if key not in cache:
            _log(f"scaling: {n} rows, layers {list(layers)}")
            cache[key] = _scale_point(dls_for(n), layers, cfg, n)
        return cache[key]

    for layers in cfg['widths']: rows.append(dict(axis='width', **point(cfg['scale_rows'], layers)))
    for n in cfg['row_counts']: rows.append(dict(axis='rows', **point(n, cfg['layers'])))
    # the largest data set is the overhead section's run: reuse its rounds rather than rerun it
    n_main = len(main_dls.train_ds) + len(main_dls.valid_ds)
    rows.append(dict(axis='rows', **_scale_row(main_dls, cfg['layers'], n_main, main_times, main_learners)))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Output

def _fmt(col, v):
    "A cell as text: bytes with thousands separators, times and ratios rounded for reading."
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v): return 'nan'
        if 'bytes' in col: return f'{v:,.0f}'
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
    doc = dict(machine=machine, config=config, notes=[noise_note(results['overhead'])],
               sections={k: json.loads(df.to_json(orient='records')) for k, df in results.items()})
    (out / 'bench.json').write_text(json.dumps(doc, indent=1))
    md = [f"Measured on {_machine_line(machine)}{' (quick smoke run)' if config['quick'] else ''}.", '']
    for name, df in results.items():
        md += [f'### {_TITLES[name]}', '', _markdown(df), '']
        if name == 'overhead': md += [noise_note(df), '']
    (out / 'bench.md').write_text('\n'.join(md))


def noise_note(overhead):
    "What the A/A repeat says about how finely this run resolves a ratio."
    aa = overhead.set_index('variant').loc['plain (A/A repeat)']
    return (f"Noise floor: the plain fit against itself (A/A) gave {aa['ratio']:.3f}x, spread "
            f"{aa['ratio_min']:.3f}-{aa['ratio_max']:.3f}x over rounds; ratios closer to 1 than that are "
            f"not resolved by this run (cpu_ratio: the same from process CPU time).")


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

def bench(quick=False, out='l5_bench'):
    """Run the benchmark, print its table, write `out/{section}.csv`, `out/bench.json` (with the machine
    description) and `out/bench.md`; return `{section: DataFrame}`. `quick=True`: tiny sizes, one or two
    rounds, about a minute: a smoke run whose numbers mean nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='The given NumPy array is not writable')
        warnings.filterwarnings('ignore', message=r'You are shadowing an attribute \(modules\)')  # fastai's ActivationStats
        return _run(dict(QUICK if quick else FULL), quick, out)


def _run(cfg, quick, out):
    start = time.perf_counter()
    machine = machine_info()
    _log(f"{'quick' if quick else 'full'} run; results go to {Path(out).resolve()}")
    dls = example_dls('flights', bs=cfg['bs'], n_rows=cfg['n_rows'])
    learners = {}
    overhead, times = overhead_section(dls, cfg, learners)
    models = {f"flights {cfg['layers']}": learners['plain'].model}
    for width in cfg['deep_widths']:  # many tensors: narrow ones show per-tensor overhead, wide ones memory traffic
        deep = _learner(dls, [width] * cfg['deep_depth'], cfg['p']).model
        n_deep = sum(1 for p in deep.parameters() if p.requires_grad)
        models[f"deep {cfg['deep_depth']}x{width} ({n_deep} tensors)"] = deep
    results = dict(overhead=overhead,
                   optimizer=optimizer_section(models, cfg),
                   precise_bn=precise_bn_section(learners['plain'], cfg),
                   memory=memory_section(learners, len(dls.train)),
                   scaling=scaling_section(cfg, dls, times, learners))
    machine.update(load_avg_end=_load(), total_s=round(time.perf_counter() - start, 1))
    config = dict(cfg, quick=quick, flights_rows=len(dls.train_ds) + len(dls.valid_ds))
    write_results(results, machine, config, out)   # files first: a closed stdout pipe must not lose them
    print_results(results, machine, config)
    _log(f"done in {machine['total_s']:.0f} s; wrote {Path(out).resolve()}")
    return results


def main(argv=None):
    "`python -m fastai_l5.bench [--quick] [--out DIR]`."
    p = argparse.ArgumentParser(prog='fastai_l5.bench', description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='a one-minute smoke run (tiny sizes)')
    p.add_argument('--out', default='l5_bench', help='folder for the CSV, JSON and markdown results')
    args = p.parse_args(argv)
    bench(quick=args.quick, out=args.out)


if __name__ == '__main__': main()
