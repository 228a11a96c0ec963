"""Counterfactuals for `diagnose`: apply a finding's advice to a *copy* of the learner (model and optimizer deep-copied
together, so the copy's optimizer state points at the copy's parameters) and measure the validation loss it gives.
The user's model, optimizer state, callbacks, Recorder, dropout p's and random states are left exactly as they were:
the copy is trained by a plain loop (no fastai event runs), on batches drawn once under `preserved_rng`."""
from __future__ import annotations

from copy import deepcopy
from itertools import cycle, islice

import numpy as np
import torch
from fastai.callback.schedule import combined_cos

from .core import unwrap_model
from .dropout import dropout_layers
from .precise import split_batch, batch_to_device, model_device, bn_layers, module_modes, preserved_rng, pooled_stats, set_flat_stats

__all__ = []


def _batches(learn, dl, n_batches=None, max_rows=None, shuffle=False):
    """The first batches of `dl` as `(xb, yb)` on the model's device: `n_batches` of them (of the loader's batch
    size), or up to `max_rows` rows. A fastai tabular loader is read in one piece (one pandas lookup, not one per
    batch): the rows of a fixed permutation (seed 0, its own generator) when `shuffle`, else the first rows."""
    from fastai.tabular.core import TabDataLoader
    device, bs = model_device(learn), int(dl.bs)
    if isinstance(dl, TabDataLoader) and len(dl.dataset):
        n = len(dl.dataset)
        want = min(n, n_batches * bs if n_batches is not None else max_rows)
        idx = np.random.default_rng(0).permutation(n)[:want] if shuffle else np.arange(want)
        b = batch_to_device(tuple(dl.after_batch(dl.create_batch(idx))), device)
        xb, yb = split_batch(learn, b)
        size = bs if n_batches is not None else max(bs, 256)
        return [(tuple(x[i:i + size] for x in xb), tuple(y[i:i + size] for y in yb)) for i in range(0, want, size)
                if n_batches is None or i + size <= want or i == 0]
    out, rows = [], 0
    for b in dl:
        xb, yb = split_batch(learn, batch_to_device(b, device))
        out.append((xb, yb)); rows += len(yb[0])
        if (n_batches is not None and len(out) >= n_batches) or (max_rows is not None and rows >= max_rows): break
    return out


class Sandbox:
    """What the counterfactuals of one `diagnose` call share: `k` training batches to continue on and up to `rows`
    validation rows to score with, drawn once with every random state put back, and `copy()`, a fresh deep copy of
    the model and optimizer for each arm. `score(model)` is the mean validation loss over those rows (eval mode,
    weighted by batch size, as fastai's Recorder), `baseline` the user's model's own score on them."""
    def __init__(self, learn, k=8, rows=2048):
        self.learn = learn
        with preserved_rng(learn.dls.train, learn.dls.valid), module_modes(learn.model):
            self.train = _batches(learn, learn.dls.train, n_batches=k, shuffle=True)
            self.valid = _batches(learn, learn.dls.valid, max_rows=rows)
        self._baseline = None

    @property
    def baseline(self):
        if self._baseline is None: self._baseline = self.score(self.learn.model)
        return self._baseline

    def copy(self):
        "A deep copy `(model, opt)` of the learner's; `opt` is None when the learner has none yet."
        return deepcopy((self.learn.model, getattr(self.learn, 'opt', None)))

    @torch.no_grad()
    def score(self, model):
        if not self.valid: return float('nan')
        with module_modes(model):
            model.eval()
            tot = sum(float(self.learn.loss_func(model(*x), *y)) * len(y[0]) for x, y in self.valid)
        return tot / sum(len(y[0]) for _, y in self.valid)

    def trained(self, lr=None, ps=None, steps=None, loss_func=None, one_cycle=False):
        """A copy trained `steps` (default all the sandbox's; more go round its batches again) steps at `lr` (default
        the optimizer's last) on `loss_func` (default the learner's), with every dropout module's p set to `ps` (a
        float, a dict name -> p, or None: as it is); None when the learner has no optimizer, or the loss stopped
        being finite. `one_cycle`: the lr follows fastai's one-cycle shape over the steps (cosine from lr/25 up to
        lr in the first quarter, then down to lr/1e5), so each arm ends annealed and is compared where it settles,
        not at the peak's noise. The copy's optimizer carries on from the user's state (moments, step counts); BN
        updates its running statistics as in training. Runs with the random states put back afterwards."""
        model, opt = self.copy()
        if opt is None: return None
        if ps is not None:
            for name, m in dropout_layers(model).items():
                p = ps.get(name) if isinstance(ps, dict) else ps
                if p is not None: m.p = float(p)
        if lr is not None: opt.set_hyper('lr', lr)
        loss_func = loss_func or self.learn.loss_func
        steps = len(self.train) if steps is None else steps
        lr = float(opt.hypers[-1]['lr']) if lr is None else lr
        sched = combined_cos(0.25, lr / 25, lr, lr / 1e5) if one_cycle else None
        with preserved_rng(self.learn.dls.train), torch.enable_grad():
            model.train()
            for i, (x, y) in enumerate(islice(cycle(self.train), steps)):
                if sched is not None: opt.set_hyper('lr', float(sched(i / steps)))
                loss = loss_func(model(*x), *y)
                if not torch.isfinite(loss): return None
                loss.backward(); opt.step(); opt.zero_grad()
        return model

    def continued(self, lr=None, ps=None, steps=None, one_cycle=False):
        "The score of `trained(lr, ps, steps, one_cycle=one_cycle)`: NaN without an optimizer, inf when the loss stopped being finite."
        if getattr(self.learn, 'opt', None) is None or not self.train: return float('nan')
        model = self.trained(lr, ps, steps, one_cycle=one_cycle)
        return float('inf') if model is None else self.score(model)

    @torch.no_grad()
    def outputs(self, model):
        "`(outputs, targets)` of `model` (eval mode) on the sandbox's validation rows, as float tensors and a flat one."
        with module_modes(model):
            model.eval()
            out = torch.cat([model(*x).float() for x, _ in self.valid])
        return out, torch.cat([y[0].reshape(-1) for _, y in self.valid])

    def classes(self, model):
        "`(predicted, true)` class indices of the sandbox's validation rows under `model` (eval mode), as numpy arrays."
        out, targ = self.outputs(model)
        return out.argmax(-1).view(-1).cpu().numpy(), targ.cpu().numpy()

    def population(self, n_batches=16):
        """The score of a copy whose BN running statistics are replaced by the population statistics over the
        sandbox's first `n_batches` training batches (`precise_bn`'s pass, dropout on); NaN without BN layers."""
        model, _ = self.copy()
        bns = bn_layers(model)
        if not len(bns): return float('nan')
        mods = list(bns.itemgot(1))
        with preserved_rng(self.learn.dls.train):
            mean_p, var_p = pooled_stats(unwrap_model(model), mods, [x for x, _ in self.train[:n_batches]])
        with torch.no_grad(): set_flat_stats(mods, mean_p, var_p)
        return self.score(model)


def peak_lr(learn):
    "The highest lr of the last fit's schedule (fastai's Recorder), else the optimizer's lr."
    lrs = [float(v) for v in learn.recorder.lrs]
    return max(lrs) if lrs else float(learn.opt.hypers[-1]['lr'])


def effect_text(before, after, what='valid loss'):
    "'valid loss 4.65 -> 2.90 (-38%)', or '' when either side is not a finite number."
    if not (np.isfinite(before) and np.isfinite(after)) or before == 0: return ''
    return f"{what} {before:.3g} -> {after:.3g} ({100 * (after / before - 1):+.0f}%)"
