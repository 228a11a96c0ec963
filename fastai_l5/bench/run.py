"""`bench()`: runs the sections of the registry `SECTIONS` in order and shows and keeps their tables.

Adding a section: write `fastai_l5/bench/<name>.py` with `section(run) -> DataFrame`, whose rows carry `target` and
`status` columns (`common.judged`, or `common.ROLE_COLUMNS` for a row that is not judged), and add one `Section`
line below, in the place its number gives it. `run` is the `Run` every section shares: the config, the flights
loaders, the learners the overhead section ended with (by variant), its first pass's times, and `run.plain()`, a
plain flights learner. A section that reads what another leaves on `run` names it in `needs`: `bench(only=...)`
runs that one first. The tests (tests/test_bench.py) run every section of the registry in the quick run."""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..data import example_dls
from . import diagnose_cost, memory, optimizer, overhead, precise_bn, report_threads, scaling
from .common import BenchConfig, load_avg, log, machine_info
from .fits import learner
from .output import print_results, write_results

__all__ = ['bench', 'Section', 'SECTIONS', 'Run']


@dataclass
class Section:
    """One bench section: `name` (its CSV file and `--only` name), the `title` of its table, `run(run) -> DataFrame`,
    the sections it `needs` to have run first, and `note(df) -> str`, printed under its table, if any."""
    name: str
    title: str
    run: Callable
    needs: tuple = ()
    note: Callable | None = None


SECTIONS = {s.name: s for s in [
    Section('overhead', '1. Training overhead: one epoch of fit_one_cycle, flights tabular_learner', overhead.section,
            note=overhead.noise_note),
    Section('optimizer', '2. Optimizer step: ours vs fastai native vs torch.optim foreach (time per step)',
            optimizer.section),
    Section('precise_bn', '3. precise_bn vs a no-grad forward over the same batches', precise_bn.section),
    Section('memory', '4. Memory: logs per 1,000 steps and learn.export() size', memory.section, needs=('overhead',)),
    Section('scaling', '5. Scaling: all three callbacks vs plain, by model width and by rows', scaling.section),
    Section('diagnose', '6. diagnose: its time (counterfactuals included) as a share of the fit it diagnoses',
            diagnose_cost.section),
    Section('report_threads', "7. fastai-l5 report's time at 1 and the usual torch threads, quiet and beside a CPU load",
            report_threads.section),
]}


@dataclass
class Run:
    "What the sections of one bench run share (see the module docstring)."
    cfg: BenchConfig
    dls: object
    learners: dict = field(default_factory=dict)
    overhead_times: tuple | None = None

    def plain(self):
        "The overhead section's plain learner, or a fresh one when that section did not run."
        if 'plain' not in self.learners: self.learners['plain'] = learner(self.dls, self.cfg.layers, self.cfg.p)
        return self.learners['plain']


def bench(quick=False, out='l5_bench', only=None, config=None):
    """Run the benchmark, print its table, write `out/{section}.csv`, `out/bench.json` (with the machine
    description) and `out/bench.md`; return `{section: DataFrame}`. `quick=True`: tiny sizes, one round, about a
    minute: a smoke run whose numbers mean nothing. `only`: the sections to run (with those they need: the memory
    section reads the overhead section's learners, so it runs that too). `config`: a `BenchConfig` instead of the
    full or quick one."""
    cfg = config or (BenchConfig.quick() if quick else BenchConfig())
    sections = select(only)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='The given NumPy array is not writable')
        warnings.filterwarnings('ignore', message=r'You are shadowing an attribute \(modules\)')  # fastai's ActivationStats
        return _run(cfg, sections, out)


def select(only):
    "The sections to run, in the registry's order, with those they need; raises `ValueError` naming any unknown one."
    if not only: return list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown: raise ValueError(f"unknown bench section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    wanted = set(only) | {n for s in only for n in SECTIONS[s].needs}
    return [s for s in SECTIONS if s in wanted]


def _run(cfg, sections, out):
    start = time.perf_counter()
    machine = machine_info()
    log(f"{'quick' if cfg.is_quick else 'full'} run of {', '.join(sections)}; results go to {Path(out).resolve()}")
    run = Run(cfg, example_dls('flights', bs=cfg.bs, n_rows=cfg.n_rows))
    results = {name: SECTIONS[name].run(run) for name in sections}
    machine.update(load_avg_end=load_avg(), total_s=round(time.perf_counter() - start, 1))
    config = dict(dataclasses.asdict(cfg), quick=cfg.is_quick, sections=sections,
                  flights_rows=len(run.dls.train_ds) + len(run.dls.valid_ds))
    write_results(results, SECTIONS, machine, config, out)   # files first: a closed stdout pipe must not lose them
    print_results(results, SECTIONS, machine, config)
    log(f"done in {machine['total_s']:.0f} s; wrote {Path(out).resolve()}")
    return results
