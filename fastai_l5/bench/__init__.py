"""`fastai-l5 bench`: the numbers behind fastai_l5's cost claims, measured side by side in one run.

Five sections, one module each, each a `DataFrame` whose rows state their target and whether it was met:
`overhead` (our callbacks' cost in a fit, against the plain fit, a read floor, fastai's, W&B's and TensorBoard's),
`optimizer` (our `opt.step()` against fastai's and torch.optim's), `precise_bn` (against a no-grad forward),
`memory` (log bytes per 1,000 steps, `learn.export()` size) and `scaling` (all three callbacks by width and rows).
`common` holds what they share, `fits` the timed fits (variants, `ReadFloor`, `EventClock`), `output` the tables
and files, and `run` the registry `SECTIONS` and `bench()`: its docstring says how to add a section.

`bench(quick=True)` is a smoke run of tiny sizes (used by the tests: it checks structure, not speed);
`bench(only=['overhead'])` runs one section. On a machine shared with other jobs torch's default of one thread
per core makes its threads wait on each other whenever one is descheduled, which drowns the default-thread
ratios in noise: the one-thread rows are the steadier ones there (the thread count is in every row).
The command line (`fastai-l5 bench [--quick] [--only ...]`) is `fastai_l5.cli`'s."""
from .common import BenchConfig
from .fits import EventClock
from .output import format_table
from .run import SECTIONS, bench

__all__ = ['bench', 'BenchConfig', 'EventClock']
