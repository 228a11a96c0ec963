"""Section 5, `scaling`: overhead and log size of all three callbacks as the model widens and the data grows (the
largest data set's point reuses the overhead section's rounds when that section ran)."""
from __future__ import annotations

import statistics

import pandas as pd

from ..data import example_dls
from .common import interleave, judged, log, paired
from .fits import counted, fit_runs, variants
from .memory import log_size

__all__ = ['section', 'scaling_section', 'ALL_TARGET']

ALL_TARGET = 1.04                                 # all three callbacks' wall-time ratio


def section(run):
    "The registry's entry (see `fastai_l5.bench.run`)."
    return scaling_section(run.cfg, run.dls, run.overhead_times, run.learners)


def _scale_point(dls, layers, cfg, n_rows):
    "Plain against all three callbacks, interleaved, on one (data, width) setting."
    pair = [v for v in variants(cfg) if v.name in ('plain', '+all three')]
    keep, extra = {}, {}
    t = interleave(fit_runs(dls, layers, cfg.p, pair, keep, extra), cfg.scale_rounds, cfg.scale_warmup)
    return _scale_row(dls, layers, n_rows, (t, counted(extra, cfg.scale_rounds)), keep)


def _scale_row(dls, layers, n_rows, times, keep):
    t, extra = times
    cpu = {k: v[0] for k, v in extra.items()}
    ratio, lo, hi = paired(t['+all three'], t['plain'])
    n_steps = len(dls.train)
    _, held, _ = log_size(keep['+all three'])
    n_params = sum(p.numel() for p in keep['plain'].model.parameters())
    return dict(layers=str(list(layers)), params=n_params, rows=n_rows, steps=n_steps,
                plain_s=statistics.median(t['plain']), all_three_s=statistics.median(t['+all three']),
                ratio=ratio, ratio_min=lo, ratio_max=hi, cpu_ratio=paired(cpu['+all three'], cpu['plain'])[0],
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
            log(f"scaling: {n} rows, layers {list(layers)}")
            cache[key] = _scale_point(dls_for(n), layers, cfg, n)
        return cache[key]

    for layers in cfg.widths: rows.append(dict(axis='width', **point(cfg.scale_rows, layers)))
    for n in cfg.row_counts: rows.append(dict(axis='rows', **point(n, cfg.layers)))
    # the largest data set is the overhead section's run: reuse its rounds (first thread setting) rather than rerun it
    if main_times is not None:
        n_main = len(main_dls.train_ds) + len(main_dls.valid_ds)
        rows.append(dict(axis='rows', **_scale_row(main_dls, cfg.layers, n_main, main_times, main_learners)))
    return pd.DataFrame(rows)

