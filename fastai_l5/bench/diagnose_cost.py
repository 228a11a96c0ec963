"""Section 6, `diagnose`: what `diagnose` (with its counterfactuals on copies of the learner) costs, as a share of
the time of the fit it diagnoses, with its noise over several rounds (a fresh fit each round)."""
from __future__ import annotations

import time

import pandas as pd

from .common import judged, log

__all__ = ['section', 'bench_diagnose_cost', 'DIAGNOSE_TARGET']

DIAGNOSE_TARGET = 0.15   # issue 21: diagnose at most 15% of the fit's time on a fit of 150+ steps


def section(run):
    "The registry's entry (see `fastai_l5.bench.run`): the summary row, judged on the median share."
    cfg = run.cfg
    log(f"diagnose: {cfg.diag_rounds} fits of {cfg.diag_epochs} epochs on {cfg.diag_rows} diamonds rows, each diagnosed")
    df = bench_diagnose_cost(n_rows=cfg.diag_rows, epochs=cfg.diag_epochs, rounds=cfg.diag_rounds)
    summary = df.iloc[[-1]].drop(columns='round').reset_index(drop=True)
    return summary.assign(rounds=cfg.diag_rounds,
                          **judged(float(summary['share'].iloc[0]), DIAGNOSE_TARGET, f'share <= {DIAGNOSE_TARGET:.0%}'))


def bench_diagnose_cost(name='diamonds', n_rows=4000, bs=64, epochs=3, lr=3e-3, rounds=3, seed=0):
    """Fit a `tabular_learner` with `MomentumLogger`, `DropoutSchedule` and `BNDrift(precise_every=1)` on example
    `name` (`n_rows` rows, batches of `bs`, `epochs` of one-cycle at `lr`: 150 steps by default) and time `diagnose`
    on it, `rounds` times (a fresh fit each round). Returns one row per round (`round`, `steps`, `fit_s`,
    `diagnose_s`, `share` = diagnose_s / fit_s) and a last row `summary` with the min, median and max share."""
    from fastai.metrics import accuracy, rmse
    from fastai.tabular.all import tabular_config, tabular_learner
    from fastai.torch_core import set_seed
    from ..batchnorm import BNDrift
    from ..data import example_dls
    from ..diagnose import diagnose
    from ..dropout import DropoutSchedule
    from ..momentum import MomentumLogger
    from ..optim import adam
    if rounds < 1: raise ValueError(f"rounds={rounds!r} must be >= 1")
    dls = example_dls(name, n_rows=n_rows, bs=bs, seed=seed)
    rows = []
    for i in range(rounds):
        set_seed(seed + i)
        reg = dls.c == 1
        learn = tabular_learner(dls, layers=[64, 32], config=tabular_config(ps=[.1, .1]), opt_func=adam(),
                                metrics=rmse if reg else accuracy,
                                cbs=[MomentumLogger(), DropoutSchedule([0., .1, .1]), BNDrift(precise_every=1, precise_batches=10)])
        t = time.perf_counter()
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        diagnose(learn)
        diag_s = time.perf_counter() - t
        rows.append(dict(round=i, steps=len(learn.recorder.losses), fit_s=fit_s, diagnose_s=diag_s, share=diag_s / fit_s))
    df = pd.DataFrame(rows)
    s = df['share']
    summary = dict(round='summary', steps=int(df['steps'].median()), fit_s=float(df['fit_s'].median()),
                   diagnose_s=float(df['diagnose_s'].median()), share=float(s.median()),
                   share_min=float(s.min()), share_max=float(s.max()))
    return pd.concat([df, pd.DataFrame([summary])], ignore_index=True)
