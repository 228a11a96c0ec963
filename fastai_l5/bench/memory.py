"""Section 4, `memory`: bytes the logs hold per 1,000 steps, and `learn.export()` size with and without our
callbacks, read from the learners the overhead section ended with (so it needs that section)."""
from __future__ import annotations

import pickle
import tempfile
import warnings
from pathlib import Path

import pandas as pd
from fastai.callback.hook import ActivationStats

from ..loggers import log_tables
from .common import ROLE_COLUMNS, judged, log
from .fits import variants

__all__ = ['section', 'memory_section', 'log_size', 'export_size', 'EXPORT_TARGET']

EXPORT_TARGET = 1.01


def section(run):
    "The registry's entry (see `fastai_l5.bench.run`): the overhead section's learners, by variant."
    roles = {v.name: v.role for v in variants(run.cfg)}
    return memory_section(run.learners, roles, len(run.dls.train))


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
    log("memory: log sizes and learn.export() sizes")
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

