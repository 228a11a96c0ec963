"""Batch norm made visible: how far each training batch sits from BN's running statistics and how far
those have drifted (`BNDrift`), and which continuous inputs of new data have moved away from what
`bn_cont` saw in training (`bn_shift`). The population statistics (`precise_bn`, `PreciseBNCallback`)
live in `fastai_l5.precise`; `BNDrift(precise_every=k)` measures with the same pass."""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd
import torch
from fastai.tabular.core import FillMissing, Normalize
from fastcore.foundation import L

from .core import Log, StepCallback, check_arg, check_count, plot_per_layer, unwrap_model
from .precise import (BN_TYPES, GAP_COLUMNS, all_sum, bn_layers, flat_stats, population_pass, precise_batch_count,
                      precise_bn, preserved_rng, require_bn, set_flat_stats, valid_loss, warn_once)

__all__ = ['BNDrift', 'bn_shift']


# ---------------------------------------------------------------------------------------------
# BNDrift

class _DriftLayers:
    """The BN layers of one fit, laid out flat (every layer's running mean, then every layer's running
    variance: 2C values), with what turns staged buffers into the drift columns on the host: each layer's
    first channel and size, eps, and the running statistics when the fit began (μ_0, 1/√(σ²_0 + eps)).
    Plain attributes, kept off the `Callback`, whose attribute writes consult the learner."""
    def __init__(self, bns):
        self.names, self.mods = list(bns.itemgot(0)), list(bns.itemgot(1))
        self.sizes = np.array([bn.num_features for bn in self.mods])
        self.starts, self.n_ch, self.n_layers = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]), int(self.sizes.sum()), len(self.sizes)
        self.eps = np.repeat(np.array([bn.eps for bn in self.mods], dtype=np.float32), self.sizes)
        self.refresh()
        start = torch.cat(self.bufs).float().cpu().numpy()
        self.mean0, self.rstd0 = start[:self.n_ch], 1 / np.sqrt(start[self.n_ch:] + self.eps)

    def refresh(self):
        "The running buffers, looked up again each epoch (`.to()` replaces them)."
        self.bufs = [bn.running_mean for bn in self.mods] + [bn.running_var for bn in self.mods]

    def state(self):
        "What a row needs besides the buffers, read from Python attributes: momenta, modes, and the CMA counters' tensor."
        moms = tuple(bn.momentum for bn in self.mods)
        counts = torch.stack([bn.num_batches_tracked for bn in self.mods]) if None in moms else None
        return moms, tuple(bn.training for bn in self.mods), counts

    @staticmethod
    def inv_momentum(moms, counts):
        "Per layer, 1/m of the running-stat update that ran: inf for m = 0, num_batches_tracked (host array) for a cumulative average (m = None)."
        return np.array([n if m is None else (math.inf if m == 0 else 1 / m) for m, n in zip(moms, counts)], dtype=np.float32)

    def drift(self, before, after, one_over_m, live):
        """k × 3 × n_layers: mean_shift, var_shift, mean_drift of k staged batches, each averaged over the
        layer's channels, in numpy (one pass per formula over the block; no thread pool to wake). `before`,
        `after`: k × 2C running buffers around each batch; `one_over_m`, `live`: k × n_layers."""
        C = self.n_ch
        with np.errstate(divide='ignore', invalid='ignore'):   # m = 0 and dead units give NaN and inf, as documented
            step_over_m = (after - before) * np.tile(np.repeat(one_over_m, self.sizes, axis=1), 2)   # (μ_B − μ_R, σ²_B − σ²_R)
            mean_r, var_r = before[:, :C], before[:, C:]
            stats = np.stack([np.abs(step_over_m[:, :C]) / np.sqrt(var_r + self.eps),
                              np.abs(np.log1p(step_over_m[:, C:] / var_r)),                    # |log(σ²_B / σ²_R)|
                              np.abs(mean_r - self.mean0) * self.rstd0], axis=1)
        # a segment sum over each layer's channels: one layer's NaN or inf must not reach the others
        out = np.add.reduceat(stats, self.starts, axis=2) / self.sizes
        out[:, :2][~np.broadcast_to(live[:, None, :], out[:, :2].shape)] = math.nan   # frozen BN: no batch statistics
        return out


class BNDrift(StepCallback):
    """Log, for every BN layer, how far each `every`-th training batch's statistics sit from the running
    statistics, and how far those have moved since the fit began (`.df`). The batch statistics are read
    back exactly from the running-stat update, run = (1 − m)·run + m·batch, so nothing hooks the forward:
    μ_B = μ_R + (μ_R,after − μ_R)/m (same for the unbiased σ²_B). A layer with `momentum=None` keeps a
    cumulative average, m = 1/num_batches_tracked; one with momentum 0, or in eval mode during training
    (frozen BN), shows no batch statistics: its shift columns are NaN. A channel whose batch variance is 0
    (a dead unit) gives an infinite `var_shift` for its layer, as the formula says.

    Per logged batch it only copies the running buffers before and after the batch into a staging block on
    their device (one `torch.cat` each); the columns are derived for a whole block at once when the
    pipeline flushes (`StepCallback`).

    With `precise_every=k`, at the end of every k-th epoch's training phase it measures the population
    statistics over `precise_batches` training batches at the current weights (`fastai_l5.precise`'s pass,
    its batch-count policy: all the loader holds when fewer, said once) and the validation loss with them,
    then puts every buffer and random state back, so training goes on exactly as without it
    (`.precise_df`, and a `valid_loss_precise` column in the progress table).

    With `path`, `.df` is also written to that CSV file as training goes (at least once an epoch), and with
    `keep=False` too it is held there only (see `LogTable`); `.precise_df` (one row per measured epoch and
    layer) stays in memory. Under `torch.distributed` every rank measures: the population statistics, the
    precise pass's batch count and both validation losses are pooled over ranks and the gaps are taken from
    rank 0's running statistics (which DDP broadcasts before each forward), so `.precise_df` is the same on
    every rank; `.df` (and its file) is rank 0's alone."""
    _stateattrs = StepCallback._stateattrs + ('_layers', '_buffers')
    logs = (Log('bn', 'step', ('epoch', 'layer'), {
                'mean_shift': '|μ_B − μ_R| / √(σ²_R + eps), averaged over channels: the batch mean against the '
                              'running mean before that batch',
                'var_shift': '|log(σ²_B / σ²_R)|, averaged over channels: the batch variance (unbiased) against the '
                             'running variance before that batch',
                'mean_drift': '|μ_R − μ_0| / √(σ²_0 + eps), averaged over channels: how far the running mean moved '
                              'since the fit began'}, doc='04_batchnorm'),
            Log('bn_precise', 'epoch', ('layer',), {
                **GAP_COLUMNS,
                'valid_loss': "that epoch's validation loss with the running statistics",
                'valid_loss_precise': "that epoch's validation loss with the population statistics"},
                attr='precise_df', tags=tuple(GAP_COLUMNS), doc='04_batchnorm'))
    # the validation losses are per epoch, not per layer: they reach TensorBoard/W&B as the progress table's column
    drift_stats = tuple(logs[0].columns)

    def __init__(self, every=1, precise_every=None, precise_batches=50, path=None, keep=True):
        super().__init__()
        self.open_log(path, keep)
        self.every = check_count('every', every)
        self.precise_every = None if precise_every is None else check_count('precise_every', precise_every)
        self.precise_batches = check_count('precise_batches', precise_batches)
        self.epoch_columns = {'valid_loss_precise': '_last_precise_loss'} if precise_every else {}
        self.n_train_batch = 0

    def _init_state(self):
        "Fresh log state; also what an unpickled copy (`load_learner`) starts with: in memory, never the CSV file."
        super()._init_state()
        self._set(_layers=None, _buffers=None, _batch_logged=False)

    @property
    def precise_df(self):
        "One row per (measured epoch, BN layer): `epoch`, `layer`, `mean_gap`, `var_gap`, `valid_loss`, `valid_loss_precise`."
        return self.log_df('bn_precise')

    def reset(self):
        "Forget every logged row."
        self.clear_log()

    # --- setup -------------------------------------------------------------------------------
    def before_fit(self):
        self.flush_log()   # rows staged by a fit that raised belong to its own reference
        super().before_fit()
        layers = _DriftLayers(require_bn(self.learn.model, 'BNDrift'))
        # staged buffers of one flush block: [slot, before/after, 2C]
        self._set(_layers=layers, _buffers=layers.bufs[0].new_empty(self.flush_every, 2, 2 * layers.n_ch))
        self._measured, self._last_loss_precise = False, math.nan

    # --- every logged training batch: copy the buffers, nothing else -------------------------
    def before_train(self): self._layers.refresh()

    def before_batch(self):
        if not self.learn.training: return
        n = self.n_train_batch + 1
        due = self.logs_here and n % self.every == 0
        self._set(n_train_batch=n, _batch_logged=due, _forward_ran=False, _step_ran=False)
        if due: torch.cat(self._layers.bufs, out=self._buffers[len(self._staged), 0])

    def after_pred(self):
        if self._batch_logged: self._set(_forward_ran=True)

    def after_step(self): self._set(_step_ran=self.count_step())

    def after_batch(self): self._stage_due()

    # a callback ordered before this one (TerminateOnNaNCallback, order -9) may raise CancelFitException in its
    # after_batch, so this one's never runs for that batch: the batch is logged on the way out instead
    def after_cancel_fit(self): self._stage_due()
    def after_cancel_epoch(self): self._stage_due()
    def after_cancel_train(self): self._stage_due()

    def _stage_due(self):
        "Stage the current batch if it was due and its forward pass ran (so its running stats moved)."
        if self._layers is None or not (self._batch_logged and self._forward_ran and self.learn.training): return
        self._set(_batch_logged=False)
        torch.cat(self._layers.bufs, out=self._buffers[len(self._staged), 1])
        step = self.n_step if self._step_ran else self.n_step + 1   # a batch whose step was skipped feeds the next one
        self.stage((step, self.learn.epoch, *self._layers.state()))

    def rows(self, entries):
        "The drift columns of the staged block: one copy of the raw buffers to the host, then derived at once."
        layers, k = self._layers, len(entries)
        steps, epochs, moms, live, batch_counts = zip(*entries)
        counted = next((t for t in batch_counts if t is not None), None)   # num_batches_tracked, staged where some m is None
        batch_counts = [[None] * layers.n_layers] * k if counted is None else \
            torch.stack([counted.new_zeros(layers.n_layers) if t is None else t for t in batch_counts]).cpu().numpy()
        one_over_m = np.stack([layers.inv_momentum(m, n) for m, n in zip(moms, batch_counts)])
        staged = self._buffers[:k].float().cpu().numpy()
        block = layers.drift(staged[:, 0], staged[:, 1], one_over_m, np.array(live))
        n = layers.n_layers
        return dict(step=np.repeat(steps, n), epoch=np.repeat(epochs, n), layer=np.tile(np.array(layers.names, dtype=object), k),
                    **{s: block[:, i].ravel() for i, s in enumerate(self.drift_stats)})

    # --- population statistics at epoch end ---------------------------------------------------
    def after_train(self):
        super().after_train()
        self._measured = bool(self.precise_every) and (self.epoch + 1) % self.precise_every == 0
        self._valid_sum, self._valid_n = 0., 0
        if self._measured: self._measure_population()

    def _measure_population(self):
        "The gaps to the population statistics and the validation loss under them; then every buffer as it was."
        learn, bns, mods = self.learn, bn_layers(self.learn.model), self._layers.mods
        n = precise_batch_count(self.precise_batches, learn.dls.train, mods[0].running_mean.device, strict=False,
                                warn=partial(warn_once, self), name='precise_batches')
        if n == 0: self._measured = False; return   # no training batch to measure with
        saved = flat_stats(mods)
        try:
            with preserved_rng(learn.dls.valid):
                mean_p, var_p, self._gaps = population_pass(learn, bns, learn.dls.train, n)
                with torch.no_grad(): set_flat_stats(mods, mean_p, var_p)
                self._last_loss_precise = valid_loss(learn)
        finally:
            with torch.no_grad(): set_flat_stats(mods, *saved)

    def _last_precise_loss(self): return self._last_loss_precise if self._measured else float('nan')

    def after_loss(self):
        if self.training or not self._measured or not len(self.yb): return
        bs = len(self.yb[0])
        self._valid_sum = self._valid_sum + self.learn.loss.detach().double() * bs
        self._valid_n += bs

    def after_epoch(self):
        if not self._measured: return
        sums = torch.tensor([float(self._valid_sum), float(self._valid_n)], dtype=torch.float64,
                            device=self._layers.mods[0].running_mean.device)
        loss_sum, n = all_sum(sums).tolist()   # every rank: the validation loss over all ranks' samples
        valid_loss = loss_sum / n if n else float('nan')
        self.tables['bn_precise'].append(epoch=self.epoch, layer=self._layers.names, mean_gap=self._gaps['mean_gap'].to_numpy(), var_gap=self._gaps['var_gap'].to_numpy(),
                                 valid_loss=valid_loss, valid_loss_precise=self._last_loss_precise)

    def after_fit(self):
        super().after_fit()
        self.tables['bn_precise'].flush()
        self._set(_layers=None, _buffers=None)   # they hold the model's modules: not kept between fits

    # --- plots -------------------------------------------------------------------------------
    _loss_lines = {'valid_loss': 'running (EMA) stats', 'valid_loss_precise': 'population stats'}

    def plot(self, stats=drift_stats, layers=None):
        """A `Figure`: one panel per drift stat against `step`, one line per layer, and, when
        `precise_df` has rows, the EMA-vs-population gaps and the two validation losses per epoch."""
        stats = list(L(stats))
        unknown = [s for s in stats if s not in self.drift_stats]
        if unknown: raise ValueError(f"unknown stats {unknown}; choose from {list(self.drift_stats)}")
        df, precise = self.df, self.precise_df
        frames, panels = [df.drop(columns='epoch')], stats if len(df) else []
        if len(precise):
            per_epoch = precise.groupby('epoch', sort=True)[list(self._loss_lines)].first()
            frames += [precise.drop(columns=list(self._loss_lines))]
            frames += [pd.DataFrame({'epoch': per_epoch.index, 'layer': line, 'valid loss': per_epoch[col].to_numpy()})
                       for col, line in self._loss_lines.items()]
            panels += ['mean_gap', 'var_gap', 'valid loss']
        per_epoch_panels = dict.fromkeys(['mean_gap', 'var_gap', 'valid loss'], 'epoch')
        if layers is not None: layers = L(layers) + (L(self._loss_lines.values()) if len(precise) else L())
        fig = plot_per_layer(pd.concat(frames, ignore_index=True), panels, layers=layers, x=per_epoch_panels,
                             fmt=dict.fromkeys(per_epoch_panels, 'o-'), ncols=3 if len(panels) > 4 else 2,
                             title='BatchNorm: batch vs running statistics' + (', EMA vs population' if len(precise) else ''))
        if len(precise): fig.axes[len(panels) - 1].legend(fontsize='small')
        return fig


# ---------------------------------------------------------------------------------------------
# bn_shift

def _tabular_proc(learn, cls):
    procs = getattr(learn.dls, 'procs', None) or getattr(getattr(learn.dls, 'train_ds', None), 'procs', None) or []
    return next((p for p in procs if isinstance(p, cls)), None)


def _ema_samples(bn, bs):
    """How many training samples the running statistics effectively average: an EWMA with weight m
    over batches of `bs` has the variance of a mean over bs·(2 − m)/m samples; a cumulative average
    (momentum None) covers num_batches_tracked·bs."""
    if bn.momentum is None: return float(bn.num_batches_tracked) * bs
    m = bn.momentum
    return float('inf') if m == 0 else bs * (2 - m) / m


def _train_items(learn, conts):
    "The training rows' continuous columns (processed), or None where the loaders hold none (an exported learner)."
    items = getattr(getattr(learn.dls, 'train_ds', None), 'items', None)
    return items[conts] if isinstance(items, pd.DataFrame) and len(items) and set(conts) <= set(items.columns) else None


def _n_train(learn):
    "Training rows: the running statistics can average no more distinct samples than that (inf when unknown)."
    items = _train_items(learn, list(learn.dls.cont_names))
    return math.inf if items is None else float(len(items))


def _kurtosis(x, default=3.):
    "Per-column kurtosis κ (3 for a normal), at least 1 + 1e-6; `default` where `x` is None or too short."
    if x is None: return default
    return np.maximum(np.nan_to_num(x.kurt().to_numpy() + 3, nan=default), 1 + 1e-6)  # pandas gives excess kurtosis


def bn_shift(learn, df, threshold=3., min_effect=0.1):
    """Which continuous features of new data `df` have moved away from what `bn_cont` learned in
    training, in the data's own units (fastai's `Normalize` undone: train_mean = mean + μ_R·std,
    train_std = √σ²_R·std; missing values filled as `FillMissing` does). Per feature:

    - `z` = (new_mean − train_mean) / SE, with SE = train_std·√(1/n_new + 1/n_ema): the gap between the
      means in standard errors of their difference; n_ema = bs·(2 − m)/m is the number of samples BN's
      exponential average effectively holds (about 19·bs for m = 0.1), at most the training set's size
      (an average over repeated rows holds no more).
    - `effect` = (new_mean − train_mean) / train_std: how far the mean moved, in training standard
      deviations, whatever the sample size.
    - `std_ratio` = new_std / train_std.
    - `shifted`: a change both significant and material. The mean moved: |z| > `threshold` and
      |effect| > `min_effect`; or the spread did: |log std_ratio| > `threshold` standard errors of a log
      standard deviation, √((κ_new − 1)/(4·n_new) + (κ_train − 1)/(4·n_ema)) with κ the kurtosis of the
      new and the training data (so heavy tails are not flagged for noise; κ_new where the training
      rows are gone, as in an exported learner), and std_ratio outside [1/(1 + `min_effect`), 1 + `min_effect`]. With
      enough rows any tiny move is significant: `min_effect` asks whether the data moved, not whether the
      sample is large (`min_effect=0` tests significance alone).

    Raises `ValueError` for a model without `bn_cont`, or `df` missing one of the model's continuous
    columns (or holding non-numbers there)."""
    model = unwrap_model(learn.model)
    bn = getattr(model, 'bn_cont', None)
    if not isinstance(bn, BN_TYPES) or bn.running_mean is None:
        raise ValueError("bn_shift reads what the model's `bn_cont` BatchNorm learned, and this model has none: "
                         "build it with tabular_config(bn_cont=True) (the default)")
    if not isinstance(df, pd.DataFrame): raise ValueError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    check_arg('threshold', threshold, threshold > 0, '> 0')
    check_arg('min_effect', min_effect, min_effect >= 0, '>= 0 (0: significance alone)')
    conts = list(learn.dls.cont_names)
    if len(conts) != bn.num_features:
        raise ValueError(f"bn_cont has {bn.num_features} channels but the data has {len(conts)} continuous columns")
    missing = [c for c in conts if c not in df.columns]
    if missing: raise ValueError(f"df lacks the continuous columns {missing} the model was trained on; it needs all of {conts}")
    if not len(df): raise ValueError("df has no rows")
    try: x = df[conts].apply(pd.to_numeric).astype('float64')
    except (TypeError, ValueError) as e: raise ValueError(f"the continuous columns of df must be numeric: {e}") from e
    fill = _tabular_proc(learn, FillMissing)
    if fill is not None: x = x.fillna({c: float(v) for c, v in fill.na_dict.items() if c in conts})
    norm = _tabular_proc(learn, Normalize)
    scale = np.array([float(norm.stds[c]) for c in conts]) if norm is not None else np.ones(len(conts))
    offset = np.array([float(norm.means[c]) for c in conts]) if norm is not None else np.zeros(len(conts))
    mean_r, var_r = bn.running_mean.detach().double().cpu().numpy(), bn.running_var.detach().double().cpu().numpy()
    train_mean, train_std = offset + mean_r * scale, np.sqrt(var_r) * scale
    n_new = x.notna().sum().to_numpy().astype(float)
    n_ema = min(_ema_samples(bn, getattr(learn.dls, 'bs', 64)), _n_train(learn))
    new_mean, new_std = x.mean().to_numpy(), x.std(ddof=1).to_numpy()
    inv_n = 1 / n_new + 1 / n_ema
    effect = (new_mean - train_mean) / train_std
    z = effect / np.sqrt(inv_n)
    kurt_new = _kurtosis(x)
    kurt_train = _kurtosis(_train_items(learn, conts), default=kurt_new)
    std_ratio = new_std / train_std
    z_std = np.log(std_ratio) / np.sqrt((kurt_new - 1) / 4 / n_new + (kurt_train - 1) / 4 / n_ema)
    mean_moved = (np.abs(z) > threshold) & (np.abs(effect) > min_effect)
    spread_moved = (np.abs(z_std) > threshold) & (np.abs(np.log(std_ratio)) > np.log1p(min_effect))
    return pd.DataFrame({'feature': conts, 'train_mean': train_mean, 'train_std': train_std, 'new_mean': new_mean,
                         'new_std': new_std, 'z': z, 'effect': effect, 'std_ratio': std_ratio,
                         'shifted': mean_moved | spread_moved})
