"""Section 2, `optimizer`: `opt.step()` time of ours against fastai's native optimizers and torch.optim's foreach
ones, same hyper-parameters, gradients fixed, on the flights model and on 70-tensor models, narrow (per-tensor
overhead dominates) and wide (memory traffic dominates)."""
from __future__ import annotations

import copy
import statistics
import time

import pandas as pd
import torch
from fastai.optimizer import SGD, RMSProp, Adam

from .common import interleave, judged, log, paired
from .fits import learner

__all__ = ['section', 'optimizer_section', 'VS_FASTAI_TARGET', 'VS_TORCH_TARGET']

VS_FASTAI_TARGET, VS_TORCH_TARGET = 0.5, 1.1      # ours/fastai ≤ 0.5 is "≥ 2× faster"


def section(run):
    "The registry's entry (see `fastai_l5.bench.run`): the flights model, then the deep ones of `cfg.deep_widths`."
    cfg = run.cfg
    models = {f"flights {cfg.layers}": run.plain().model}
    for width in cfg.deep_widths:  # many tensors: narrow ones show per-tensor overhead, wide ones memory traffic
        deep = learner(run.dls, [width] * cfg.deep_depth, cfg.p).model
        n_deep = sum(1 for p in deep.parameters() if p.requires_grad)
        models[f"deep {cfg.deep_depth}x{width} ({n_deep} tensors)"] = deep
    return optimizer_section(models, cfg)


def _families():
    "Per family: ours, fastai's native optimizer and torch's foreach optimizer, with the same hypers."
    from ..optim import sgd_momentum, rmsprop, adam
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
            log(f"optimizer: {fam} on {model_name}")
            runs = {k: _step_timer(model, grads, f, cfg.opt_steps, cfg.opt_warmup) for k, f in impls.items()}
            t = interleave(runs, cfg.opt_rounds, 0)
            for other, target, label in (('fastai', VS_FASTAI_TARGET, 'fastai native'),
                                         ('torch', VS_TORCH_TARGET, 'torch foreach')):
                ratio, lo, hi = paired(t['ours'], t[other])
                rows.append(dict(family=fam, model=model_name, n_tensors=n_tensors, numel=numel,
                                 versus=label, ours_us=1e6 * statistics.median(t['ours']),
                                 other_us=1e6 * statistics.median(t[other]), ratio=ratio, ratio_min=lo,
                                 ratio_max=hi, speedup=1 / ratio,
                                 **judged(ratio, target, f'ours/{other} <= {target:.2f}x'
                                          + (' (>= 2x faster)' if other == 'fastai' else ''))))
    return pd.DataFrame(rows)


