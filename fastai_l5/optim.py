"""Momentum SGD, RMSProp and Adam as fastai `Optimizer`s whose step runs torch's multi-tensor kernels
(its fused optimizer kernels, one pass over each tensor, where they compute the same update, and
`torch._foreach_*` kernels otherwise), `opt_state` to read any optimizer's per-parameter state as a table, and
the EWMA arithmetic of lesson 5 as small teaching helpers.

The lecture's momentum is an exponentially weighted moving average (EWMA) of the gradients:
S(t) = α·g(t) + (1−α)·S(t−1), S(0) = 0, here written with β = 1−α (fastai's `mom`):
`grad_avg ← β·grad_avg + (1−β)·g`. Unrolled, S(t) = Σₖ (1−β)·βᵏ·g(t−k): weights that fall
geometrically, sum to 1−βᵗ (hence `debias`), and average over about 1/(1−β) steps."""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from functools import partial
from warnings import warn

import numpy as np
import pandas as pd
import torch
from fastai.learner import Learner
from fastai.optimizer import Optimizer, OptimWrapper
from fastcore.basics import store_attr
from fastcore.foundation import L

from .core import check_arg, check_count, check_in_range, param_layer_names

__all__ = ['ForeachOptimizer', 'ForeachSGD', 'ForeachRMSProp', 'ForeachAdam', 'sgd_momentum', 'rmsprop',
           'adam', 'fused_kernel_runs', 'opt_state', 'param_moments', 'ewma_weights', 'effective_window',
           'debias_factor']


# ---------------------------------------------------------------------------------------------------
# Teaching helpers

def _check_beta(beta): return check_in_range('beta', beta, 0., 1.)


def ewma_weights(beta, n):
    "The weights (1−β)·βᵏ, k = 0…n−1, that an EWMA started from zero gives the last n gradients, most recent first."
    _check_beta(beta)
    return (1 - beta) * beta ** torch.arange(check_count('n', n), dtype=torch.float64)


def effective_window(beta):
    "1/(1−β): how many recent steps an EWMA with coefficient β mostly averages over (the weights' total mass / first weight)."
    return 1 / (1 - _check_beta(beta))


def debias_factor(beta, t):
    "1−βᵗ: the total weight an EWMA started from zero has after t steps; dividing by it removes the bias towards 0."
    _check_beta(beta)
    check_arg('t', t, np.all(np.asarray(t) >= 1), '>= 1: steps are counted from 1')
    return 1 - beta ** t


# ---------------------------------------------------------------------------------------------------
# The optimizers

_HYPER_RANGES = {'lr': dict(lo=0., hi=math.inf), 'wd': dict(lo=0., hi=math.inf),
                 'mom': dict(lo=0., hi=1.), 'sqr_mom': dict(lo=0., hi=1.),
                 'eps': dict(lo=0., hi=math.inf, lo_open=True)}


def _check_hypers(**hypers):
    "Raise `ValueError` naming the first hyper-parameter outside its range (see `_HYPER_RANGES`)."
    for k, v in hypers.items():
        if k not in _HYPER_RANGES: continue
        if isinstance(v, slice): v = [o for o in (v.start, v.stop) if o is not None]
        for o in L(v, use_list=None): check_in_range(k, o, **_HYPER_RANGES[k])


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fusable_tensors(ps, grads):
    """Whether torch's fused optimizer kernels take these tensors (one dtype and device, as in a bucket): contiguous
    floats on the CPU or a CUDA device. (The CPU kernels read raw memory, so a strided tensor would be misread.)"""
    return (ps[0].dtype in _FUSED_DTYPES and ps[0].device.type in ('cpu', 'cuda')
            and all(map(torch.Tensor.is_contiguous, ps + grads)))


@functools.cache
def fused_kernel_runs(name, device, dtype):
    """Whether `torch.{name}` (a private fused optimizer kernel, `_fused_sgd_`, `_fused_adam_` or `_fused_adamw_`)
    exists in this torch and computes a known first step on one-element tensors of this `device` and `dtype`. Tried
    once per (kernel, device, dtype); when it does not, a warning says so once and the optimizers step those
    parameters with `torch._foreach_*` kernels instead. (`setup.cfg` allows torch ≥ 2.1, whose CPU has no fused
    kernels; the kernels' names and signatures are not public.) `fused_kernel_runs.cache_clear()` forgets the answers."""
    try:
        kernel = getattr(torch, name)
        one = lambda v=0.: torch.full((1,), v, device=device, dtype=dtype)
        p = one()
        if name == '_fused_sgd_':
            kernel([p], [one(1.)], [one()], weight_decay=0., momentum=0.9, lr=0.1, dampening=0., nesterov=False,
                   maximize=False, is_first_step=False)
        else:
            kernel([p], [one(1.)], [one()], [one()], [], _step_tensors(1, [p]), lr=0.1, beta1=0.9, beta2=0.99,
                   weight_decay=0., eps=1e-8, amsgrad=False, maximize=False)
        # SGD: p = −lr·g; Adam(W) at step 1: p = −lr·m̂/(√v̂ + eps) with m̂ = g, v̂ = g²: both −0.1
        if not math.isclose(p.item(), -0.1, rel_tol=1e-2): raise ValueError(f"computed {p.item()!r} where -0.1 was due")
        return True
    except Exception as e:
        warn(f"fastai_l5: torch {torch.__version__}'s fused kernel torch.{name} does not run on {dtype} tensors on "
             f"{device} ({type(e).__name__}: {e}); those parameters are stepped with torch._foreach_* kernels instead "
             "(the same update, more passes over memory)", stacklevel=2)
        return False


def _step_tensors(step, ps):
    "The per-parameter step counts torch's fused Adam kernel reads: one shared float tensor on the parameters' device."
    return [torch.full((), float(step), device=ps[0].device)] * len(ps)


class ForeachOptimizer(Optimizer):
    """A fastai `Optimizer` (param groups, `freeze`/`unfreeze`, `set_hyper`, `ParamScheduler`,
    `learn.save(with_opt=True)`) whose `step` runs multi-tensor kernels. The parameters that have a
    gradient are put in buckets that share hyper-parameters (across param groups), `do_wd`, step
    count, device and dtype. With `fused=True` (the default) a bucket that torch's fused kernels can
    update is stepped by `fused_update`, one pass over each tensor; any other bucket (or every bucket
    with `fused=False`) by `update`, one `torch._foreach_*` call per operation. Both give the same
    update, up to float rounding.

    Subclasses set `state_keys` (the tensors kept per parameter, named as in fastai), `update`, and
    optionally `fused_update` with `_fusable`. The structural choices (`config`) are saved with the state,
    and `load_state_dict` refuses the state of any other optimizer or configuration instead of loading
    part of it."""
    state_keys = ()

    def __init__(self, params, lr, decouple_wd=True, fused=True, **hypers):
        _check_hypers(lr=lr, **hypers)
        self.decouple_wd, self.fused = decouple_wd, fused
        self._plan, self._plan_sig = [], None
        super().__init__(params, cbs=[], lr=lr, **hypers)
        # try the fused kernel now, not inside the first step (a missing one warns as the optimizer is made)
        for p in self.all_params().itemgot(0): self._kernel_runs(p)

    fused_kernel = None  # the name of the `torch._fused_*` kernel `fused_update` calls

    def _kernel_runs(self, p):
        "Whether this optimizer's fused kernel runs on parameters like `p` (asked once per kernel, device and dtype)."
        return self.fused and self.fused_kernel is not None and fused_kernel_runs(self.fused_kernel, p.device, p.dtype)

    @property
    def config(self):
        "What the saved state depends on besides the hyper-parameters: the class and its structural flags."
        return {'optimizer': type(self).__name__, **self._flags()}

    def _flags(self): return {'decouple_wd': self.decouple_wd}

    def _set_hyper(self, k, v):
        _check_hypers(**{k: v})  # so a scheduler or `set_hyper` cannot put `mom` at 1 mid-training
        super()._set_hyper(k, v)

    def _buckets(self):
        """`[(hyper, do_wd, step, params, grads, states)]`: the parameters that have a gradient, split by shared
        hyper-parameters (groups with equal hypers share a bucket), `do_wd`, step count, device and dtype, with each
        `step` advanced. The split is cached (`_plan`), since making it costs about a microsecond per tensor: it is
        made again when which parameters have a gradient, which groups share hypers, a `do_wd` flag or the state
        itself (`clear_state`, `load_state_dict`, which `freeze`/`unfreeze` call) changes."""
        grads = [p.grad for pg in self.param_lists for p in pg]
        hyper_keys = [tuple(h.items()) for h in self.hypers]
        sig = (id(self.state), tuple(map(hyper_keys.index, hyper_keys)), [g is None for g in grads])
        if sig != self._plan_sig or not self._plan_flags_hold(): self._plan, self._plan_sig = self._make_plan(hyper_keys), sig
        res = []
        for gi, do_wd, idx, ps, states, _ in self._plan:
            for st in states: st['step'] += 1
            res.append((self.hypers[gi], do_wd, states[0]['step'], ps, [grads[i] for i in idx], states))
        return res

    def _plan_flags_hold(self):
        return all([st.get('do_wd', True) for st in states] == flags for *_, states, flags in self._plan)

    def _make_plan(self, hyper_keys):
        """`[(group index, do_wd, indices in the flat parameter list, params, states, do_wd flags)]` for `_buckets`,
        creating the state buffers (at zero, as fastai's) on the way."""
        buckets = {}
        for i, (p, hyper_key) in enumerate((p, hyper_key) for pg, hyper_key in zip(self.param_lists, hyper_keys) for p in pg):
            if p.grad is None: continue
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} needs dense gradients: build embeddings with sparse=False")
            st = self.state[p]
            for k in self.state_keys:
                if k not in st: st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
            key = (hyper_keys.index(hyper_key), st.get('do_wd', True), st.setdefault('step', 0), p.device, p.dtype)
            idx, ps, states = buckets.setdefault(key, ([], [], []))
            idx.append(i); ps.append(p); states.append(st)
        return [(gi, do_wd, idx, ps, states, [do_wd] * len(ps)) for (gi, do_wd, *_), (idx, ps, states) in buckets.items()]

    def clear_state(self):
        super().clear_state()
        self._plan_sig = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None: raise NotImplementedError("fastai optimizers do not support a closure")
        for hyper, do_wd, step, ps, grads, states in self._buckets():
            bufs = {k: [st[k] for st in states] for k in self.state_keys}
            wd = hyper.get('wd', 0.) if do_wd else 0.
            if self.fused and self._fusable(**hyper) and _fusable_tensors(ps, grads) and self._kernel_runs(ps[0]):
                self.fused_update(ps, grads, step=step, **bufs, **{**hyper, 'wd': wd})
            else: self.update(ps, self._decay(ps, grads, hyper['lr'], wd), step=step, **bufs, **hyper)

    def _decay(self, ps, grads, lr, wd):
        "Weight decay: fastai's `p ← p·(1−lr·wd)` when `decouple_wd`, else L2 `g + wd·p` (a new list, `p.grad` untouched)."
        if wd == 0: return grads
        if self.decouple_wd:
            torch._foreach_mul_(ps, 1 - lr * wd)
            return grads
        return torch._foreach_add(grads, ps, alpha=wd)

    def _fused_l2(self, ps, lr, wd):
        "Weight decay before a fused kernel: applies decoupled decay here (`_decay`) and returns 0, or returns the L2 coefficient for the kernel (which leaves `p.grad` untouched)."
        if not self.decouple_wd: return wd
        self._decay(ps, None, lr, wd)
        return 0.

    def update(self, ps, grads, step, **kw):
        "Update the tensors `ps` in place from `grads` (weight decay already applied); `kw` holds the hyper-parameters and the state lists."
        raise NotImplementedError

    def _fusable(self, **hyper):
        "Whether `fused_update` computes this update for a bucket with these hyper-parameters."
        return False

    def fused_update(self, ps, grads, step, wd, **kw):
        "`update` (weight decay `wd` included) with torch's fused kernels, one pass over each tensor."
        raise NotImplementedError

    def load_state_dict(self, sd):
        """Load a state saved by `state_dict` of an optimizer with the same `config` over parameters of the same
        shapes; anything else raises `ValueError` (and warns, since `learn.load` turns errors into a vague warning)
        before anything is changed."""
        try: hypers, states = self._check_state_dict(sd)
        except ValueError as e:
            warn(str(e))
            raise
        params = self.all_params().itemgot(0)
        self.hypers, self._plan_sig = L(dict(h) for h in hypers), None
        self.state = defaultdict(dict, {p: {k: v.to(p.device, p.dtype) if isinstance(v, torch.Tensor) else v
                                            for k, v in st.items()} for p, st in zip(params, states)})

    def _check_state_dict(self, sd):
        me = f"{type(self).__name__} {self.config}"
        fix = "load the weights alone with `learn.load(file, with_opt=False)`, or build the Learner with the optimizer that saved it"
        saved = sd.get('config') if isinstance(sd, dict) else None
        if saved is None:
            keys = sorted({k for st in (sd.get('state', []) if isinstance(sd, dict) else []) for k in st})
            raise ValueError(f"this optimizer state was not saved by a fastai_l5 optimizer (state keys {keys}); "
                             f"it cannot be loaded into {me}: {fix}")
        if saved != self.config:
            raise ValueError(f"this optimizer state was saved by {saved}, which is not {me}: {fix}")
        hypers, states = list(sd['hypers']), list(sd['state'])
        params = self.all_params().itemgot(0)
        if len(hypers) != len(self.param_lists) or len(states) != len(params):
            raise ValueError(f"the saved state has {len(hypers)} param groups and {len(states)} parameters, this "
                             f"optimizer {len(self.param_lists)} and {len(params)}: it belongs to another model")
        allowed = set(self.state_keys) | {'step', *self._keep_on_clear}
        for i, (p, st) in enumerate(zip(params, states)):
            if set(st) - allowed:
                raise ValueError(f"saved state of parameter {i} holds {sorted(set(st) - allowed)}, unknown to {me}")
            for k in self.state_keys:
                if k in st and tuple(st[k].shape) != tuple(p.shape):
                    raise ValueError(f"saved {k} of parameter {i} has shape {tuple(st[k].shape)}, the parameter "
                                     f"{tuple(p.shape)}: the state belongs to another model")
        return hypers, states

    def state_dict(self): return {**super().state_dict(), 'config': self.config}


def _check_sgd_flags(dampening, debias, nesterov):
    "The flag combinations `ForeachSGD` refuses, checked once for `sgd_momentum` and the optimizer alike."
    check_arg('nesterov', nesterov, not (nesterov and dampening),
              "False with dampening=True: Nesterov momentum is defined on PyTorch's heavy ball (dampening=False)")
    check_arg('debias', debias, not (debias and not dampening),
              'False with dampening=False: the heavy-ball sum is not an average to debias (use dampening=True)')


class ForeachSGD(ForeachOptimizer):
    """SGD with momentum. `dampening=True`: the lecture's EWMA `grad_avg ← mom·grad_avg + (1−mom)·g` from
    zero, and with `debias` the step `lr·grad_avg/(1−momᵗ)`. `dampening=False`: PyTorch's heavy ball
    `grad_avg ← mom·grad_avg + g` (gain 1/(1−mom) on a steady gradient), with `nesterov` stepping along
    `g + mom·grad_avg`. Each step uses that step's `mom`: under `fit_one_cycle`'s schedule the EWMA's
    window 1/(1−mom) follows it (and `debias` divides by 1−momᵗ with the current mom, as Adam does)."""
    state_keys = ('grad_avg',)

    def __init__(self, params, lr, mom=0.9, wd=0., dampening=True, debias=False, nesterov=False, decouple_wd=True,
                 fused=True):
        _check_sgd_flags(dampening, debias, nesterov)
        store_attr('dampening,debias,nesterov')
        super().__init__(params, lr, decouple_wd=decouple_wd, fused=fused, mom=mom, wd=wd)

    def _flags(self): return {**super()._flags(), **{k: getattr(self, k) for k in ('dampening', 'debias', 'nesterov')}}

    def update(self, ps, grads, step, grad_avg, lr, mom, **_):
        if self.dampening: torch._foreach_lerp_(grad_avg, grads, 1 - mom)  # β·m + (1−β)·g
        else:
            torch._foreach_mul_(grad_avg, mom)
            torch._foreach_add_(grad_avg, grads)
        direction = torch._foreach_add(grads, grad_avg, alpha=mom) if self.nesterov else grad_avg
        torch._foreach_add_(ps, direction, alpha=-lr * self._debias(mom, step))

    def _debias(self, mom, step): return 1 / debias_factor(mom, step) if self.debias else 1.

    def steps_along_momentum(self):
        "Whether each step is exactly Δp = −c·grad_avg (no Nesterov, no weight decay): see `momentum_step_scales`."
        return not self.nesterov and all(h.get('wd', 0.) == 0 for h in self.hypers)

    def momentum_step_scales(self, ps):
        """After a step, per parameter of `ps`: the c of that step's Δp = −c·grad_avg (lr, over 1 − momᵗ with
        `debias`), so a logger gets ‖Δp‖ = c·‖grad_avg‖ without a copy of p; None where the step is not of that
        form (`steps_along_momentum` is False)."""
        if not self.steps_along_momentum(): return None
        group = {id(p): i for i, pg in enumerate(self.param_lists) for p in pg}
        hypers = [self.hypers[group[id(p)]] for p in ps]
        return [h['lr'] * self._debias(h['mom'], self.state[p]['step']) for p, h in zip(ps, hypers)]

    fused_kernel = '_fused_sgd_'

    def _fusable(self, mom, **_): return mom > 0  # with mom = 0 torch's kernel would not write grad_avg

    def fused_update(self, ps, grads, step, grad_avg, lr, mom, wd, **_):
        # torch's dampening d gives m ← mom·m + (1−d)·g: d = mom is the EWMA, d = 0 the heavy ball. The buffers
        # start at zero, so the kernel's first-step copy of g (is_first_step) is never used.
        torch._fused_sgd_(ps, grads, grad_avg, weight_decay=self._fused_l2(ps, lr, wd), momentum=mom,
                          lr=lr * self._debias(mom, step), dampening=mom if self.dampening else 0.,
                          nesterov=self.nesterov, maximize=False, is_first_step=False)


class ForeachRMSProp(ForeachOptimizer):
    """RMSProp as `torch.optim.RMSprop`: `sqr_avg ← sqr_mom·sqr_avg + (1−sqr_mom)·g²`, the step divides `g` by
    √sqr_avg + eps; `centered` first subtracts grad_mean², grad_mean being the EWMA of g with `sqr_mom`.
    Built with `mom > 0`, `grad_avg ← mom·grad_avg + g/(√sqr_avg + eps)` is stepped along (torch's
    `momentum_buffer`); built with `mom = 0` it keeps no momentum buffer and a scheduled `mom` is ignored,
    as in fastai's `RMSProp`.

    The plain form (no momentum, not centered) is fused: torch's fused Adam kernel with β₁ = 0, whose first
    moment is then g itself (kept in a scratch buffer per parameter, outside the saved state), and a step count
    so large that both of Adam's bias corrections are exactly 1, leaves p ← p − lr·g/(√sqr_avg + eps)."""
    def __init__(self, params, lr, sqr_mom=0.99, mom=0., eps=1e-8, wd=0., centered=False, decouple_wd=True,
                 fused=True):
        store_attr('centered'); self.momentum = mom > 0
        self.state_keys = ('sqr_avg',) + (('grad_avg',) if self.momentum else ()) + (('grad_mean',) if centered else ())
        self._last_grad = {}
        super().__init__(params, lr, decouple_wd=decouple_wd, fused=fused, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)

    def _flags(self): return {**super()._flags(), 'centered': self.centered, 'momentum': self.momentum}

    def update(self, ps, grads, step, sqr_avg, lr, mom, sqr_mom, eps, grad_avg=None, grad_mean=None, **_):
        torch._foreach_mul_(sqr_avg, sqr_mom)
        torch._foreach_addcmul_(sqr_avg, grads, grads, value=1 - sqr_mom)
        if self.centered:
            torch._foreach_lerp_(grad_mean, grads, 1 - sqr_mom)
            denom = torch._foreach_addcmul(sqr_avg, grad_mean, grad_mean, value=-1)
            torch._foreach_sqrt_(denom)
        else: denom = torch._foreach_sqrt(sqr_avg)
        torch._foreach_add_(denom, eps)
        if self.momentum:
            torch._foreach_mul_(grad_avg, mom)
            torch._foreach_addcdiv_(grad_avg, grads, denom)
            torch._foreach_add_(ps, grad_avg, alpha=-lr)
        else: torch._foreach_addcdiv_(ps, grads, denom, value=-lr)

    fused_kernel = '_fused_adam_'
    _NO_DEBIAS_STEP = 2 ** 40  # sqr_mom ** step is 0 in float64: 1 − sqr_momᵗ = 1 exactly

    def _fusable(self, sqr_mom, **_):
        return not (self.momentum or self.centered) and sqr_mom ** self._NO_DEBIAS_STEP == 0

    def fused_update(self, ps, grads, step, sqr_avg, lr, sqr_mom, eps, wd, **_):
        last = [self._last_grad.get(id(p)) for p in ps]  # keyed by id: the optimizer keeps its parameters alive
        last = [t if t is not None else self._last_grad.setdefault(id(p), torch.zeros_like(p)) for p, t in zip(ps, last)]
        torch._fused_adam_(ps, grads, last, sqr_avg, [], _step_tensors(self._NO_DEBIAS_STEP, ps), lr=lr, beta1=0.,
                           beta2=sqr_mom, weight_decay=self._fused_l2(ps, lr, wd), eps=eps, amsgrad=False, maximize=False)


class ForeachAdam(ForeachOptimizer):
    """Adam: `grad_avg ← mom·grad_avg + (1−mom)·g`, `sqr_avg ← sqr_mom·sqr_avg + (1−sqr_mom)·g²`, and
    `p ← p − lr·(grad_avg/(1−momᵗ)) / (√(sqr_avg/(1−sqr_momᵗ)) + eps)`; AdamW when `decouple_wd`. The
    bias corrections use the current `mom` and `sqr_mom`, as torch's and fastai's Adam do."""
    state_keys = ('grad_avg', 'sqr_avg')

    def __init__(self, params, lr, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01, decouple_wd=True, fused=True):
        super().__init__(params, lr, decouple_wd=decouple_wd, fused=fused, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)

    def update(self, ps, grads, step, grad_avg, sqr_avg, lr, mom, sqr_mom, eps, **_):
        torch._foreach_lerp_(grad_avg, grads, 1 - mom)
        torch._foreach_mul_(sqr_avg, sqr_mom)
        torch._foreach_addcmul_(sqr_avg, grads, grads, value=1 - sqr_mom)
        denom = torch._foreach_sqrt(sqr_avg)
        torch._foreach_div_(denom, math.sqrt(debias_factor(sqr_mom, step)))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, grad_avg, denom, value=-lr / debias_factor(mom, step))

    def _fusable(self, **_): return True

    # torch's AdamW kernel decays p ← p·(1−lr·wd) first; its Adam kernel adds wd·p to g (L2)
    @property
    def fused_kernel(self): return '_fused_adamw_' if self.decouple_wd else '_fused_adam_'

    def fused_update(self, ps, grads, step, grad_avg, sqr_avg, lr, mom, sqr_mom, eps, wd, **_):
        getattr(torch, self.fused_kernel)(ps, grads, grad_avg, sqr_avg, [], _step_tensors(step, ps), lr=lr, beta1=mom,
                                          beta2=sqr_mom, weight_decay=wd, eps=eps, amsgrad=False, maximize=False)


# ---------------------------------------------------------------------------------------------------
# opt_func helpers

def sgd_momentum(mom=0.9, dampening=True, debias=False, nesterov=False, wd=0., decouple_wd=True, fused=True):
    """opt_func for `ForeachSGD`: the lecture's EWMA momentum (`dampening=True`) or PyTorch's heavy ball
    (`dampening=False`, optionally `nesterov`). Use as `Learner(..., opt_func=sgd_momentum(0.9))`.
    `fused=False` steps with `torch._foreach_*` kernels only (the same update, more passes over memory)."""
    _check_hypers(mom=mom, wd=wd)
    _check_sgd_flags(dampening, debias, nesterov)
    return partial(ForeachSGD, mom=mom, wd=wd, dampening=dampening, debias=debias, nesterov=nesterov,
                   decouple_wd=decouple_wd, fused=fused)


def rmsprop(sqr_mom=0.99, mom=0., eps=1e-8, centered=False, wd=0., decouple_wd=True, fused=True):
    "opt_func for `ForeachRMSProp`, equal to `torch.optim.RMSprop(alpha=sqr_mom, momentum=mom, ...)`."
    _check_hypers(sqr_mom=sqr_mom, mom=mom, eps=eps, wd=wd)
    return partial(ForeachRMSProp, sqr_mom=sqr_mom, mom=mom, eps=eps, wd=wd, centered=centered,
                   decouple_wd=decouple_wd, fused=fused)


def adam(mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01, decouple_wd=True, fused=True):
    "opt_func for `ForeachAdam`: AdamW (`decouple_wd=True`, fastai's default) or Adam with L2."
    _check_hypers(mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd)
    return partial(ForeachAdam, mom=mom, sqr_mom=sqr_mom, eps=eps, wd=wd, decouple_wd=decouple_wd, fused=fused)


# ---------------------------------------------------------------------------------------------------
# Reading optimizer state

# the state names of the first moment, the second moment and the centering mean (centered RMSprop), most specific
# first: fastai's and this package's optimizers, and torch's (SGD and RMSprop `momentum_buffer`, Adam `exp_avg`; torch's
# centered RMSprop keeps its centering mean as `grad_avg`, which in fastai's names is the first moment)
_FASTAI_MOMENTS = (('grad_avg',), ('sqr_avg',), ('grad_mean',))
_TORCH_MOMENTS = (('exp_avg', 'momentum_buffer'), ('exp_avg_sq', 'square_avg'), ('grad_avg',))
_OPT_STATE_COLS = ['layer', 'param', 'numel', 'step', 'mom', 'grad_avg_norm', 'sqr_avg_rms', 'grad_mean_norm']


def _groups_and_state(opt):
    "`(param_lists, mom per group, state lookup, state names)` for a fastai `Optimizer`, an `OptimWrapper` or a torch optimizer."
    if isinstance(opt, OptimWrapper): opt = opt.opt
    if isinstance(opt, torch.optim.Optimizer):
        moms = [g.get('momentum', g.get('betas', (math.nan,))[0]) for g in opt.param_groups]
        return [g['params'] for g in opt.param_groups], moms, opt.state, _TORCH_MOMENTS
    if isinstance(opt, Optimizer):
        return list(opt.param_lists), [h.get('mom', math.nan) for h in opt.hypers], opt.state, _FASTAI_MOMENTS
    raise TypeError(f"opt_state reads a Learner, a fastai Optimizer, an OptimWrapper or a torch optimizer, not {type(opt).__name__}")


def _first(st, keys):
    return next((st[k] for k in keys if isinstance(st.get(k), torch.Tensor)), None)


def param_moments(opt, ps, centering=False):
    """The moments `opt` keeps for each parameter of `ps`, read from its own state: `(states, firsts, seconds)`,
    lists with None where it keeps none (and the centering means as a fourth list with `centering`). The first
    moment is fastai's `grad_avg` (this package's too), torch's `momentum_buffer` or `exp_avg`; the second `sqr_avg`,
    `exp_avg_sq` or `square_avg`; the centering mean of a centered RMSprop is `grad_mean` here, `grad_avg` in
    torch. Works for fastai `Optimizer`s, `OptimWrapper(torch.optim...)` and torch optimizers."""
    _, _, state, names = _groups_and_state(opt)
    states = [state.get(p) or {} for p in ps]
    return (states, *([_first(st, keys) for st in states] for keys in names[:3 if centering else 2]))


def _norms(tensors, ord=2):
    "Float `ord`-norms of `tensors` (None gives NaN), computed with one multi-tensor kernel and one host copy."
    idx = [i for i, t in enumerate(tensors) if t is not None]
    out = np.full(len(tensors), np.nan)
    if idx: out[idx] = torch.stack(torch._foreach_norm([tensors[i].float() for i in idx], ord)).cpu().numpy()
    return out


def opt_state(learn_or_opt):
    """One row per parameter tensor with optimizer state: `layer`, `param` (named from the model when a
    `Learner` is given, else `group{i}` and `group{i}.{j}`), `numel`, `step`, the group's `mom`,
    ‖first moment‖₂ (`grad_avg`, torch's `momentum_buffer` or `exp_avg`), √mean of the second moment
    (`sqr_avg`, `exp_avg_sq` or `square_avg`) and ‖centering mean‖₂ of a centered RMSprop (`grad_mean_norm`), each
    NaN where the state holds none (`param_moments` reads them)."""
    if isinstance(learn_or_opt, Learner):
        if learn_or_opt.opt is None: raise ValueError("the Learner has no optimizer yet: call `learn.create_opt()` or fit first")
        opt, names = learn_or_opt.opt, param_layer_names(learn_or_opt.model)
    else: opt, names = learn_or_opt, {}
    param_lists, moms, _, _ = _groups_and_state(opt)
    rows, firsts, seconds, centers = [], [], [], []
    for gi, (pg, mom) in enumerate(zip(param_lists, moms)):
        for j, (p, st, first, second, center) in enumerate(zip(pg, *param_moments(opt, pg, centering=True))):
            if first is None and second is None and 'step' not in st: continue
            layer, name = names.get(id(p), (f'group{gi}', f'group{gi}.{j}'))
            step = st.get('step', math.nan)
            rows.append((layer, name, p.numel(), float(step) if not isinstance(step, torch.Tensor) else step.item(), mom))
            firsts.append(first); seconds.append(second); centers.append(center)
    df = pd.DataFrame(rows, columns=_OPT_STATE_COLS[:5])
    df['mom'] = df['mom'].astype(float)
    df['grad_avg_norm'] = _norms(firsts)
    numel = df['numel'].to_numpy(dtype=float)
    df['sqr_avg_rms'] = np.sqrt(_norms(seconds, 1) / np.maximum(numel, 1))  # v ≥ 0, so ‖v‖₁ = Σv
    df['grad_mean_norm'] = _norms(centers)
    if len(df) and df['step'].notna().all(): df['step'] = df['step'].astype('int64')
    return df
