"""Dropout as a schedule: set every dropout module's p each training batch from the fraction of
training done, log what was applied, and give the model its own p back when the fit ends.

Importing this module wraps `Learner.fit` once (the only side effect; see the end of the file): a fit that
raises runs no callback event, so the wrapper gives the modules their own p back on the way out."""
from __future__ import annotations

import functools
import math
import numbers
import weakref

import numpy as np
from fastai.learner import Learner
from fastcore.foundation import L
from torch.nn.modules.dropout import _DropoutNd

from .core import Log, StepCallback, check_arg, check_count, check_in_range, plot_per_layer, unwrap_model
from . import loggers  # noqa: F401  (registers the TensorBoard/W&B sinks: core.LOGGER_HOOKS)

__all__ = ['DropoutSchedule', 'early_dropout', 'late_dropout', 'curriculum_dropout', 'fastai_ps',
           'DROPOUT_TYPES', 'dropout_layers']

_HOW_TO_ADD = ("a tabular model gets hidden dropout modules from `tabular_learner(dls, config="
               "tabular_config(ps=0.1))` (one per hidden layer whose p is not 0); any other model needs "
               "`nn.Dropout` modules of its own")


DROPOUT_TYPES = (_DropoutNd,)  # what a dropout module is: nn.Dropout, Dropout1d/2d/3d, AlphaDropout, ...


def dropout_layers(model):
    """`{name: module}` for every dropout module of `model` (`DROPOUT_TYPES`), in `model.named_modules()` order;
    a `DistributedDataParallel` wrapper is looked through so names read as in the bare model (`emb_drop`,
    `layers.0.3`)."""
    return {name: m for name, m in unwrap_model(model).named_modules() if isinstance(m, DROPOUT_TYPES)}


# ---------------------------------------------------------------------------------------------- presets
# Module-level functions bound with `functools.partial`: readable reprs, and `learn.export()` pickles them.

def _early(pct, p, until, linear):
    if pct >= until: return 0.
    return p * (1 - pct / until) if linear else p


def _late(pct, p, start): return p if pct >= start else 0.


def _curriculum(pct, p, gamma): return p * (1 - math.exp(-gamma * pct))


def _scaled(pct, f, k): return k * float(f(pct))


def _check_p(p, name='p'):
    if callable(p): return p
    if not isinstance(p, numbers.Real): raise TypeError(f"Invalid {name}: {p!r} (must be a number in [0, 1) or a callable of pct)")
    return check_in_range(name, p)


def early_dropout(p, until=0.2, linear=False):
    """Early dropout (Liu et al., 2023): p(pct) = p for pct < `until` (with `linear`: p·(1 − pct/until), a
    straight fall to 0), then 0."""
    _check_p(p); check_in_range('until', until, hi_open=False)
    return functools.partial(_early, p=float(p), until=float(until), linear=bool(linear))


def late_dropout(p, start=0.5):
    "Late dropout (Liu et al., 2023): p(pct) = 0 for pct < `start`, then p."
    _check_p(p); check_in_range('start', start, hi_open=False)
    return functools.partial(_late, p=float(p), start=float(start))


def curriculum_dropout(p, gamma=10.):
    """Curriculum dropout (Morerio et al., 2017): p(pct) = p·(1 − e^(−γ·pct)). Their retain probability
    θ(t) = (1−θ̄)·e^(−γt) + θ̄ is 1 − p(t) with θ̄ = 1 − p; here time t is pct, the fraction of the fit done, so
    γ = 10 reaches 1 − e^(−10) ≈ 99.995% of p by the end, whatever the number of batches."""
    _check_p(p)
    check_arg('gamma', gamma, isinstance(gamma, numbers.Real) and gamma > 0, 'a number > 0')
    return functools.partial(_curriculum, p=float(p), gamma=float(gamma))


def fastai_ps(p, n):
    """fastai's rule for a head of `n` dropout layers: `[p/2]*(n-1) + [p]`, p on the last layer and half of it
    before. `p` may also be a schedule (a callable of pct): the earlier layers then follow half of it."""
    check_count('n', n)
    half = functools.partial(_scaled, f=p, k=.5) if callable(_check_p(p)) else p / 2
    return [half] * (n - 1) + [p]


# ---------------------------------------------------------------------------------------------- callback
_set_attr = object.__setattr__
DROPOUT_LOG = Log('dropout', 'step', ('epoch', 'pct', 'layer'),
                  {'p': 'the dropout probability applied to the layer in that training batch'}, doc='03_dropout')


def _grid(n_batches=None, fine=1001, most=100_000):
    "The pcts a schedule is checked at: a fine grid of [0, 1], plus every pct this fit's batches will see."
    pcts = np.linspace(0., 1., fine)
    if n_batches: pcts = np.union1d(pcts, np.arange(min(n_batches, most)) / min(n_batches, most))
    return pcts.tolist()


def _check_sched(name, sched, pcts):
    "Raise unless `sched` (a number or a callable of pct) gives a p in [0, 1) at every pct of `pcts`."
    if not callable(sched):
        if isinstance(sched, bool) or not isinstance(sched, numbers.Real):
            raise TypeError(f"DropoutSchedule: the schedule for {name} is {sched!r}; give a number in [0, 1) "
                            "or a callable pct -> p (SchedLin, SchedCos, combine_scheds, early_dropout, ...)")
        pcts = [0.]
    for pct in pcts:
        p = sched(pct) if callable(sched) else sched
        try: p = float(p)
        except (TypeError, ValueError):
            raise TypeError(f"DropoutSchedule: the schedule for {name} returned {p!r} at pct={pct:g}, not a number") from None
        if not 0. <= p < 1.:
            where = f" at pct={pct:g}" if callable(sched) else ""
            raise ValueError(f"DropoutSchedule: the schedule for {name} gives p={p!r}{where}, outside [0, 1); "
                             "a dropout probability must lie in [0, 1)")


def _check_shape(scheds):
    "Type-check `scheds` and every entry's range before any model is seen."
    if callable(scheds) or isinstance(scheds, numbers.Real): _check_sched('every dropout layer', scheds, _grid())
    elif isinstance(scheds, dict):
        for k, v in scheds.items(): _check_sched(f'layer {k!r}', v, _grid())
    elif isinstance(scheds, (list, tuple, L)):
        for i, v in enumerate(scheds): _check_sched(f'entry {i} of the list', v, _grid())
    else:
        raise TypeError(f"DropoutSchedule: scheds={scheds!r} must be a number, a callable pct -> p, a list with one "
                        "entry per dropout layer, or a dict {layer name: number or callable}")


class DropoutSchedule(StepCallback):
    """Set `p` of the model's dropout modules before every training batch to `sched(pct)`, pct being the
    fraction of this fit done (`learn.pct_train`, as fastai's `ParamScheduler` sees it). `scheds` is a number, a
    callable pct -> p, a list with one entry per dropout module (in `model.named_modules()` order), or a dict
    `{layer name: number or callable}` (layers not named keep their p). Every module's own p comes back after
    each training phase (so validation sees it) and when the fit ends, even one that raised or was cancelled.

    `.df`: one row per (training batch, dropout layer): `step` (the optimizer step the batch feeds, counted as
    `StepCallback` counts), `epoch`, `pct`, `layer`, `p`; under distributed training every process sets p and
    rank 0 alone keeps the log (and so the progress table's column). The progress table gets `dropout_p`, the mean
    p applied over the epoch's training batches and the dropout layers. With `path`, the log is also written to
    that CSV file as training goes (see `StepCallback` for when), and with `keep=False` too it is held there only
    (see `LogTable`)."""
    run_valid, epoch_columns, logs = False, {'dropout_p': 'epoch_mean_p'}, (DROPOUT_LOG,)
    _stateattrs = StepCallback._stateattrs + ('_applied', '_owner', '_checked')

    def __init__(self, scheds, path=None, keep=True):
        super().__init__()
        _check_shape(scheds)
        self.scheds = scheds
        self.open_log(path, keep)

    def _init_state(self):
        super()._init_state()
        self._applied, self._owner, self._checked = None, None, None

    # -- resolving and checking, all before the first batch
    def _resolve(self):
        "`(names, modules, per-module schedule or None)` for every dropout layer of the model."
        layers = dropout_layers(self.learn.model)
        names, mods = list(layers), list(layers.values())
        if not names: raise ValueError(f"DropoutSchedule: the model has no dropout module to schedule; {_HOW_TO_ADD}")
        s = self.scheds
        if isinstance(s, dict):
            unknown = [k for k in s if k not in layers]
            if unknown: raise KeyError(f"DropoutSchedule: no dropout layer named {unknown}; the model's dropout "
                                       f"layers are {names} ({_HOW_TO_ADD})")
            per_layer = [s.get(n) for n in names]
        elif isinstance(s, (list, tuple, L)):
            if len(s) != len(names):
                raise ValueError(f"DropoutSchedule: {len(s)} schedules for {len(names)} dropout layers; give one "
                                 f"per layer, in this order: {names}")
            per_layer = list(s)
        else: per_layer = [s] * len(names)
        return names, mods, [s if s is None or callable(s) else float(s) for s in per_layer]

    def before_fit(self):
        names, mods, per_layer = self._resolve()
        try: n_batches = getattr(self.learn, 'n_epoch', 1) * len(self.learn.dls.train)
        except Exception: n_batches = None
        key = (tuple(names), n_batches)
        if self._checked != key:
            pcts = _grid(n_batches)
            for name, sched in zip(names, per_layer):
                if sched is not None: _check_sched(f'layer {name!r}', sched, pcts)
            self._checked = key
        self._names, self._mods = names, mods
        self._scheduled = [(m, s) for m, s in zip(mods, per_layer) if s is not None]
        super().before_fit()  # every process sets p; only rank 0 keeps the log

    # -- the hot path: one attribute write per scheduled layer and one tuple staged per batch
    def before_batch(self):
        if self._applied is None: self._remember()
        pct = float(self.learn.pct_train)
        # a plain float attribute: skip `nn.Module.__setattr__`'s parameter/buffer/module checks
        for m, s in self._scheduled: _set_attr(m, 'p', float(s(pct)) if callable(s) else s)
        if self.logs_here: self.stage((self.n_step + 1, self.learn.epoch, pct, [m.p for m in self._mods]))

    def after_step(self): self.count_step()

    def rows(self, entries):
        n = len(self._names)
        steps, epochs, pcts, ps = zip(*entries)
        return dict(step=np.repeat(steps, n), epoch=np.repeat(epochs, n), pct=np.repeat(pcts, n),
                    layer=np.array(self._names * len(entries), dtype=object), p=np.asarray(ps, dtype=float).reshape(-1))

    def epoch_mean_p(self):
        "Mean p applied over this epoch's training batches and dropout layers."
        return self.epoch_mean('p')

    # -- giving p back
    def _remember(self):
        self._applied, self._owner = [(m, m.p) for m, _ in self._scheduled], self.learn
        _UNRESTORED.add(self)

    def restore(self):
        "Give every module this callback changed its original p back (done for you after every fit)."
        for m, p in self._applied or []: _set_attr(m, 'p', p)
        self._applied, self._owner = None, None
        _UNRESTORED.discard(self)

    def after_train(self):
        self.restore()  # validation, even inside a fit, sees the model's own p
        super().after_train()

    def after_fit(self):
        self.restore()
        super().after_fit()

    # -- results (`.df`: one row per (training batch, dropout layer): `step`, `epoch`, `pct`, `layer`, `p`)

    def plot(self, layers=None, x='step', ax=None):
        "The p applied to each dropout layer against `x` (`step` or `pct`): a `matplotlib.figure.Figure`."
        return plot_per_layer(self.df, 'p', layers=layers, x=x, title='dropout p applied in training', ncols=1, ax=ax)


# A fit that raises skips `after_fit`: fastai's `Learner._with_events` catches only its own Cancel exception
# (`try: before; f() except ex: after_cancel` then `after; final`), and `Learner.added_cbs` detaches the callbacks
# passed to `fit(cbs=...)` in a `finally` that fires no event. So no callback event, and no scoped hook of fastai,
# runs on the way out of a raising fit (checked against fastai 2.8.12); a callback attached to the Learner is not
# even detached. `Learner.fit` (which `fit_one_cycle`, `fine_tune` and `lr_find` call) therefore gets a wrapper that
# gives p back on the way out and re-raises; it calls fastai's `fit` unchanged.
_UNRESTORED = weakref.WeakSet()
_fastai_fit = getattr(Learner.fit, '__wrapped__', Learner.fit)


@functools.wraps(_fastai_fit)
def _fit_restoring_dropout(self, *args, **kwargs):
    try: return _fastai_fit(self, *args, **kwargs)
    except BaseException:
        for sched in list(_UNRESTORED):
            if sched._owner is self: sched.restore(); sched.flush_log()
        raise


Learner.fit = _fit_restoring_dropout
