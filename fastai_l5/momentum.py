"""`MomentumLogger`: what the optimizer's momentum EWMA does, per layer and step, at almost no cost.

With g the gradient a step used, m the first-moment EWMA after that step (fastai's `grad_avg`, torch's
`momentum_buffer` or `exp_avg`), v the second moment, Δp the change the step made to the parameters p,
each taken over a layer's parameters concatenated:

- `grad_norm` = ‖g‖, `mom_norm` = ‖m‖, `cos_mom_grad` = ⟨g, m⟩ / (‖g‖‖m‖)
- `sign_flip` = #{i : gᵢ·mᵢ < 0} / n: the share of entries where the gradient pushes against the momentum
- `update_norm` = ‖Δp‖, `param_norm` = ‖p‖ after the step, `update_ratio` = ‖Δp‖ / ‖p‖
- `beta` = the `mom` hyper-parameter of the step (the EWMA's window is about 1/(1−β) steps)
- `sqr_avg_rms` = √(Σv / n)

An optimizer that keeps no first moment (SGD or RMSProp with `mom=0`) logs NaN in `mom_norm`,
`cos_mom_grad` and `sign_flip`: there is no momentum to compare with. One without a second moment logs
NaN in `sqr_avg_rms`. NaN or inf gradients give NaN or inf in the columns they reach (`sign_flip` is NaN there)."""
from __future__ import annotations

import math
from itertools import groupby

import torch
from fastai.optimizer import OptimWrapper
from fastai.torch_core import rank_distrib
from fastcore.basics import store_attr

from .core import StepCallback, plot_per_layer, rank0_log, unwrap_model

__all__ = ['MomentumLogger']

_STATS = ['grad_norm', 'mom_norm', 'cos_mom_grad', 'sign_flip', 'update_norm', 'param_norm', 'update_ratio',
          'sqr_avg_rms']
_COLUMNS = ['step', 'epoch', 'layer', 'grad_norm', 'mom_norm', 'cos_mom_grad', 'sign_flip', 'update_norm',
            'param_norm', 'update_ratio', 'beta', 'sqr_avg_rms']
# optimizer-state names of the first and second moment, most specific first
_FASTAI_NAMES = (('grad_avg',), ('sqr_avg',))
# torch's RMSprop(centered=True) keeps a `grad_avg` too, but with β = alpha: not the momentum, so not read
_TORCH_NAMES = (('exp_avg', 'momentum_buffer'), ('exp_avg_sq', 'square_avg'))


def _first(state, names):
    for n in names:
        t = state.get(n)
        if isinstance(t, torch.Tensor): return t
    return None


def _module_names(model):
    "Dict `id(param) -> name of the module owning it`, frozen parameters included, names as outside DDP."
    return {id(p): name for name, mod in unwrap_model(model).named_modules() for p in mod.parameters(recurse=False)}


class _Plan:
    "How the stepped parameters map to layers, and which of them hold a first and a second moment."
    def __init__(self, model, opt, ps, has_m, has_v):
        owner, group = _module_names(model), {id(p): i for i, pg in enumerate(opt.param_lists) for p in pg}
        names = [owner.get(id(p), '(not in model)') for p in ps]
        self.layers = list(dict.fromkeys(names))
        pos = {l: i for i, l in enumerate(self.layers)}
        self.layer_group = [group.get(id(ps[names.index(l)]), 0) for l in self.layers]
        self.m_idx = [i for i, h in enumerate(has_m) if h]
        self.v_idx = [i for i, h in enumerate(has_v) if h]
        dev = ps[0].device
        self.idx = torch.tensor([pos[n] for n in names], device=dev)
        self.idx_m, self.idx_v = self.idx[self.m_idx], self.idx[self.v_idx]
        numel = torch.tensor([float(p.numel()) for p in ps], device=dev)
        n_layers = len(self.layers)
        # entries per layer that have a moment; a layer with none gets NaN in those columns (0/0 below)
        self.numel_m = torch.zeros(n_layers, device=dev).index_add_(0, self.idx_m, numel[self.m_idx])
        self.numel_v = torch.zeros(n_layers, device=dev).index_add_(0, self.idx_v, numel[self.v_idx])
        self.nan_if_no_m = torch.where(self.numel_m > 0, 1., math.nan)
        # where each per-parameter value of `_sums` goes in the flattened (7, n_layers) table of sums
        self.flat_idx = torch.cat([self.idx, self.idx + n_layers, self.idx + 2 * n_layers, self.idx_m + 3 * n_layers,
                                   self.idx_m + 4 * n_layers, self.idx_m + 5 * n_layers, self.idx_v + 6 * n_layers])


class _Step:
    "What a logged step carries from `before_step` to `after_step`: kept off the `Callback`, whose setattr is slow."
    snapped, ps = False, None


def _derive(sums, numel_m, numel_v, nan_if_no_m):
    """The `_STATS` rows from per-layer sums (Σg², Σ(Δp)², Σp², Σm², Σg·m, −#{g·m < 0}, Σv), one column per
    (step, layer), with the matching counts of entries that have a first and a second moment."""
    gg, dd, pp, mm, dot, minus_neg, v_sum = sums
    grad_norm, update_norm, param_norm = gg.sqrt(), dd.sqrt(), pp.sqrt()
    mom_norm = mm.sqrt() * nan_if_no_m
    # a NaN or inf product would not count as a flip: such layers get NaN (0·inf = NaN) instead
    sign_flip = minus_neg / -numel_m + dot * 0
    return torch.stack([grad_norm, mom_norm, dot / (grad_norm * mom_norm), sign_flip, update_norm, param_norm,
                        update_norm / param_norm, (v_sum / numel_v).sqrt()])


class MomentumLogger(StepCallback):
    """Log, for every `every`-th real optimizer step, one row per layer with the gradient, the momentum
    EWMA, their agreement (`cos_mom_grad`, `sign_flip`), the update and the β that step used.

    Reads fastai's optimizers and this package's (`grad_avg`, `sqr_avg`, hyper `mom`) and
    `OptimWrapper(torch.optim.SGD/Adam/AdamW/RMSprop)` (`momentum_buffer`, `exp_avg`, `exp_avg_sq`,
    `square_avg`). All reductions are multi-tensor kernels kept on the parameters' device; results go
    to the host in blocks of `flush_every` steps. The history survives `validate`/`get_preds` and further
    fits (steps keep counting), and is left out of `learn.export()`. Under DDP only rank 0 logs (the
    gradients are the ranks' average by then), naming layers as the unwrapped model does. `learn.epoch` is fastai's epoch within
    the fit. The progress table gains the epoch means of `cos_mom_grad` and `sign_flip` (as `mom_cos`,
    `mom_flip`). With `path`, rows are also appended to that CSV file as training goes (`keep=False`: only
    there, and `.df` reads it back).

    Cost: a workspace as big as the model while fitting, and about a dozen multi-tensor passes over the
    parameters, gradients and moments per logged step; `every=k` divides that by k."""
    epoch_columns = {'mom_cos': '_epoch_cos', 'mom_flip': '_epoch_flip'}
    _stateattrs = ('table', '_pending', '_epoch_stats', '_snap', '_snap_key', '_plan', '_plan_key', '_step')

    def __init__(self, every=1, path=None, keep=True, flush_every=32):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r} must be a whole number ≥ 1 (log every `every`-th step)")
        store_attr()
        self._init_state()

    def __setstate__(self, state):
        # an unpickled logger (`load_learner`) starts a fresh log in memory and leaves the CSV file alone
        super().__setstate__({**state, 'path': None, 'keep': True})

    def _init_state(self):
        super()._init_state()
        self.table = rank0_log(_COLUMNS, path=getattr(self, 'path', None), keep=getattr(self, 'keep', True))
        self._pending, self._epoch_stats = [], []
        self._snap = self._snap_key = self._plan = self._plan_key = None
        self._step = _Step()

    # ---- events
    def before_epoch(self): self._epoch_stats = []

    @torch.no_grad()
    def before_step(self):
        "Snapshot p before the step (after `MixedPrecision` unscaled and `GradientClip` clipped g)."
        step = self._step
        step.snapped = False
        if (self.n_step + 1) % self.every or rank_distrib() != 0: return  # under DDP, rank 0 keeps the log
        ps = [p for pg in self.learn.opt.param_lists for p in pg if p.grad is not None]
        if not ps: return
        key = tuple(map(id, ps))
        if key != self._snap_key: self._snap, self._snap_key = [torch.empty_like(p, requires_grad=False) for p in ps], key
        torch._foreach_copy_(self._snap, ps)
        step.ps, step.snapped = ps, True

    @torch.no_grad()
    def after_step(self):
        ran, step = self.count_step(), self._step
        snapped, step.snapped = step.snapped, False
        if not (ran and snapped): return
        opt = self.learn.opt
        names = _TORCH_NAMES if isinstance(opt, OptimWrapper) else _FASTAI_NAMES
        states = opt.opt.state if isinstance(opt, OptimWrapper) else opt.state
        ps = step.ps
        ms, vs = [], []
        for p in ps:
            st = states.get(p) or {}
            ms.append(_first(st, names[0])); vs.append(_first(st, names[1]))
        has_m, has_v = tuple(m is not None for m in ms), tuple(v is not None for v in vs)
        if (self._snap_key, has_m, has_v) != self._plan_key:
            self._plan, self._plan_key = _Plan(self.learn.model, opt, ps, has_m, has_v), (self._snap_key, has_m, has_v)
        plan = self._plan
        sums = self._sums(plan, ps, [p.grad for p in ps], [m for m in ms if m is not None],
                          [v for v in vs if v is not None])
        # the statistics are derived from the sums in blocks, when the rows are drained
        entry = (self.n_step, self.learn.epoch, plan, [float(h.get('mom', math.nan)) for h in opt.hypers], sums)
        self._pending.append(entry)
        self._epoch_stats.append(entry)
        if len(self._pending) >= self.flush_every: self._drain()

    def after_fit(self):
        super().after_fit()
        self._drain()
        # the workspace is as big as the model: free it between fits
        self._snap = self._snap_key = self._plan = self._plan_key = None
        self._step.ps = None

    # ---- the math
    def _sums(self, plan, ps, gs, ms, vs):
        """(7, n_layers) per-layer Σg², Σ(Δp)², Σp², Σm², Σg·m, −#{g·m < 0}, Σv on the parameters' device, with
        no host sync. Per parameter tensor: ‖g‖², ‖Δp‖², ‖p‖², ‖m‖², Σg·m, −#{g·m < 0}, Σv; then one `index_add`
        sums them per layer. The statistics are derived from these sums in blocks (`_stats`), off the hot path."""
        snap, n = self._snap, len(plan.layers)
        torch._foreach_sub_(snap, ps)  # snap = p_before - p_after = -Δp
        scalars = list(torch._foreach_norm(gs + snap + ps + ms))
        n_sq = len(scalars)
        if ms:
            # the workspace now holds g·m, entry by entry, for the parameters that have a moment
            every_m = len(ms) == len(ps)
            w = snap if every_m else [snap[i] for i in plan.m_idx]
            torch._foreach_copy_(w, gs if every_m else [gs[i] for i in plan.m_idx])
            torch._foreach_mul_(w, ms)
            scalars += [t.sum() for t in w]  # a loop of sums beats foreach_norm(ord=1) on CPU
            torch._foreach_clamp_max_(w, 0.)
            torch._foreach_sign_(w)  # -1 where g·m < 0, else 0 (NaN stays NaN)
            scalars += [t.sum() for t in w]
        scalars += [t.sum() for t in vs]
        per_param = torch.stack(scalars).float()
        per_param[:n_sq].square_()
        return torch.zeros(7 * n, device=per_param.device).index_add_(0, plan.flat_idx, per_param).view(7, n)

    # ---- the log
    @staticmethod
    def _stats(entries):
        "The `_STATS` rows, one column per (step, layer) of `entries`, from their per-layer sums."
        blocks = []
        for plan, group in groupby(entries, key=lambda e: e[2]):
            sums = [e[-1] for e in group]
            k = len(sums)
            blocks.append(_derive(torch.cat(sums, 1), plan.numel_m.repeat(k), plan.numel_v.repeat(k),
                                  plan.nan_if_no_m.repeat(k)))
        return torch.cat(blocks, 1)

    def _drain(self):
        "Move the pending steps into the table as one tensor block per column."
        if not self._pending: return
        pending, self._pending = self._pending, []
        cols = dict(zip(_STATS, self._stats(pending).unbind(0)))
        self.table.append(step=[s for s, _, plan, *_ in pending for _ in plan.layers],
                          epoch=[e for _, e, plan, *_ in pending for _ in plan.layers],
                          layer=[l for _, _, plan, *_ in pending for l in plan.layers],
                          beta=[float(betas[g]) for _, _, plan, betas, _ in pending for g in plan.layer_group], **cols)
        self.table.flush()

    @property
    def df(self):
        "One row per (logged step, layer): `step`, `epoch`, `layer` and the statistics in the module docstring."
        self._drain()
        df = self.table.df
        return df.astype({'step': 'int64', 'epoch': 'int64'}) if len(df) else df

    def _epoch_mean(self, row):
        if not self._epoch_stats: return math.nan
        return self._stats(self._epoch_stats)[row].nanmean().item()

    def _epoch_cos(self): return self._epoch_mean(_STATS.index('cos_mom_grad'))
    def _epoch_flip(self): return self._epoch_mean(_STATS.index('sign_flip'))

    def plot(self, stats=('grad_norm', 'mom_norm', 'cos_mom_grad', 'sign_flip', 'update_ratio', 'beta'),
             layers=None, ax=None):
        "A `Figure` with one panel per statistic in `stats` and one line per layer (all layers when `layers` is None)."
        return plot_per_layer(self.df, stats, layers=layers, title='MomentumLogger', ax=ax,
                              logy=('grad_norm', 'mom_norm', 'update_norm', 'param_norm', 'update_ratio'))
