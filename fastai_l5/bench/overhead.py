"""Section 1, `overhead`: one epoch of `fit_one_cycle` on the flights `tabular_learner`, plain and with each
variant of `fits.variants` (ours, the read floor, fastai's references, W&B and TensorBoard), interleaved round by
round at each thread count of `BenchConfig.threads`. Two measures per variant: `ratio`, the median over rounds of
t(variant)/t(plain) within a round (the A/A repeat shows how finely it resolves), and `share`, the time spent
inside the variant's callbacks' own event methods as a share of the fit's wall time (the targets are judged on it)."""
from __future__ import annotations

import math
import statistics
import tempfile

import pandas as pd

from .common import ROLE_COLUMNS, interleave, judged, log, paired, threads
from .fits import counted, fit_runs, installed, variants, wandb_name, wandb_run

__all__ = ['section', 'overhead_section', 'noise_note']


def section(run):
    "The registry's entry (see `fastai_l5.bench.run`): the rows; keeps every variant's learner and the first pass's times on `run`."
    df, run.overhead_times = overhead_section(run.dls, run.cfg, run.learners)
    return df


def overhead_section(dls, cfg, keep):
    """Every variant's fit time, its ratio to the plain fit of the same round and its in-callback share, at each
    thread count of `cfg.threads`. Returns the rows and the first pass's `(wall times, (cpu, share))`."""
    with_wandb, with_tb = cfg.wandb and installed('wandb'), cfg.wandb and installed('tensorboard')
    if cfg.wandb and not (with_wandb and with_tb):
        log("overhead: wandb or tensorboard is not installed, so not all logger rows (pip install fastai_l5[loggers])")
    frames, first, done = [], None, set()
    with wandb_run(with_wandb), tempfile.TemporaryDirectory() as tb_dir:
        vs = variants(cfg, with_wandb, tb_dir if with_tb else None)
        for n in cfg.threads:
            with threads(n) as n_threads:
                if n_threads in done: continue   # torch's default is this count already
                done.add(n_threads)
                log(f"overhead at {n_threads} torch thread(s): {len(vs)} variants x ({cfg.warmup} warm-up + "
                    f"{cfg.rounds} rounds), {len(dls.train)} steps per fit")
                extra = {}
                times = interleave(fit_runs(dls, cfg.layers, cfg.p, vs, keep, extra), cfg.rounds, cfg.warmup,
                                   label=f'overhead, {n_threads} thread(s)')
                extra = counted(extra, cfg.rounds)
                frames.append(_overhead_rows(vs, times, extra, n_threads))
                if first is None: first = (times, extra)
    return pd.concat(frames, ignore_index=True), first


def _overhead_rows(variants, times, extra, n_threads):
    "One thread setting's rows: measures first, then each row judged by its role."
    base, rows = times['plain'], {}
    for v in variants:
        t, (cpu, share) = times[v.name], extra[v.name]
        ratio, lo, hi = paired(t, base)
        rows[v.name] = dict(threads=n_threads, variant=v.name, median_s=statistics.median(t), min_s=min(t), max_s=max(t),
                            ratio=ratio, ratio_min=lo, ratio_max=hi, cpu_ratio=paired(cpu, extra['plain'][0])[0],
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
    ref = rows.get(wandb_name(v.every)) if v.every else None
    if ref is None or ref['ratio'] <= 1: return math.nan
    return (rows[v.name]['ratio'] - 1) / (ref['ratio'] - 1)


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
