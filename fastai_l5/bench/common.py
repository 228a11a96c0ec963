"""What every bench section shares: the run's sizes (`BenchConfig`), how a row is judged against its target, how
runs are paired and interleaved, torch's thread count, and the machine the numbers were measured on."""
from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import fastai
import torch

from .. import __version__

__all__ = ['BenchConfig', 'log', 'status', 'judged', 'ROLE_COLUMNS', 'paired', 'interleave', 'threads',
           'machine_info', 'load_avg']


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
    diag_rows: int = 4000                # diagnose section: diamonds rows, epochs (150 steps at bs 64) and fits
    diag_epochs: int = 3
    diag_rounds: int = 5
    report_epochs: int | None = None     # report_threads section: the recipe's epochs (None: its rule), repeats
    report_repeats: int = 3
    report_loads: tuple = (0, None)      # busy processes beside it (None: one per CPU)
    is_quick: bool = False

    @classmethod
    def quick(cls, **kwargs):
        "Tiny sizes, one round, one thread: checks that everything runs in about a minute; its numbers mean nothing."
        return cls(**{**dict(n_rows=3_000, bs=256, layers=[40, 20], rounds=1, warmup=0, threads=(1,), deep_widths=[16],
                             opt_rounds=2, opt_steps=5, opt_warmup=1, pbn_batches=5, pbn_rounds=1, scale_rows=1_500,
                             widths=[[20, 10]], row_counts=[1_500], scale_rounds=1, scale_warmup=0, diag_rows=1500,
                             diag_epochs=1, diag_rounds=1, report_epochs=1, report_repeats=1, report_loads=(0,),
                             is_quick=True),
                      **kwargs})


def log(msg): print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def status(value, target):
    "'ok' if `value` ≤ `target`, 'MISSED' if not, 'n/a' if nothing was measured."
    if value is None or target is None or not (math.isfinite(value) and math.isfinite(target)): return 'n/a'
    return 'ok' if value <= target else 'MISSED'


def judged(value, limit, label):
    "A row's `target` and `status` columns: `label` says what is compared with what; 'ok' when `value` ≤ `limit`."
    return dict(target=label, status=status(value, limit))


# what a row that is not judged says instead, by role
ROLE_COLUMNS = {'baseline': dict(target='baseline', status='baseline'),
                'noise': dict(target='reference (noise floor)', status='info'),
                'floor': dict(target='reference (read floor)', status='info'),
                'reference': dict(target='reference', status='info'),
                'wandb': dict(target='reference (W&B)', status='info'),
                'tensorboard': dict(target='reference (TensorBoard)', status='info')}


def paired(times, base):
    "Median, min and max over rounds of times[r]/base[r]: each ratio compares runs of the same round."
    r = [t / b for t, b in zip(times, base)]
    return statistics.median(r), min(r), max(r)


def interleave(runs, rounds, warmup, label=None):
    """Call every function of the dict `runs` once per round, in order, for `warmup + rounds` rounds;
    each returns seconds. Returns `{name: [seconds of each counted round]}`."""
    times = {k: [] for k in runs}
    for r in range(warmup + rounds):
        if label: log(f"{label}: {'warm-up' if r < warmup else 'round'} {r + 1}/{warmup + rounds}")
        for name, run in runs.items():
            t = run()
            if r >= warmup: times[name].append(t)
    return times


@contextmanager
def threads(n):
    "torch's intra-op threads set to `n` (None: leave the default) while inside; yields the count in use."
    before = torch.get_num_threads()
    if n is not None: torch.set_num_threads(n)
    try: yield torch.get_num_threads()
    finally: torch.set_num_threads(before)


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
                load_avg_start=load_avg())


def load_avg():
    "The 1-minute load average (None where the OS does not tell)."
    try: return round(os.getloadavg()[0], 2)
    except OSError: return None
