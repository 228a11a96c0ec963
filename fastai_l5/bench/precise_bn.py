"""Section 3, `precise_bn`: `precise_bn` against a no-grad training-mode forward over the same batches, read from
the training loader and given already in memory."""
from __future__ import annotations

import copy
import statistics
import time

import pandas as pd
import torch

from .common import interleave, judged, log, paired

__all__ = ['section', 'precise_bn_section', 'PRECISE_BN_TARGET']

PRECISE_BN_TARGET = 1.2


def section(run):
    "The registry's entry (see `fastai_l5.bench.run`): on the plain flights learner."
    return precise_bn_section(run.plain(), run.cfg)


def precise_bn_section(learn, cfg):
    """`precise_bn` over n batches against a no-grad training-mode forward over the same batches, both
    reading the training loader (unshuffled, so the batches are the same) and both given the batches
    already in memory (the cost of the pass itself, loading left out)."""
    from ..batchnorm import precise_bn
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
        log(f"precise_bn: {n} batches from the {source} x (1 warm-up + {cfg.pbn_rounds} rounds)")
        t = interleave({'forward': forward(batches), 'precise_bn': pbn(batches)}, cfg.pbn_rounds, 1)
        ratio, lo, hi = paired(t['precise_bn'], t['forward'])
        rows.append(dict(batches_from=source, n_batches=n, bs=dl.bs, precise_bn_s=statistics.median(t['precise_bn']),
                         forward_s=statistics.median(t['forward']), ratio=ratio, ratio_min=lo, ratio_max=hi,
                         rounds=len(t['forward']), **judged(ratio, PRECISE_BN_TARGET, f'<= {PRECISE_BN_TARGET:.1f}x')))
    return pd.DataFrame(rows)

