"""`MomentumLogger`: what the optimizer's momentum EWMA does, per layer and step, at almost no cost.

With g the gradient a step used, m_{t−1} the first-moment EWMA carried in from the steps before (fastai's
`grad_avg`, torch's `momentum_buffer` or `exp_avg`, read before this step's update), m_t the same after the
step, v the second moment, Δp the change the step made to the parameters p, each taken over a layer's
parameters concatenated:

- `grad_norm` = ‖g‖, `mom_norm` = ‖m_t‖
- `cos_mom_grad` = ⟨g, m_{t−1}⟩ / (‖g‖‖m_{t−1}‖)
- `sign_flip` = #{i : gᵢ·m_{t−1,i} < 0} / n: the share of entries where the new gradient pushes against the
  momentum carried in (the lecture's overshoot). Compared with m_t instead, g would be compared with itself in
  part (m_t = β·m_{t−1} + (1−β)·g): the cosine would be exactly 1 at the first step.
- `update_norm` = ‖Δp‖, `param_norm` = ‖p‖ after the step, `update_ratio` = ‖Δp‖ / ‖p‖
- `beta` = the `mom` hyper-parameter of the step (the EWMA's window is about 1/(1−β) steps)
- `sqr_avg_rms` = √(Σv / n)

An optimizer that keeps no first moment (SGD or RMSProp with `mom=0`) logs NaN in `mom_norm`,
`cos_mom_grad` and `sign_flip`: there is no momentum to compare with; so does a step with no momentum carried
in yet (the first step, or the first after `freeze`/`unfreeze` cleared the state) in `cos_mom_grad` and
`sign_flip`. One without a second moment logs NaN in `sqr_avg_rms`. NaN or inf gradients give NaN or inf in
the columns they reach (`sign_flip` is NaN there).

How it is computed, per logged step, in one model-sized workspace and no allocation. Before the step
(`before_step`, after `MixedPrecision` unscaled and `GradientClip` clipped g): ‖g‖ and ‖m_{t−1}‖ per tensor in
one `_foreach_norm`; the workspace takes g·m_{t−1} (copy, multiply in place) for Σg·m_{t−1}, then
sign(min(g·m_{t−1}, 0)) ∈ {−1, 0} (clamp and sign in place) for −#{g·m_{t−1} < 0}; then a copy of p. After the
step: −Δp in place in that copy, and ‖Δp‖, ‖p‖, ‖m_t‖ in one `_foreach_norm`; Σ by a loop of sums, as Σv.
The moments are read from the optimizer's own state (`optim.param_moments`), not inferred from the update, so
every optimizer kind gets the same exact columns. (On the CPU, measured on the flights model: allocating
kernels, `_foreach_norm(ord=1)` and a 0-norm count are each slower than these in-place kernels and sums.)
‖Δp‖ needs the parameters from before the step, except where the optimizer states its step as Δp = −c·m_t
(this package's `ForeachSGD` without Nesterov or weight decay: `steps_along_momentum`, `momentum_step_scales`):
then ‖Δp‖ = c·‖m_t‖ comes from the state and no copy of p is made. (In float32 the two differ by the rounding of p, which the copy sees and the state does
not: at most half an ulp of each pᵢ.) The per-tensor values of a block of steps are summed per layer and
turned into the columns at flush time."""
from __future__ import annotations

import math
from itertools import groupby

import torch

from .core import Log, StepCallback, check_count, plot_per_layer, unwrap_model
from .optim import param_moments
from . import loggers  # noqa: F401  (registers the TensorBoard/W&B sinks: core.LOGGER_HOOKS)

__all__ = ['MomentumLogger']

MOMENTUM_LOG = Log('momentum', 'step', ('epoch', 'layer'), {
    'grad_norm': '‖g‖₂ of the gradient the step used (unscaled under mixed precision)',
    'mom_norm': '‖m_t‖₂ of the first-moment EWMA after the step (`grad_avg`, `momentum_buffer` or `exp_avg`)',
    'cos_mom_grad': '⟨g, m_{t−1}⟩ / (‖g‖‖m_{t−1}‖): the gradient against the momentum carried in from the steps '
                    'before (NaN where none is yet)',
    'sign_flip': 'share of the entries with g·m_{t−1} < 0: the gradient pushes against the momentum carried in',
    'update_norm': '‖Δp‖₂ of the step',
    'param_norm': '‖p‖₂ after the step',
    'update_ratio': '‖Δp‖₂ / ‖p‖₂',
    'beta': 'the `mom` hyper-parameter that step used',
    'sqr_avg_rms': '√mean(v) of the second moment, NaN for optimizers without one'}, doc='02_momentum')
_STATS = [c for c in MOMENTUM_LOG.columns if c != 'beta']
def _sums(tensors):
    """Σ of each tensor. A loop: torch has no multi-tensor sum, and `_foreach_norm(ord=1)` (Σ|x|) is about 2-3×
    slower than this loop on the CPU (measured on the flights model's 16 tensors)."""
    return [t.sum() for t in tensors]


def _module_names(model):
    "Dict `id(param) -> name of the module owning it`, frozen parameters included, names as outside DDP."
    return {id(p): name for name, mod in unwrap_model(model).named_modules() for p in mod.parameters(recurse=False)}


def _steps_along_momentum(opt):
    """Whether the optimizer says its step is exactly Δp = −c·m_t (this package's `ForeachSGD` without Nesterov or
    weight decay), so that ‖Δp‖ = c·‖m_t‖ needs no copy of p."""
    return bool(getattr(opt, 'steps_along_momentum', lambda: False)())


class _ParamLayout:
    """How the stepped parameters map to layers, which of them hold a first moment after the step (`has_m`), one
    carried in from before it (`has_mp`) and a second moment (`has_v`), and where each per-tensor value of a step
    goes in the (8, n_layers) table of per-layer sums."""
    def __init__(self, key, model, opt, ps, has_m, has_v, has_mp):
        self.key = key
        owner, group = _module_names(model), {id(p): i for i, pg in enumerate(opt.param_lists) for p in pg}
        names = [owner.get(id(p), '(not in model)') for p in ps]
        self.layers = list(dict.fromkeys(names))
        self.group = [group.get(id(p), 0) for p in ps]
        self.layer_group = [self.group[names.index(l)] for l in self.layers]
        self.m_idx = [i for i, h in enumerate(has_m) if h]
        self.v_idx = [i for i, h in enumerate(has_v) if h]
        pos = {l: i for i, l in enumerate(self.layers)}
        dev, n_layers = ps[0].device, len(self.layers)
        idx = torch.tensor([pos[n] for n in names], device=dev)
        mp_idx = [i for i, h in enumerate(has_mp) if h]
        idx_m, idx_v, idx_mp = idx[self.m_idx], idx[self.v_idx], idx[mp_idx]
        numel = torch.tensor([float(p.numel()) for p in ps], device=dev)
        # entries per layer that have a moment; a layer with none gets NaN in those columns (0/0 in `_derive`)
        per_layer = lambda i, sel: torch.zeros(n_layers, device=dev).index_add_(0, i, numel[sel])
        self.numel_mp, self.numel_v = per_layer(idx_mp, mp_idx), per_layer(idx_v, self.v_idx)
        self.nan_if_no_m = torch.where(per_layer(idx_m, self.m_idx) > 0, 1., math.nan)
        self.nan_if_no_mp = torch.where(self.numel_mp > 0, 1., math.nan)
        # a step's values, in the order `MomentumLogger` lists them: ‖g‖, ‖m_{t−1}‖ (squared at flush time), Σg·m_{t−1},
        # −#{g·m_{t−1}<0} (before the step), then ‖Δp‖, ‖p‖, ‖m_t‖ (squared), Σv; each goes to its row of the table
        order = [idx, idx_mp, idx_mp, idx_mp, idx, idx, idx_m, idx_v]
        self.flat_idx = torch.cat([i + row * n_layers for row, i in enumerate(order)])
        n, n_mp = len(ps), len(mp_idx)
        self.squared = (slice(0, n + n_mp), slice(n + 3 * n_mp, 3 * n + 3 * n_mp + len(self.m_idx)))


def _derive(sums, numel_mp, numel_v, nan_if_no_m, nan_if_no_mp):
    """The `_STATS` rows from per-layer sums (Σg², Σm_{t−1}², Σg·m_{t−1}, −#{g·m_{t−1}<0}, Σ(Δp)², Σp², Σm_t², Σv), one
    column per (step, layer), with the matching counts of entries that have a carried-in first moment and a second
    moment."""
    g_sq, mp_sq, dot, minus_n_neg, dp_sq, p_sq, m_sq, v_sum = sums
    grad_norm, update_norm, param_norm = g_sq.sqrt(), dp_sq.sqrt(), p_sq.sqrt()
    mom_norm, prev_norm = m_sq.sqrt() * nan_if_no_m, mp_sq.sqrt() * nan_if_no_mp
    # a NaN or inf product would not count as a flip: such layers get NaN (0·inf = NaN) instead
    sign_flip = minus_n_neg / -numel_mp + dot * 0
    return torch.stack([grad_norm, mom_norm, dot / (grad_norm * prev_norm), sign_flip, update_norm, param_norm,
                        update_norm / param_norm, (v_sum / numel_v).sqrt()])


class MomentumLogger(StepCallback):
    """Log, for every `every`-th real optimizer step, one row per layer with the gradient, the momentum
    EWMA, their agreement (`cos_mom_grad`, `sign_flip`), the update and the β that step used.

    Reads fastai's optimizers and this package's (`grad_avg`, `sqr_avg`, hyper `mom`) and
    `OptimWrapper(torch.optim.SGD/Adam/AdamW/RMSprop)` (`momentum_buffer`, `exp_avg`, `exp_avg_sq`,
    `square_avg`). All reductions stay on the parameters' device (see the module
    docstring); rows reach the host in blocks (`StepCallback`'s pipeline). The history survives
    `validate`/`get_preds` and further fits (steps keep counting), and is left out of `learn.export()`. Under
    DDP only rank 0 logs (the gradients are the ranks' average by then), naming layers as the unwrapped model
    does. `learn.epoch` is fastai's epoch within the fit. The progress table gains the epoch means of
    `cos_mom_grad` and `sign_flip`, under those names. With `path`, rows are also appended to that CSV
    file as training goes (`keep=False`: only there, and `.df` reads it back).

    `cos_mom_grad` and `sign_flip` compare the step's gradient with the momentum carried in from the steps before
    (NaN at a step with none yet); `mom_norm` is the momentum after the step (see the module docstring).

    Cost per logged step: a copy of the parameters (none with `ForeachSGD`, see the module docstring), seven
    multi-tensor kernels and three sums per tensor; on the other steps, a step count."""
    logs = (MOMENTUM_LOG,)
    epoch_columns = {'cos_mom_grad': '_epoch_cos', 'sign_flip': '_epoch_flip'}  # one name per quantity
    _stateattrs = StepCallback._stateattrs + ('_workspace', '_workspace_key', '_pending', '_layout')

    def __init__(self, every=1, path=None, keep=True):
        super().__init__()
        self.every = check_count('every', every)
        self.open_log(path, keep)

    def _init_state(self):
        super()._init_state()
        self._set(_workspace=None, _workspace_key=None, _pending=None, _layout=None)

    # ---- events (a step that is not logged costs a modulo and a count: `no_grad` is entered only to log)
    def before_step(self):
        if (self.n_step + 1) % self.every == 0 and self.logs_here: self._before_logged_step()

    def after_step(self):
        if self.count_step() and self._pending is not None: self._after_logged_step()

    @torch.no_grad()
    def _before_logged_step(self):
        """On a logged step, before it (after `MixedPrecision` unscaled and `GradientClip` clipped g): ‖g‖, ‖m_{t−1}‖,
        Σg·m_{t−1} and −#{g·m_{t−1} < 0} per tensor, then the copy of p that gives Δp after the step."""
        opt = self.learn.opt
        ps = [p for pg in opt.param_lists for p in pg if p.grad is not None]
        if not ps: return
        key = tuple(map(id, ps))
        if key != self._workspace_key:
            self._set(_workspace=[torch.empty_like(p, requires_grad=False) for p in ps], _workspace_key=key)
        gs, work = [p.grad for p in ps], self._workspace
        _, mps, _ = param_moments(self.learn.opt, ps)
        has_mp = tuple(m is not None for m in mps)
        sel = [i for i, h in enumerate(has_mp) if h]
        mps = [mps[i] for i in sel]
        values = [*torch._foreach_norm([*gs, *mps])]
        if mps:  # the workspace takes g·m_{t−1}, then sign(min(g·m_{t−1}, 0)), in place
            work_m, gs_m = ([work[i] for i in sel], [gs[i] for i in sel]) if len(sel) < len(ps) else (work, gs)
            torch._foreach_copy_(work_m, gs_m)
            torch._foreach_mul_(work_m, mps)
            values += _sums(work_m)
            torch._foreach_clamp_max_(work_m, 0.)
            torch._foreach_sign_(work_m)  # −1 where g·m < 0, else 0 (NaN stays NaN)
            values += _sums(work_m)
        copied = not _steps_along_momentum(opt)
        if copied: torch._foreach_copy_(work, ps)  # then p, for Δp
        self._set(_pending=(ps, copied, has_mp, values))

    @torch.no_grad()
    def _after_logged_step(self):
        (ps, copied, has_mp, before), opt = self._pending, self.learn.opt
        self._set(_pending=None)
        _, ms, vs = param_moments(self.learn.opt, ps)
        layout = self._layout_for(ps, ms, vs, has_mp)
        ms, vs = [m for m in ms if m is not None], [v for v in vs if v is not None]
        values = torch.stack([*before, *self._measure_after(ps, ms, vs, copied)])
        self.stage((self.n_step, self.learn.epoch, layout, [float(h.get('mom', math.nan)) for h in opt.hypers], values))

    def after_fit(self):
        super().after_fit()
        # the copy of p is as big as the model: free it between fits
        self._set(_workspace=None, _workspace_key=None, _pending=None, _layout=None)

    # ---- the math
    def _layout_for(self, ps, ms, vs, has_mp):
        has_m, has_v = tuple(m is not None for m in ms), tuple(v is not None for v in vs)
        key = (tuple(map(id, ps)), has_m, has_v, has_mp)
        if self._layout is None or self._layout.key != key:
            self._set(_layout=_ParamLayout(key, self.learn.model, self.learn.opt, ps, has_m, has_v, has_mp))
        return self._layout

    def _measure_after(self, ps, ms, vs, copied):
        "After the step, per tensor: ‖Δp‖, ‖p‖, ‖m_t‖, Σv (tensors on the parameters' device: no host sync)."
        n = len(ps)
        if copied:
            work = self._workspace
            torch._foreach_sub_(work, ps)  # the copy of p before the step, minus p after it: −Δp
            norms = torch._foreach_norm([*work, *ps, *ms])
        else:  # the optimizer's step is Δp = −c·m_t exactly (see `_steps_along_momentum`)
            norms = torch._foreach_norm([*ps, *ms])
            norms = [*torch._foreach_mul(norms[n:2 * n], self.learn.opt.momentum_step_scales(ps)), *norms]
        return [*norms, *_sums(vs)]

    # ---- the log
    @staticmethod
    def _stats(entries):
        "The `_STATS` rows, one column per (step, layer) of `entries`, from their per-tensor values."
        blocks = []
        for layout, group in groupby(entries, key=lambda e: e[2]):
            values = [e[-1] for e in group]
            k = len(values)
            per_tensor = torch.stack(values)
            if per_tensor.dtype != torch.float64: per_tensor = per_tensor.float()  # half models sum in float32
            for cols in layout.squared: per_tensor[:, cols].square_()
            n = len(layout.layers)
            sums = per_tensor.new_zeros(k, 8 * n).index_add_(1, layout.flat_idx, per_tensor)
            sums = sums.view(k, 8, n).transpose(0, 1).reshape(8, k * n)
            blocks.append(_derive(sums, *(t.repeat(k) for t in (layout.numel_mp, layout.numel_v, layout.nan_if_no_m,
                                                                 layout.nan_if_no_mp))))
        return torch.cat(blocks, 1)

    def rows(self, entries):
        cols = dict(zip(_STATS, self._stats(entries).unbind(0)))
        return dict(step=[s for s, _, layout, *_ in entries for _ in layout.layers],
                    epoch=[e for _, e, layout, *_ in entries for _ in layout.layers],
                    layer=[l for _, _, layout, *_ in entries for l in layout.layers],
                    beta=[float(betas[g]) for _, _, layout, betas, _ in entries for g in layout.layer_group], **cols)

    @property
    def df(self):
        "One row per (logged step, layer): `step`, `epoch`, `layer` and the statistics in the module docstring."
        df = super().df
        return df.astype({'step': 'int64', 'epoch': 'int64'}) if len(df) else df

    def _epoch_cos(self): return self.epoch_mean('cos_mom_grad')
    def _epoch_flip(self): return self.epoch_mean('sign_flip')

    def plot(self, stats=('grad_norm', 'mom_norm', 'cos_mom_grad', 'sign_flip', 'update_ratio', 'beta'),
             layers=None, ax=None):
        "A `Figure` with one panel per statistic in `stats` and one line per layer (all layers when `layers` is None)."
        return plot_per_layer(self.df, stats, layers=layers, title='MomentumLogger', ax=ax,
                              logy=('grad_norm', 'mom_norm', 'update_norm', 'param_norm', 'update_ratio'))
