"""Batch norm made visible: how far each training batch sits from BN's running statistics and how far
those have drifted (`BNDrift`), the gap between the running (EMA) statistics and the true population
statistics at the current weights (`precise_bn`), and which continuous inputs of new data have moved
away from what `bn_cont` saw in training (`bn_shift`)."""
from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from fastai.learner import Learner
from fastai.tabular.core import FillMissing, Normalize
from fastai.torch_core import rank_distrib
from fastcore.basics import patch_to
from fastcore.foundation import L
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .core import LogTable, StepCallback, rank0_log, unwrap_model

__all__ = ['BNDrift', 'precise_bn', 'bn_shift', 'bn_layers']


# ---------------------------------------------------------------------------------------------
# Finding BN layers

def bn_layers(model):
    """`L` of `(name, module)` for every BN layer (`torch.nn.modules.batchnorm._BatchNorm`, so
    `SyncBatchNorm` too) of `model` that keeps running statistics, in `named_modules()` order. Looked up
    afresh on each call: `DistributedTrainer` swaps module objects at `before_fit`."""
    return L((name, m) for name, m in unwrap_model(model).named_modules()
             if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None)


def _require_bn(model, who):
    bns = bn_layers(model)
    if not bns:
        raise ValueError(f"{who} needs a BatchNorm layer that tracks running statistics, and the model has none; "
                         "build it with batch norm (tabular_learner does by default: use_bn=True, bn_cont=True)")
    return bns


# ---------------------------------------------------------------------------------------------
# Population statistics (the precise pass)

@contextlib.contextmanager
def _preserved_rng(*dls):
    "Iterating a fastai `DataLoader` reseeds its `rng`, and dropout draws from torch's RNG: put both back afterwards."
    dls = [d for dl in dls for d in (dl, getattr(dl, 'dl', None)) if hasattr(d, 'rng')]
    states = [dl.rng.getstate() for dl in dls]
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices): yield
    finally:
        for dl, s in zip(dls, states): dl.rng.setstate(s)
        random.setstate(py_state); np.random.set_state(np_state)


@contextlib.contextmanager
def _bn_pass_mode(model, bns, dropout=True):
    """Training mode (BN uses batch statistics) with every BN momentum at 1, so that after each forward
    a layer's running buffers hold exactly that batch's mean and unbiased variance. `dropout=False`
    puts dropout modules in eval mode. Modes, momenta and `num_batches_tracked` are put back on exit;
    `running_mean`/`running_var` are the caller's to set."""
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(bn, bn.momentum) for bn in bns]
    tracked = [(bn, bn.num_batches_tracked.clone()) for bn in bns if bn.num_batches_tracked is not None]
    try:
        model.train()
        if not dropout:
            for m in model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd): m.eval()
        for bn in bns: bn.momentum = 1.
        yield
    finally:
        for bn, mom in momenta: bn.momentum = mom
        for bn, nbt in tracked: bn.num_batches_tracked.copy_(nbt)
        for m, mode in modes: m.training = mode


def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_sum(t):
    "Sum of `t` over all processes (every rank gets the same tensor); `t` itself with one process."
    if _world_size() > 1: dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _merge_moments(n, mean, m2, allsum=_all_sum):
    """Pool per-process `(n, mean, m2)` (count, mean and sum of squared deviations, per channel) into
    the statistics of all samples together, with `allsum` summing a tensor over processes:
    N = Σn, μ = Σn·μ_r/N, M2 = Σ(M2_r + n·(μ_r − μ)²) (Chan et al.'s parallel update)."""
    total = allsum(n.clone())
    gmean = allsum(n * mean) / total
    gm2 = allsum(m2 + n * (mean - gmean) ** 2)
    return total, gmean, gm2


class _MomentAccumulator:
    """Pools per-batch BN statistics over samples in float64: each batch of `n` samples with mean μ_B
    and unbiased variance σ²_B adds n·μ_B to Σx and (n−1)·σ²_B + n·μ_B² to Σx², both taken about a
    shift K (the first batch's mean) so that E[x²] − E[x]² loses no precision."""
    def __init__(self, sizes, device):
        self.sizes, self.n = list(sizes), None
        self.seg = torch.repeat_interleave(torch.arange(len(self.sizes), device=device),
                                           torch.tensor(self.sizes, device=device))

    def _per_channel(self, vals):
        if len(set(vals)) == 1: return float(vals[0])
        return torch.tensor(vals, dtype=torch.float64, device=self.seg.device)[self.seg]

    def add(self, mean, var, counts, within):
        "`counts`: samples per layer in this batch; `within`: the weight of σ²_B per layer (n−1 for plain BN)."
        mean, var = mean.double(), var.double()
        n, w = self._per_channel(counts), self._per_channel(within)
        if self.n is None:
            self.shift = mean.clone()
            self.n, self.s1, self.s2 = torch.zeros_like(mean), torch.zeros_like(mean), torch.zeros_like(mean)
        d = mean - self.shift
        self.n += n
        self.s1 += n * d
        self.s2 += n * d * d + w * var

    def moments(self):
        "`(n, mean, m2)` per channel."
        mean = self.shift + self.s1 / self.n
        return self.n, mean, self.s2 - self.s1 ** 2 / self.n


@torch.no_grad()
def _population_stats(model, bns, batches, dropout=True):
    """Population mean and variance (σ²_P with divisor N, the variance of all the samples the layer saw)
    of every BN layer's input over `batches` (tuples of model inputs), pooled over samples — a batch
    weighs by its size — and over processes under `torch.distributed`. Returns flat float64 tensors
    (channels of all layers concatenated). Leaves running buffers holding the last batch's stats."""
    counts, handles = {}, []
    world = _world_size()
    def record(bn, args):
        x = args[0]
        counts[bn] = x.numel() // x.shape[1]
    acc = _MomentAccumulator([bn.num_features for bn in bns], bns[0].running_mean.device)
    try:
        handles = [bn.register_forward_pre_hook(record) for bn in bns]
        with _bn_pass_mode(model, bns, dropout=dropout):
            for xb in batches:
                model(*xb)
                n = [counts[bn] for bn in bns]
                # SyncBatchNorm's batch statistics already cover all processes' samples (n·world of them)
                tot = [c * world if isinstance(bn, nn.SyncBatchNorm) else c for c, bn in zip(n, bns)]
                within = [c * (t - 1) / t for c, t in zip(n, tot)]
                acc.add(torch.cat([bn.running_mean for bn in bns]), torch.cat([bn.running_var for bn in bns]), n, within)
    finally:
        for h in handles: h.remove()
    if acc.n is None: raise ValueError("the precise pass saw no batch: the loader is empty")
    total, mean, m2 = _merge_moments(*acc.moments())
    return mean, m2 / total


def _from_rank0(t):
    "Rank 0's `t` on every process (in place); `t` itself with one process."
    if _world_size() > 1: dist.broadcast(t, src=0)
    return t


def _all_min(n, device):
    "The smallest of the integer `n` over all processes (every rank gets it); `n` itself with one process."
    if _world_size() == 1: return int(n)
    t = torch.tensor(int(n), dtype=torch.int64, device=device)  # on the model's device: nccl takes CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t)


def _split(learn, b):
    """`(xb, yb)` the way `Learner._split` cuts a batch: the loaders' `n_inp`, or all items but the last
    where the loaders do not say (as under `DistributedDL`)."""
    i = getattr(learn.dls, 'n_inp', 1 if len(b) == 1 else len(b) - 1)
    return b[:i], b[i:]


def _on_device(b, device): return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in b)


def _batches(learn, dl, n_batches):
    "The first `n_batches` input tuples of `dl`, on the model's device."
    device = next(learn.model.parameters()).device
    for i, b in enumerate(dl):
        if i >= n_batches: break
        yield _split(learn, _on_device(b, device))[0]


def _flat_stats(bns):
    return (torch.cat([bn.running_mean for bn in bns]).double(), torch.cat([bn.running_var for bn in bns]).double())


def _layer_means(values, seg, n_layers):
    "Mean over each layer's channels of every row of `values` (k × C) → k × n_layers, one kernel whatever the layer count."
    out = values.new_zeros(values.shape[0], n_layers).index_add_(1, seg, values)
    return out / torch.bincount(seg, minlength=n_layers).to(values)


def _gaps(bns, mean_r, var_r, mean_p, var_p):
    """Per layer, `mean_gap` = mean_c |μ_R − μ_P| / √(σ²_P + eps) and `var_gap` = mean_c |log(σ²_R / σ²_P)|."""
    sizes = [bn.num_features for bn in bns]
    seg = torch.repeat_interleave(torch.arange(len(bns), device=mean_r.device), torch.tensor(sizes, device=mean_r.device))
    eps = torch.tensor([bn.eps for bn in bns], dtype=torch.float64, device=mean_r.device)[seg]
    mean_gap = (mean_r - mean_p).abs() / (var_p + eps).sqrt()
    var_gap = torch.log(var_r / var_p).abs()
    return _layer_means(torch.stack([mean_gap, var_gap]), seg, len(bns)).cpu().numpy()


def _set_stats(bns, mean, var):
    for bn, m, v in zip(bns, mean.split([bn.num_features for bn in bns]), var.split([bn.num_features for bn in bns])):
        bn.running_mean.copy_(m); bn.running_var.copy_(v)


def _check_count(name, value, lo=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name}={value!r} must be an integer >= {lo}")
    return int(value)


def _check_enough(n_batches, dl, device):
    """Raise on every rank alike when some rank's `dl` holds fewer than `n_batches` batches: the count is
    the minimum over processes, so no rank waits forever in the pooling all-reduce for one that gave up."""
    n, world = _all_min(len(dl), device), _world_size()
    where = f" on the rank with the fewest of {world} processes" if world > 1 else ""
    if n == 0:
        raise ValueError(f"precise_bn needs batches, but the loader is empty (it holds only 0 batches{where}): a "
                         "training loader drops its last partial batch, so a dataset smaller than bs gives none; "
                         "pass a dl with at least one batch, e.g. dl=learn.dls.train.new(drop_last=False), or lower bs")
    if n_batches > n:
        raise ValueError(f"n_batches={n_batches} but the loader holds only {n} batches{where}: "
                         f"pass n_batches<={n} or a larger dl")


def precise_bn(learn, n_batches=200, dl=None, dropout=True):
    """Replace every BN layer's running statistics by the population statistics of its inputs over
    `n_batches` batches of `dl` (default the training loader), at the current weights: a no-grad pass in
    training mode, pooled over samples (μ_P = Σx/N, σ²_P = Σ(x − μ_P)²/N, so a batch weighs by its
    size), and over processes when `torch.distributed` is initialised, so every rank ends with the same
    buffers. `dropout=False` switches dropout off for the pass (dropout before BN changes the variance BN
    sees, Li et al. 2019). Momenta, modes, `num_batches_tracked`, weights and optimizer state are left
    as they were. Under `torch.distributed` the batch count is checked collectively: when any rank's `dl` holds
    fewer than `n_batches` batches, every rank raises the same `ValueError` (none is left waiting). Returns, per layer, how far the running statistics were from the population ones:
    `mean_gap` = mean_c |μ_R − μ_P| / √(σ²_P + eps), `var_gap` = mean_c |log(σ²_R / σ²_P)|."""
    bns = _require_bn(learn.model, 'precise_bn')
    n_batches = _check_count('n_batches', n_batches)
    dl = learn.dls.train if dl is None else dl
    _check_enough(n_batches, dl, bns[0][1].running_mean.device)
    names, mods = bns.itemgot(0), list(bns.itemgot(1))
    with torch.no_grad():
        mean_r, var_r = _flat_stats(mods)
        with _preserved_rng(dl):
            mean_p, var_p = _population_stats(unwrap_model(learn.model), mods, _batches(learn, dl, n_batches), dropout)
        gaps = _gaps(mods, mean_r, var_r, mean_p, var_p)
        _set_stats(mods, mean_p, var_p)
    return pd.DataFrame({'layer': list(names), 'mean_gap': gaps[0], 'var_gap': gaps[1]})

patch_to(Learner, nm='precise_bn')(precise_bn)


# ---------------------------------------------------------------------------------------------
# BNDrift

class _DriftPlan:
    """The BN layers of one fit and what `BNDrift` needs per logged batch, kept off the `Callback` (whose
    attribute writes consult the learner) so the hot path is a handful of tensor ops."""
    def __init__(self, bns):
        self.names, self.mods = list(bns.itemgot(0)), list(bns.itemgot(1))
        dev = self.mods[0].running_mean.device
        sizes = [bn.num_features for bn in self.mods]
        self.n_ch, self.n_layers = sum(sizes), len(sizes)
        self.seg = torch.repeat_interleave(torch.arange(self.n_layers, device=dev), torch.tensor(sizes, device=dev))
        self.inv_sizes = 1 / torch.tensor(sizes, device=dev, dtype=torch.float)
        self.eps = torch.tensor([bn.eps for bn in self.mods], device=dev)[self.seg]
        self.refresh()
        start = torch.cat(self.bufs)
        self.mean0, self.rstd0 = start[:self.n_ch].clone(), (start[self.n_ch:] + self.eps).rsqrt()
        self.prev, self.mom_key = torch.empty_like(start), None
        self.pending = self.fwd = self.ran = False
        self.staged, self.staged_at = [], []

    def refresh(self):
        "Every layer's running mean, then every layer's running variance (looked up again each epoch: `.to()` replaces buffers)."
        self.bufs = [bn.running_mean for bn in self.mods] + [bn.running_var for bn in self.mods]

    def snapshot(self):
        torch.cat(self.bufs, out=self.prev)
        self.live = [bn.training for bn in self.mods]

    def inv_momentum(self):
        "1/m per channel, twice (means then variances), of the running-stat update that just ran; cached while momenta stay."
        key = tuple(bn.momentum for bn in self.mods)
        if key != self.mom_key:
            self.mom_key, dev = key, self.seg.device
            inv = torch.tensor([0. if m is None else (math.inf if m == 0 else 1 / m) for m in key], device=dev)
            self.inv_const = inv[self.seg].repeat(2)
            self.cma = torch.tensor([m is None for m in key], device=dev)[self.seg].repeat(2) if None in key else None
        if self.cma is None: return self.inv_const
        # cumulative average: m = 1/num_batches_tracked, already counted for this batch
        nbt = torch.stack([bn.num_batches_tracked for bn in self.mods]).to(self.inv_const)[self.seg].repeat(2)
        return torch.where(self.cma, nbt, self.inv_const)

    def per_layer(self):
        "3 × n_layers: mean_shift, var_shift, mean_drift, each averaged over the layer's channels."
        C, prev = self.n_ch, self.prev
        step_over_m = (torch.cat(self.bufs) - prev).mul_(self.inv_momentum())   # (μ_B − μ_R, σ²_B − σ²_R)
        mean_r, var_r = prev[:C], prev[C:]
        stats = prev.new_empty(3, C)
        torch.mul(step_over_m[:C].abs(), (var_r + self.eps).rsqrt_(), out=stats[0])
        torch.log1p(step_over_m[C:] / var_r, out=stats[1]).abs_()                      # |log(σ²_B / σ²_R)|
        torch.mul((mean_r - self.mean0).abs_(), self.rstd0, out=stats[2])
        # a segment sum, not a matmul: one layer's NaN or inf must not reach the others
        out = stats.new_zeros(3, self.n_layers).index_add_(1, self.seg, stats).float().mul_(self.inv_sizes)
        if not all(self.live):  # a BN layer in eval mode did not update: no batch statistics to show
            out[:2, torch.tensor([not l for l in self.live], device=out.device)] = math.nan
        return out


class BNDrift(StepCallback):
    """Log, for every BN layer, how far each `every`-th training batch's statistics sit from the running
    statistics, and how far those have moved since the fit began (`.df`). The batch statistics are read
    back exactly from the running-stat update, run = (1 − m)·run + m·batch, so nothing hooks the forward:
    μ_B = μ_R + (μ_R,after − μ_R)/m (same for the unbiased σ²_B). A layer with `momentum=None` keeps a
    cumulative average, m = 1/num_batches_tracked; one with momentum 0, or in eval mode during training
    (frozen BN), shows no batch statistics: its shift columns are NaN. A channel whose batch variance is 0
    (a dead unit) gives an infinite `var_shift` for its layer, as the formula says.

    With `precise_every=k`, at the end of every k-th epoch's training phase it measures the population
    statistics over `precise_batches` training batches at the current weights (`precise_bn`'s pass) and
    the validation loss with them, then puts every buffer and random state back, so training goes on
    exactly as without it (`.precise_df`, and a `valid_loss_precise` column in the progress table).

    With `path`, `.df` is also written to that CSV file as training goes (at least once an epoch), and with
    `keep=False` too it is held there only (see `LogTable`); `.precise_df` (one row per measured epoch and
    layer) stays in memory. Under `torch.distributed` every rank measures: the population statistics, the
    precise pass's batch count and both validation losses are pooled over ranks and the gaps are taken from
    rank 0's running statistics (which DDP broadcasts before each forward), so `.precise_df` is the same on
    every rank; `.df` (and its file) is rank 0's alone."""
    _stateattrs = ('_log', '_precise_log', '_plan')
    drift_stats = ('mean_shift', 'var_shift', 'mean_drift')

    def __init__(self, every=1, precise_every=None, precise_batches=50, path=None, keep=True):
        super().__init__()
        self._init_state()  # fastai's Callback.__init__ does not reach Stateful's
        self._log = rank0_log(self._log.columns, path=path, keep=keep)
        self.every = _check_count('every', every)
        self.precise_every = None if precise_every is None else _check_count('precise_every', precise_every)
        self.precise_batches = _check_count('precise_batches', precise_batches)
        self.epoch_columns = {'valid_loss_precise': '_last_precise_loss'} if precise_every else {}
        self.n_train_batch = 0

    def _init_state(self):
        "Fresh log state; also what an unpickled copy (`load_learner`) starts with: in memory, never the CSV file."
        super()._init_state()
        self._log = LogTable(['step', 'epoch', 'layer', *self.drift_stats])
        self._precise_log = LogTable(['epoch', 'layer', 'mean_gap', 'var_gap', 'valid_loss', 'valid_loss_precise'])
        self._plan = None

    @property
    def df(self):
        "One row per (logged training batch, BN layer): `step`, `epoch`, `layer`, `mean_shift`, `var_shift`, `mean_drift`."
        self._unstage()
        return self._log.df

    @property
    def precise_df(self):
        "One row per (measured epoch, BN layer): `epoch`, `layer`, `mean_gap`, `var_gap`, `valid_loss`, `valid_loss_precise`."
        return self._precise_log.df

    def reset(self):
        "Forget every logged row."
        if self._plan is not None: self._plan.staged, self._plan.staged_at = [], []
        self._log.clear(); self._precise_log.clear()

    # --- setup -------------------------------------------------------------------------------
    def before_fit(self):
        super().before_fit()
        self._unstage()
        self._plan = _DriftPlan(_require_bn(self.learn.model, 'BNDrift'))
        self._logs_here, self._measured, self._last_loss_precise = rank_distrib() == 0, False, math.nan

    # --- every logged training batch ---------------------------------------------------------
    def before_train(self): self._plan.refresh()

    def before_batch(self):
        learn, plan = self.learn, self._plan
        if not learn.training: return
        self.n_train_batch += 1
        plan.pending = self._logs_here and self.n_train_batch % self.every == 0
        if not plan.pending: return
        plan.fwd = plan.ran = False
        plan.snapshot()

    def after_pred(self):
        if self._plan.pending: self._plan.fwd = True

    def after_step(self):
        self._plan.ran = self.count_step()

    def after_batch(self): self._stage_pending()

    # a callback ordered before this one (TerminateOnNaNCallback, order -9) may raise CancelFitException in its
    # after_batch, so this one's never runs for that batch: the batch is logged on the way out instead
    def after_cancel_fit(self): self._stage_pending()
    def after_cancel_epoch(self): self._stage_pending()
    def after_cancel_train(self): self._stage_pending()

    def _stage_pending(self):
        "Stage the current batch's row if it was due and its forward pass ran (so its running stats moved)."
        plan = self._plan
        if plan is None or not (plan.pending and plan.fwd and self.learn.training): return
        plan.pending = False
        step = self.n_step if plan.ran else self.n_step + 1  # a batch whose step was skipped feeds the next one
        plan.staged.append(plan.per_layer()); plan.staged_at.append((step, self.learn.epoch))
        if len(plan.staged) >= 64: self._unstage()

    def _unstage(self):
        "Move the staged rows to the host in one copy, as one block of the log."
        plan = self._plan
        if plan is None or not plan.staged: return
        block = torch.stack(plan.staged).cpu().numpy()           # k × 3 × n_layers
        at, n = np.array(plan.staged_at), plan.n_layers
        plan.staged, plan.staged_at = [], []
        self._log.append(step=np.repeat(at[:, 0], n), epoch=np.repeat(at[:, 1], n),
                         layer=np.tile(np.array(plan.names, dtype=object), len(at)),
                         mean_shift=block[:, 0].ravel(), var_shift=block[:, 1].ravel(), mean_drift=block[:, 2].ravel())

    # --- population statistics at epoch end ---------------------------------------------------
    def after_train(self):
        self._unstage(); self._log.flush()  # a streamed log on disk is never more than an epoch behind
        self._measured = bool(self.precise_every) and (self.epoch + 1) % self.precise_every == 0
        self._valid_sum, self._valid_n = 0., 0
        if not self._measured: return
        mods = self._plan.mods
        model, train_dl = unwrap_model(self.learn.model), self.learn.dls.train
        # the same count on every rank, or one would wait forever in the pooling all-reduce
        n = _all_min(min(self.precise_batches, len(train_dl)), mods[0].running_mean.device)
        if n == 0: self._measured = False; return   # no training batch to measure with
        with torch.no_grad():
            saved = [(t, t.clone()) for bn in mods for t in (bn.running_mean, bn.running_var)]
            # without SyncBatchNorm each rank's last batch moved its own buffers; DDP broadcasts rank 0's before
            # every forward, so those are the running statistics the model validates with: compare them
            mean_r, var_r = map(_from_rank0, _flat_stats(mods))
            try:
                with _preserved_rng(train_dl, self.learn.dls.valid):
                    mean_p, var_p = _population_stats(model, mods, _batches(self.learn, train_dl, n))
                    _set_stats(mods, mean_p, var_p)
                    self._last_loss_precise = self._valid_loss(model)
            finally:
                for t, s in saved: t.copy_(s)
            self._gap = _gaps(mods, mean_r, var_r, mean_p, var_p)

    def _valid_loss(self, model):
        """Mean validation loss (weighted by batch size, as `Recorder` does) with the model in eval mode,
        over the validation samples of all ranks (each rank's sum and count are added up)."""
        dl = self.learn.dls.valid
        modes = [(m, m.training) for m in model.modules()]
        device = next(model.parameters()).device
        total = torch.zeros(2, dtype=torch.float64, device=device)   # Σ loss·bs, Σ bs
        try:
            model.eval()
            for b in dl:
                xb, yb = _split(self.learn, _on_device(b, device))
                bs = len(yb[0])
                total[0] += self.learn.loss_func(model(*xb), *yb).detach().double() * bs
                total[1] += bs
        finally:
            for m, mode in modes: m.training = mode
        total = _all_sum(total)
        return float(total[0] / total[1]) if total[1] else float('nan')

    def _last_precise_loss(self): return self._last_loss_precise if self._measured else float('nan')

    def after_loss(self):
        if self.training or not self._measured or not len(self.yb): return
        bs = len(self.yb[0])
        self._valid_sum = self._valid_sum + self.learn.loss.detach().double() * bs
        self._valid_n += bs

    def after_epoch(self):
        if not self._measured: return
        sums = torch.tensor([float(self._valid_sum), float(self._valid_n)], dtype=torch.float64,
                            device=self._plan.mods[0].running_mean.device)
        loss_sum, n = _all_sum(sums).tolist()   # every rank: the validation loss over all ranks' samples
        valid_loss = loss_sum / n if n else float('nan')
        self._precise_log.append(epoch=self.epoch, layer=self._plan.names, mean_gap=self._gap[0], var_gap=self._gap[1],
                                 valid_loss=valid_loss, valid_loss_precise=self._last_loss_precise)

    def after_fit(self):
        super().after_fit()
        self._unstage(); self._log.flush(); self._precise_log.flush()
        self._plan = None   # holds the model's modules: not kept between fits

    # --- plots -------------------------------------------------------------------------------
    def plot(self, stats=drift_stats, layers=None):
        """A `Figure`: one panel per drift stat against `step`, one line per layer, and, when
        `precise_df` has rows, the EMA-vs-population gaps and the two validation losses per epoch."""
        df, pdf = self.df, self.precise_df
        if not len(df) and not len(pdf): raise ValueError("nothing logged yet: train with BNDrift attached, then plot")
        if layers is not None:
            known = set(df['layer']) | set(pdf['layer'])
            bad = [l for l in L(layers) if l not in known]
            if bad: raise ValueError(f"unknown layers {bad}; logged layers are {sorted(known)}")
            df, pdf = df[df['layer'].isin(L(layers))], pdf[pdf['layer'].isin(L(layers))]
        stats = list(L(stats))
        unknown = [s for s in stats if s not in self.drift_stats]
        if unknown: raise ValueError(f"unknown stats {unknown}; choose from {list(self.drift_stats)}")
        panels = [(df, s, 'step') for s in stats if len(df)]
        if len(pdf): panels += [(pdf, 'mean_gap', 'epoch'), (pdf, 'var_gap', 'epoch'), (pdf, None, 'epoch')]
        ncols = 3 if len(panels) > 4 else 2
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(5 * ncols, 3.2 * nrows), layout='constrained')
        axs = fig.subplots(nrows, ncols, squeeze=False).flatten()
        for ax, (d, stat, x) in zip(axs, panels):
            if stat is None:  # the validation loss with running vs population statistics
                per_epoch = d.groupby('epoch', sort=True)[['valid_loss', 'valid_loss_precise']].first()
                ax.plot(per_epoch.index, per_epoch['valid_loss'], 'o-', label='running (EMA) stats')
                ax.plot(per_epoch.index, per_epoch['valid_loss_precise'], 's--', label='population stats')
                ax.set_title('valid loss'); ax.legend(fontsize='small')
            else:
                for layer, g in d.groupby('layer', sort=False):
                    ax.plot(g[x].to_numpy(), g[stat].to_numpy(), 'o-' if x == 'epoch' else '-', lw=1,
                            ms=3, label=str(layer))
                ax.set_title(stat)
            ax.set_xlabel(x)
            if x == 'epoch': ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in axs[len(panels):]: ax.set_visible(False)
        axs[0].legend(fontsize='small', ncols=2)
        fig.suptitle('BatchNorm: batch vs running statistics' + (', EMA vs population' if len(pdf) else ''))
        return fig


# ---------------------------------------------------------------------------------------------
# bn_shift

def _proc(learn, cls):
    procs = getattr(learn.dls, 'procs', None) or getattr(getattr(learn.dls, 'train_ds', None), 'procs', None) or []
    return next((p for p in procs if isinstance(p, cls)), None)


def _ema_samples(bn, bs):
    """How many training samples the running statistics effectively average: an EWMA with weight m
    over batches of `bs` has the variance of a mean over bs·(2 − m)/m samples; a cumulative average
    (momentum None) covers num_batches_tracked·bs."""
    if bn.momentum is None: return float(bn.num_batches_tracked) * bs
    m = bn.momentum
    return float('inf') if m == 0 else bs * (2 - m) / m


def bn_shift(learn, df, threshold=3.):
    """Which continuous features of new data `df` have moved away from what `bn_cont` learned in
    training, in the data's own units (fastai's `Normalize` undone: train_mean = mean + μ_R·std,
    train_std = √σ²_R·std; missing values filled as `FillMissing` does). Per feature:

    - `z` = (new_mean − train_mean) / SE, with SE = train_std·√(1/n_new + 1/n_ema): the gap between the
      means in standard errors of their difference; n_ema = bs·(2 − m)/m is the number of samples BN's
      exponential average effectively holds (about 19·bs for m = 0.1).
    - `std_ratio` = new_std / train_std.
    - `shifted`: |z| > `threshold`, or |log std_ratio| > `threshold` standard errors of a log standard
      deviation, √((κ − 1)/4·(1/n_new + 1/n_ema)) with κ the new data's kurtosis (so heavy tails are not
      flagged for noise).

    Raises `ValueError` for a model without `bn_cont`, or `df` missing one of the model's continuous
    columns (or holding non-numbers there)."""
    model = unwrap_model(learn.model)
    bn = getattr(model, 'bn_cont', None)
    if not isinstance(bn, _BatchNorm) or bn.running_mean is None:
        raise ValueError("bn_shift reads what the model's `bn_cont` BatchNorm learned, and this model has none: "
                         "build it with tabular_config(bn_cont=True) (the default)")
    if not isinstance(df, pd.DataFrame): raise ValueError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    if not threshold > 0: raise ValueError(f"threshold={threshold!r} must be > 0")
    conts = list(learn.dls.cont_names)
    if len(conts) != bn.num_features:
        raise ValueError(f"bn_cont has {bn.num_features} channels but the data has {len(conts)} continuous columns")
    missing = [c for c in conts if c not in df.columns]
    if missing: raise ValueError(f"df lacks the continuous columns {missing} the model was trained on; it needs all of {conts}")
    if not len(df): raise ValueError("df has no rows")
    try: x = df[conts].apply(pd.to_numeric).astype('float64')
    except (TypeError, ValueError) as e: raise ValueError(f"the continuous columns of df must be numeric: {e}") from e
    fill = _proc(learn, FillMissing)
    if fill is not None: x = x.fillna({c: float(v) for c, v in fill.na_dict.items() if c in conts})
    norm = _proc(learn, Normalize)
    scale = np.array([float(norm.stds[c]) for c in conts]) if norm is not None else np.ones(len(conts))
    offset = np.array([float(norm.means[c]) for c in conts]) if norm is not None else np.zeros(len(conts))
    mean_r, var_r = bn.running_mean.detach().double().cpu().numpy(), bn.running_var.detach().double().cpu().numpy()
    train_mean, train_std = offset + mean_r * scale, np.sqrt(var_r) * scale
    n_new, n_ema = x.notna().sum().to_numpy().astype(float), _ema_samples(bn, getattr(learn.dls, 'bs', 64))
    new_mean, new_std = x.mean().to_numpy(), x.std(ddof=1).to_numpy()
    inv_n = 1 / n_new + 1 / n_ema
    z = (new_mean - train_mean) / (train_std * np.sqrt(inv_n))
    kurt = np.nan_to_num(x.kurt().to_numpy() + 3, nan=3.)  # pandas gives excess kurtosis
    std_ratio = new_std / train_std
    z_std = np.log(std_ratio) / np.sqrt(np.maximum(kurt - 1, 1e-6) / 4 * inv_n)
    return pd.DataFrame({'feature': conts, 'train_mean': train_mean, 'train_std': train_std, 'new_mean': new_mean,
                         'new_std': new_std, 'z': z, 'std_ratio': std_ratio,
                         'shifted': (np.abs(z) > threshold) | (np.abs(z_std) > threshold)})
