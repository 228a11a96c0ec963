"""Population statistics for BatchNorm (PreciseBN, Wu & Johnson 2021): one pass in training mode at fixed
weights, without gradients, that pools every BN layer's input statistics over a number of batches and
over processes. Used by `precise_bn` (apply them once), `PreciseBNCallback` (apply them at the end of
each epoch's training) and `BNDrift(precise_every=k)` (measure them, then put everything back).

The batch-count policy, stated once (`precise_batch_count`): `n_batches=None` means all the loader
holds, at most `MAX_PRECISE_BATCHES` (200); an explicit count larger than the loader holds raises
`ValueError` from `precise_bn`, and is cut to what the loader holds, with one warning, in the callbacks
(which must not end a fit). Under `torch.distributed` the count is the minimum over processes, so no
rank waits forever in the pooling all-reduce."""
from __future__ import annotations

import contextlib
import random
import warnings
from functools import partial

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from fastai.learner import Learner
from fastcore.basics import patch_to
from fastcore.foundation import L
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .core import Log, StepCallback, check_count, unwrap_model
from .dropout import dropout_layers
from . import loggers  # noqa: F401  (registers the TensorBoard/W&B sinks: core.LOGGER_HOOKS)

__all__ = ['BN_TYPES', 'bn_layers', 'precise_bn', 'PreciseBNCallback', 'MAX_PRECISE_BATCHES', 'all_sum']

MAX_PRECISE_BATCHES = 200


# ---------------------------------------------------------------------------------------------
# Finding BN layers

BN_TYPES = (_BatchNorm,)  # what a BN layer is: BatchNorm1d/2d/3d, SyncBatchNorm, the lazy ones


def bn_layers(model):
    """`L` of `(name, module)` for every BN layer (`BN_TYPES`, so `SyncBatchNorm` too) of `model` that keeps
    running statistics, in `named_modules()` order. Looked up afresh on each call: `DistributedTrainer` swaps
    module objects at `before_fit`."""
    return L((name, m) for name, m in unwrap_model(model).named_modules()
             if isinstance(m, BN_TYPES) and m.track_running_stats and m.running_mean is not None)


def require_bn(model, who):
    "`bn_layers(model)`, or a `ValueError` saying that `who` needs one."
    bns = bn_layers(model)
    if not bns:
        raise ValueError(f"{who} needs a BatchNorm layer that tracks running statistics, and the model has none; "
                         "build it with batch norm (tabular_learner does by default: use_bn=True, bn_cont=True)")
    return bns


def warn_once(cb, msg):
    "Warn `msg`, headed by the callback's class name, the first time only for callback `cb`."
    if cb.__dict__.get('_warned'): return
    cb.__dict__['_warned'] = True
    warnings.warn(f"{type(cb).__name__}: {msg}", stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Processes

def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_sum(t):
    "Sum of `t` over all processes, in place (every rank gets the same tensor); `t` itself with one process."
    if _world_size() > 1: dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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


def _merge_moments(n, mean, m2, allsum=all_sum):
    """Pool per-process `(n, mean, m2)` (count, mean and sum of squared deviations, per channel) into
    the statistics of all samples together, with `allsum` summing a tensor over processes:
    N = Σn, μ = Σn·μ_r/N, M2 = Σ(M2_r + n·(μ_r − μ)²) (Chan et al.'s parallel update)."""
    total = allsum(n.clone())
    gmean = allsum(n * mean) / total
    gm2 = allsum(m2 + n * (mean - gmean) ** 2)
    return total, gmean, gm2


# ---------------------------------------------------------------------------------------------
# The batch-count policy

def precise_batch_count(n_batches, dl, device, strict=True, warn=None, name='n_batches'):
    """How many batches of `dl` a precise pass reads, the same on every rank: `None` gives all the
    loader holds (the fewest over processes), at most `MAX_PRECISE_BATCHES`. An explicit count larger
    than that raises `ValueError` when `strict`, else is cut to it after calling `warn(message)`.
    An empty loader raises when `strict` and gives 0 otherwise. `name`: the argument, in messages."""
    if n_batches is not None: n_batches = check_count(name, n_batches)
    n, world = _all_min(len(dl), device), _world_size()
    where = f" on the rank with the fewest of {world} processes" if world > 1 else ""
    if n == 0 and strict:
        raise ValueError(f"precise_bn needs batches, but the loader is empty (it holds only 0 batches{where}): a "
                         "training loader drops its last partial batch, so a dataset smaller than bs gives none; "
                         "pass a dl with at least one batch, e.g. dl=learn.dls.train.new(drop_last=False), or lower bs")
    if n_batches is None: return min(n, MAX_PRECISE_BATCHES)
    if n_batches <= n: return n_batches
    msg = f"{name}={n_batches} but the loader holds only {n} batches{where}"
    if strict: raise ValueError(f"{msg}: pass {name}<={n}, {name}=None (all of them), or a larger dl")
    if warn is not None: warn(f"{msg}: using {n}")
    return n


# ---------------------------------------------------------------------------------------------
# The pass

@contextlib.contextmanager
def preserved_rng(*dls):
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
def module_modes(model):
    "Put every module's training flag back on exit."
    modes = [(m, m.training) for m in model.modules()]
    try: yield
    finally:
        for m, mode in modes: m.training = mode


@contextlib.contextmanager
def _bn_pass_mode(model, bns, dropout=True):
    """Training mode (BN uses batch statistics) with every BN momentum at 1, so that after each forward
    a layer's running buffers hold exactly that batch's mean and unbiased variance. `dropout=False`
    puts dropout modules in eval mode. Modes, momenta and `num_batches_tracked` are put back on exit;
    `running_mean`/`running_var` are the caller's to set."""
    momenta = [(bn, bn.momentum) for bn in bns]
    tracked = [(bn, bn.num_batches_tracked.clone()) for bn in bns if bn.num_batches_tracked is not None]
    with module_modes(model):
        try:
            model.train()
            if not dropout:
                for m in dropout_layers(model).values(): m.eval()
            for bn in bns: bn.momentum = 1.
            yield
        finally:
            for bn, mom in momenta: bn.momentum = mom
            for bn, counts in tracked: bn.num_batches_tracked.copy_(counts)


class _MomentAccumulator:
    """Pools per-batch BN statistics over samples in float64: each batch of `n` samples with mean μ_B
    and unbiased variance σ²_B adds n·μ_B to Σx and (n−1)·σ²_B + n·μ_B² to Σx², both taken about a
    shift K (the first batch's mean) so that E[x²] − E[x]² loses no precision."""
    def __init__(self, sizes, device):
        self.sizes, self.n = list(sizes), None
        self.seg = channel_layer_index(self.sizes, device)

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


def channel_layer_index(sizes, device):
    "For channels of all layers concatenated (layer i has `sizes[i]`), the index of each channel's layer."
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))


@torch.no_grad()
def pooled_stats(model, bns, batches, dropout=True):
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
                acc.add(*flat_stats(bns), n, within)
    finally:
        for h in handles: h.remove()
    if acc.n is None: raise ValueError("the precise pass saw no batch: the loader is empty")
    total, mean, m2 = _merge_moments(*acc.moments())
    # the all-reduces give every rank the same sums; rank 0's result makes the buffers bitwise equal
    return _from_rank0(mean), _from_rank0(m2 / total)


def split_batch(learn, b):
    """`(xb, yb)` the way `Learner._split` cuts a batch: the loaders' `n_inp`, or all items but the last
    where the loaders do not say (as under `DistributedDL`)."""
    i = getattr(learn.dls, 'n_inp', 1 if len(b) == 1 else len(b) - 1)
    return b[:i], b[i:]


def batch_to_device(b, device): return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in b)


def model_device(learn): return next(learn.model.parameters()).device


def _inputs(learn, dl, n_batches):
    "The model inputs of the first `n_batches` batches of `dl`, on the model's device (any number of inputs)."
    device = model_device(learn)
    for i, b in enumerate(dl):
        if i >= n_batches: break
        yield split_batch(learn, batch_to_device(b, device))[0]


def flat_stats(bns):
    "Every layer's running mean, then every layer's running variance, as two flat float64 tensors."
    return (torch.cat([bn.running_mean for bn in bns]).double(), torch.cat([bn.running_var for bn in bns]).double())


def set_flat_stats(bns, mean, var):
    "Copy flat `mean`/`var` (as `flat_stats` lays them out) into the layers' running buffers."
    sizes = [bn.num_features for bn in bns]
    for bn, m, v in zip(bns, mean.split(sizes), var.split(sizes)):
        bn.running_mean.copy_(m); bn.running_var.copy_(v)


def layer_means(values, seg, n_layers):
    "Mean over each layer's channels of every row of `values` (k × C) → k × n_layers, one kernel whatever the layer count."
    out = values.new_zeros(values.shape[0], n_layers).index_add_(1, seg, values)
    return out / torch.bincount(seg, minlength=n_layers).to(values)


def _gaps(bns, mean_r, var_r, mean_p, var_p):
    """Per layer, `mean_gap` = mean_c |μ_R − μ_P| / √(σ²_P + eps) and `var_gap` = mean_c |log(σ²_R / σ²_P)|."""
    seg = channel_layer_index([bn.num_features for bn in bns], mean_r.device)
    eps = torch.tensor([bn.eps for bn in bns], dtype=torch.float64, device=mean_r.device)[seg]
    mean_gap = (mean_r - mean_p).abs() / (var_p + eps).sqrt()
    var_gap = torch.log(var_r / var_p).abs()
    return layer_means(torch.stack([mean_gap, var_gap]), seg, len(bns)).cpu().numpy()


@torch.no_grad()
def population_pass(learn, bns, dl, n_batches, dropout=True):
    """The population statistics of every BN layer in `bns` (`(name, module)` pairs) over the first
    `n_batches` batches of `dl` at the current weights, pooled over samples and processes, and how far the
    running statistics (rank 0's, which DDP broadcasts before every forward and so validates with) are from
    them. Returns `(mean_p, var_p, gaps)`: flat float64 tensors the same on every rank, and a frame with
    `layer`, `mean_gap`, `var_gap`. The running buffers are left holding the last batch's statistics: the
    caller sets them (`set_flat_stats`). Random states (loader, dropout) are put back."""
    names, mods = list(bns.itemgot(0)), list(bns.itemgot(1))
    mean_r, var_r = map(_from_rank0, flat_stats(mods))
    with preserved_rng(dl):
        mean_p, var_p = pooled_stats(unwrap_model(learn.model), mods, _inputs(learn, dl, n_batches), dropout)
    gaps = _gaps(mods, mean_r, var_r, mean_p, var_p)
    return mean_p, var_p, pd.DataFrame({'layer': names, 'mean_gap': gaps[0], 'var_gap': gaps[1]})


@torch.no_grad()
def valid_loss(learn, dl=None):
    """Mean validation loss over `dl` (default the validation loader) with the model in eval mode,
    weighted by batch size as `Recorder` does, over the samples of all ranks (sums and counts added up)."""
    model, dl = unwrap_model(learn.model), learn.dls.valid if dl is None else dl
    device = model_device(learn)
    total = torch.zeros(2, dtype=torch.float64, device=device)   # Σ loss·bs, Σ bs
    with module_modes(model):
        model.eval()
        for b in dl:
            xb, yb = split_batch(learn, batch_to_device(b, device))
            bs = len(yb[0])
            total[0] += learn.loss_func(model(*xb), *yb).double() * bs
            total[1] += bs
    total = all_sum(total)
    return float(total[0] / total[1]) if total[1] else float('nan')


def _apply_population_stats(learn, bns, dl, n_batches, dropout):
    mean_p, var_p, gaps = population_pass(learn, bns, dl, n_batches, dropout)
    with torch.no_grad(): set_flat_stats(list(bns.itemgot(1)), mean_p, var_p)
    return gaps


# ---------------------------------------------------------------------------------------------
# Applying them: once, or at every epoch end

def precise_bn(learn, n_batches=None, dl=None, dropout=True):
    """Replace every BN layer's running statistics by the population statistics of its inputs over
    `n_batches` batches of `dl` (default the training loader; `None`: all it holds, at most 200), at the
    current weights: a no-grad pass in training mode, pooled over samples (μ_P = Σx/N, σ²_P = Σ(x − μ_P)²/N,
    so a batch weighs by its size), and over processes when `torch.distributed` is initialised, so every
    rank ends with the same buffers. `dropout=False` switches dropout off for the pass (dropout before BN
    changes the variance BN sees, Li et al. 2019). Momenta, modes, `num_batches_tracked`, weights and
    optimizer state are left as they were. An explicit `n_batches` larger than `dl` holds raises
    `ValueError` (on every rank alike under `torch.distributed`: the count is the fewest over ranks).
    Returns, per layer, how far the running statistics were from the population ones:
    `mean_gap` = mean_c |μ_R − μ_P| / √(σ²_P + eps), `var_gap` = mean_c |log(σ²_R / σ²_P)|."""
    bns = require_bn(learn.model, 'precise_bn')
    dl = learn.dls.train if dl is None else dl
    n_batches = precise_batch_count(n_batches, dl, bns[0][1].running_mean.device)
    return _apply_population_stats(learn, bns, dl, n_batches, dropout)

patch_to(Learner, nm='precise_bn')(precise_bn)


# the gaps between running and population statistics, as `precise_bn` returns them and both callbacks log them
GAP_COLUMNS = {
    'mean_gap': 'mean over channels of |μ_R − μ_P| / √(σ²_P + eps): running against population mean',
    'var_gap': 'mean over channels of |log(σ²_R / σ²_P)|: running against population variance'}


class PreciseBNCallback(StepCallback):
    """PreciseBN as a training hook (fvcore's and detectron2's, as a fastai callback): at the end of the
    training phase of every `every`-th epoch, and always of a fit's last epoch, replace every BN layer's
    running statistics by the population statistics over `n_batches` training batches (`precise_bn`'s
    pass; all the loader holds when it holds fewer, said once as a warning). That epoch's validation,
    `learn.export()` and inference then use them. A fit stopped early (`CancelFitException`) gets the
    pass in `after_fit` when it trained since the last one. Under `torch.distributed` the statistics are
    pooled over ranks, so every rank ends with the same buffers.

    `.df`: one row per (epoch, BN layer), `epoch`, `layer`, `mean_gap`, `var_gap`, measured before the
    update (see `precise_bn`); the same on every rank, kept in memory (an exported copy starts empty).
    Attached as `learn.precise_bn_cb`, so `learn.precise_bn` stays the method."""
    order = 45   # after BNDrift (40): its per-epoch gaps measure the EMA, not statistics this callback set
    logs = (Log('bn_precise', 'epoch', ('layer',), GAP_COLUMNS, doc='04_batchnorm'),)

    def __init__(self, every=1, n_batches=MAX_PRECISE_BATCHES, dropout=True):
        super().__init__()
        self.every, self.n_batches = check_count('every', every), check_count('n_batches', n_batches)
        self.dropout = bool(dropout)

    @property
    def name(self): return 'precise_bn_cb'   # fastai's default, 'precise_bn', would hide `Learner.precise_bn`

    def before_fit(self):
        super().before_fit()   # the gaps also go to a TensorBoard/W&B logger of the same fit
        self._trained = False

    def after_batch(self):
        if self.training: self._trained = True

    def after_train(self):
        if (self.epoch + 1) % self.every == 0 or self.epoch == self.n_epoch - 1: self._apply()

    def after_fit(self):
        if self._trained: self._apply()   # stopped early, after training but before this epoch's pass
        super().after_fit()

    def _apply(self):
        self._trained = False
        bns, dl = require_bn(self.learn.model, 'PreciseBNCallback'), self.learn.dls.train
        n = precise_batch_count(self.n_batches, dl, bns[0][1].running_mean.device, strict=False, warn=partial(warn_once, self))
        if n == 0: return warn_once(self, "the training loader holds no batch; running statistics left as they were")
        gaps = _apply_population_stats(self.learn, bns, dl, n, self.dropout)
        self.table.append(epoch=self.epoch, **{c: gaps[c].to_numpy() for c in ('layer', *GAP_COLUMNS)})
        self.table.flush()   # to the host (and a logger's sink) while the fit runs
