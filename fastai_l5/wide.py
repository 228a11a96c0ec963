"""A linear skip for fastai's tabular model ("wide & deep", Cheng et al. 2016), started at the ridge solution.

`WideTabularModel` is fastai's `TabularModel` (same arguments, same `embeds`, `bn_cont`, `layers`, dropout and
batch-norm modules) whose output has a linear part added:

    out(x) = b + Σ_i W_i[x_cat_i] + x_cont · V  +  mlp(x)

one scalar weight per level of each categorical column and class of the target (`lin_embeds[i]`, an
`nn.Embedding(n_levels, n_out)`: a linear model on the one-hot columns), a weight per processed continuous column
(`lin_cont`, on the values fastai's `Normalize` gives, not on `bn_cont`'s output) and a bias `lin_bias`; `mlp` is the
`TabularModel`, with no `SigmoidRange` (a `y_range` would squeeze the linear part too).

`init_from_linear(model, dls)` fits the linear part in closed form on the processed training inputs and zeroes the
MLP's final `Linear`, so the model starts exactly at the linear fit and the MLP can only learn the residual:

- regression: ridge regression of the training-scale target on the one-hot categoricals and the continuous
  columns (`audit._ridge_path`: penalty alpha·n·‖w‖², intercept free), alpha from `SKIP_ALPHAS` by the rmse on an
  inner 80/20 split of the training rows (`audit._ridge_held_out`, as `linear_baseline` chooses its own), then
  refitted on all training rows;
- classification: L2 logistic regression (`audit._fit_logistic`, per-class weights if the loss has them), alpha
  from `LOGISTIC_ALPHAS` by the held-out cross-entropy of the same inner split (`audit._logistic_held_out`); its
  logits start the output.

No validation row is read. Both parts are then trained together (a frozen linear part measured no better: see
`report.SKIP_MAX_ROWS`). `ridge_log_or_not` tells whether ridge on the same inputs predicts a positive target better
fitted on log(y) or on y (`report.skip_target_scale` uses it to choose the training scale)."""
from __future__ import annotations

import numpy as np
import torch
from fastai.tabular.model import TabularModel
from torch import nn

from .audit import LOG, LOGISTIC_ALPHAS, ORIGINAL, _best, _fit_logistic, _logistic_held_out, _ridge_held_out, _ridge_path

__all__ = ['WideTabularModel', 'Bias', 'SKIP_ALPHAS', 'processed_design', 'train_design', 'init_from_linear',
           'ridge_log_or_not']

SKIP_ALPHAS = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1., 3.)  # the ridge penalties tried (alpha·n·‖w‖²)


class Bias(nn.Module):
    "A learned bias of `n` outputs (its own module, so that per-layer logs name it `lin_bias`)."
    def __init__(self, n): super().__init__(); self.bias = nn.Parameter(torch.zeros(n))
    def forward(self, n_rows): return self.bias.expand(n_rows, -1)


class WideTabularModel(TabularModel):
    """fastai's `TabularModel` plus a linear skip (see the module docstring): the same arguments, except that
    `y_range` is not taken (no final sigmoid). `lin_embeds`, `lin_cont` and `lin_bias` hold the linear part."""
    def __init__(self, emb_szs, n_cont, out_sz, layers, **kwargs):
        if kwargs.pop('y_range', None) is not None: raise ValueError("WideTabularModel takes no y_range")
        super().__init__(emb_szs, n_cont, out_sz, layers, **kwargs)
        self.lin_embeds = nn.ModuleList([nn.Embedding(ni, out_sz) for ni, _ in emb_szs])
        self.lin_cont = nn.Linear(n_cont, out_sz, bias=False) if n_cont else None
        self.lin_bias = Bias(out_sz)
        for e in self.lin_embeds: nn.init.zeros_(e.weight)
        if self.lin_cont is not None: nn.init.zeros_(self.lin_cont.weight)
        # the MLP's layers registered last, so `parameters()` ends with the MLP's output layer (audit.fit_key reads it)
        self._modules['layers'] = self._modules.pop('layers')

    def linear(self, x_cat, x_cont=None):
        "The linear part alone: `lin_bias` + the per-level weights + `lin_cont` on the continuous inputs."
        out = self.lin_bias(len(x_cat if x_cat is not None else x_cont))
        for i, e in enumerate(self.lin_embeds): out = out + e(x_cat[:, i])
        if self.lin_cont is not None: out = out + self.lin_cont(x_cont)
        return out

    def forward(self, x_cat, x_cont=None): return self.linear(x_cat, x_cont) + super().forward(x_cat, x_cont)


def processed_design(cats, conts, n_levels):
    """The linear model's inputs from fastai's processed columns: each categorical code (0 to `n_levels[i] - 1`)
    one-hot, then the continuous columns as they are (already through fastai's `Normalize`). float64 array."""
    cats, conts = np.asarray(cats, dtype=np.int64), np.asarray(conts, dtype=np.float64)
    blocks = []
    for i, n in enumerate(n_levels):
        onehot = np.zeros((len(cats), n)); onehot[np.arange(len(cats)), cats[:, i]] = 1; blocks.append(onehot)
    blocks.append(conts.reshape(len(cats), -1))
    return np.hstack(blocks)


def train_design(dls):
    "`processed_design` of `dls`'s training rows, the number of levels of each categorical taken from its vocab."
    ds = dls.train_ds
    n_levels = [len(ds.classes[c]) for c in dls.cat_names]
    cats = ds.xs[list(dls.cat_names)].to_numpy() if len(dls.cat_names) else np.zeros((len(ds.xs), 0), np.int64)
    return processed_design(cats, ds.xs[list(dls.cont_names)].to_numpy(), n_levels)


def ridge_log_or_not(X, y, seed=0):
    """Whether ridge regression predicts positive targets `y` (original scale) better fitted on log(y) than on y:
    the best rmse over `SKIP_ALPHAS` on the inner split's held-out rows, on the original scale, for each.
    Returns `(use_log, {'log': rmse, 'original': rmse})`."""
    scored = _ridge_held_out(X, np.asarray(y, dtype=np.float64), SKIP_ALPHAS, (LOG, ORIGINAL), seed)
    errs = {name: float(np.nanmin([e for e, scale, _ in scored if scale[0] == name])) for name in ('log', 'original')}
    return errs['log'] <= errs['original'], errs


def init_from_linear(model, dls, weight=None, seed=0):
    """Fit `model`'s (a `WideTabularModel`) linear part on `dls`'s processed training rows (ridge or logistic
    regression, the penalty chosen on an inner split of those rows: see the module docstring) and zero the MLP's
    output layer, so that `model` predicts what the linear fit predicts. `weight`: per-class loss weights of a
    classification. Returns a dict: `kind` ('ridge' or 'logistic'), `alpha`, `n_features`, `inner` (the held-out
    score of the chosen alpha: rmse on the training scale, or cross-entropy)."""
    n_levels = [e.num_embeddings for e in model.lin_embeds]
    X = train_design(dls)
    y = dls.train_ds.ys.iloc[:, 0].to_numpy()
    if dls.c == 1 or not hasattr(dls, 'vocab'):
        y = y.astype(np.float64)
        inner, _, alpha = _best(_ridge_held_out(X, y, SKIP_ALPHAS, seed=seed))
        (b0, w), = _ridge_path(X, y, [alpha])
        W, b, out = w[:, None], np.array([b0]), dict(kind='ridge', alpha=alpha, inner=inner)
    else:
        y, k = y.astype(np.int64), model.lin_bias.bias.numel()
        inner, alpha = _best(_logistic_held_out(X, y, k, LOGISTIC_ALPHAS, weight, seed))
        W, b = _fit_logistic(X, y, k, alpha, weight=weight)
        out = dict(kind='logistic', alpha=alpha, inner=inner)
    with torch.no_grad():
        start = 0
        for e, n in zip(model.lin_embeds, n_levels):
            e.weight.copy_(torch.as_tensor(W[start:start + n])); start += n
        if model.lin_cont is not None: model.lin_cont.weight.copy_(torch.as_tensor(W[start:].T))
        model.lin_bias.bias.copy_(torch.as_tensor(b))
        last = [m for m in model.layers.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.zero_()
        if last.bias is not None: last.bias.zero_()
    out['n_features'] = X.shape[1]
    return out
