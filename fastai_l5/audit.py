"""The audit a practitioner asks for before signing a tabular model: is the target leaked by its inputs, does a
straight line do as well, are all the classes found, and how much do the validation rows say.

- `target_leak` (on the training rows, before any fit): a column, or a few numeric columns together, that
  reproduce the target almost exactly on held-out rows. Least squares on the best ≤ `leak_cols` numeric columns
  (chosen greedily by held-out R²) with held-out R² ≥ `leak_r2`, for the target or, when it is positive, its log;
  counts that are parts of the target (0 ≤ x ≤ y on every row, see `part_r2`); a categorical column whose level
  means (regression) or majority classes (classification) score R² ≥ `leak_r2` / accuracy ≥ `leak_acc` on
  held-out rows; with two classes, a numeric column whose held-out ROC AUC is ≥ `leak_auc`. An ordinary strong
  predictor is far from these: on 17 clean data sets (tests/test_audit.py, 150+ columns) none is flagged.
- `linear_baseline`: ridge regression (classification: L2 logistic regression) on the same inputs and split —
  continuous columns standardized with the training median filled in (and a missing indicator), categorical
  columns one-hot on their `max_levels` most frequent training levels — with the penalty chosen on an inner 80/20
  split of the training rows. The regression is fitted on the original scale and, for a log-trained target, on
  log(y) as well; the inner split picks the better one. Scored in the report's metric on the validation rows.
- `classification_scores`: accuracy, balanced accuracy (mean per-class recall), per-class precision and recall, the
  confusion matrix, and ROC AUC with two classes.
- `value_ci`: a 95% percentile bootstrap interval of the validation metric (resampling validation rows).
- `audit_findings(learn)`: the findings `target_leak`, `worse_than_linear`, `class_imbalance`, `small_validation`
  from the data the learner holds; `diagnose` appends them. Every threshold is in `AUDIT_THRESHOLDS`."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.progress import ProgressCallback  # noqa: F401  (patches `Learner.no_bar`)
from fastai.losses import CrossEntropyLossFlat

from .counterfactual import Sandbox, peak_lr

__all__ = ['AUDIT_THRESHOLDS', 'target_leak', 'design_matrix', 'linear_baseline', 'classification_scores', 'value_ci',
           'paired_diff_ci', 'balanced_class_weights', 'audit', 'audit_findings']

AUDIT_THRESHOLDS = dict(
    # target_leak: held-out R² of least squares on <= leak_cols numeric columns, or of a categorical's level means;
    # held-out accuracy of a categorical's level -> majority class map (on rows whose level was seen, which must be
    # >= leak_cover of them); held-out ROC AUC of one numeric column (two classes). Clean data sets peak far lower
    # (flights dep_delay -> arr_delay: R² 0.84; Default balance -> default: AUC 0.95; mpg cty -> hwy: R² 0.92).
    leak_r2=0.999, leak_acc=0.999, leak_auc=0.999, leak_cover=0.9, leak_cols=4, leak_rows=50_000,
    # target_leak, parts of the target: a numeric column with 0 <= x <= y on every training row (a count of a subset
    # of what the target counts: AER Fatalities' night-time, single-vehicle and per-age deaths within `fatal`), a
    # median share x/y >= part_share (same units, not a small measurement under a large one: diamonds' carat <=
    # price) and a straight line on it alone reaching held-out R² >= part_r2 (Fatalities: 0.95-0.98; the best single
    # column of the clean regression sets: 0.92).
    # Once one part clears part_r2, every bounded part with R² >= part_also is named with it (drop them together).
    part_r2=0.95, part_share=0.05, part_also=0.8,
    # worse_than_linear: the network's rmse > (1 + linear_tol) x the linear baseline's, or its accuracy below the
    # linear baseline's by more than linear_tol, is reported; it is a warning only when the loss is material: the
    # network's error (rmse², or 1 - accuracy) >= linear_cost x the linear model's (1.2x: the cost diagnose's targets
    # call material for a fault; rmse 1.095x) and the paired bootstrap interval (`level`) of the difference on the same
    # validation rows excludes 0; an info otherwise. Healthy fits of 1,800-2,400 rows (AER CPS1988, ISLR Wage,
    # tests/diagnose_suite.py) lose to ridge by up to 6% in rmse (1.12x in rmse²) on 4 of 12 seeds; the issue's
    # cases lose by 1.6x (flights) and 2x.
    linear_tol=0.02, linear_cost=1.2, level=0.95,
    # small_validation: fewer than min_valid validation rows, or a 95% interval wider than ci_rel x the value (rmse:
    # about ±25%) or than ci_abs (accuracy: 0.1 is ±5 points). Boston's 101 rows give rmse 3.34 in [2.58, 4.02]
    # (0.43 of it: not flagged); Hitters' 52, 294 in [210, 364] (0.52: flagged).
    min_valid=50, ci_rel=0.5, ci_abs=0.1,
    # class_imbalance, measured: a candidate when a class has recall below recall_low while the accuracy is at least
    # the majority class's; then imb_steps steps on a copy at the peak lr with the cross-entropy weighted by inverse
    # class frequency (the advice): a warning when that raises the balanced accuracy on the validation rows by >=
    # imb_gain, an info otherwise (the classes overlap too much for weights to find the missed class cheaply). ISLR
    # Default, 3.3% defaulters: +0.18 to +0.34 over 6 seeds; AER HMDA, 12% denials (AUC 0.78-0.86): +0.02 to +0.09.
    recall_low=0.5, imb_gain=0.12, imb_steps=32,
)


def _finding(kind, severity, where, evidence, advice, effect=''):
    return dict(kind=kind, severity=severity, where=where, evidence=evidence, advice=advice, effect=effect)


def _is_numeric(s): return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)


def _inner_split(n, seed=0, frac=0.25):
    "A seeded split of `n` rows into (fit, held-out) position arrays."
    perm = np.random.default_rng(seed).permutation(n)
    cut = max(1, int(round(n * frac)))
    return perm[cut:], perm[:cut]


def _r2(pred, y):
    ss = float(((y - y.mean()) ** 2).sum())
    return 1 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else float('nan')


def _lstsq_r2(X, y, fit, held):
    "Held-out R² of least squares (with an intercept) of `y` on the columns of `X`."
    A = np.c_[np.ones(len(X)), X]
    w = np.linalg.lstsq(A[fit], y[fit], rcond=None)[0]
    return _r2(A[held] @ w, y[held])


def rank_auc(score, positive):
    "ROC AUC of `score` for the boolean `positive` (the Mann-Whitney statistic, ties counted half)."
    pos, n_pos = np.asarray(positive, bool), int(np.sum(positive))
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0: return float('nan')
    ranks = pd.Series(np.asarray(score, float)).rank().to_numpy()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _filled(s, ref=None):
    "A numeric column with missing values set to the median of `ref` (default: itself)."
    x = pd.to_numeric(s, errors='coerce').astype(float)
    med = (pd.to_numeric(ref, errors='coerce') if ref is not None else x).median()
    return x.fillna(0. if not np.isfinite(med) else med).to_numpy()


def _leak_finding(cols, target, evidence, names):
    where = [names.get(c, c) for c in cols]
    drop = ' '.join(where)
    return _finding('target_leak', 'warn', ', '.join(where), evidence,
                    f"if {'these are' if len(where) > 1 else 'it is'} not known when the prediction is made, leave "
                    f"{'them' if len(where) > 1 else 'it'} out: `--drop {drop}` (Python: `drop={where!r}`); otherwise "
                    f"the model is only as good as {'they are' if len(where) > 1 else 'it is'}")


def _greedy_fit(X, y, fit, held, th):
    "Forward selection of <= `leak_cols` columns of `X` by held-out R² of least squares; stops at `leak_r2`."
    chosen, best = [], -np.inf
    while len(chosen) < th['leak_cols'] and best < th['leak_r2']:
        scores = {j: _lstsq_r2(X[:, chosen + [j]], y, fit, held) for j in range(X.shape[1]) if j not in chosen}
        if not scores: break
        j, r2 = max(scores.items(), key=lambda kv: kv[1])
        if r2 <= best + 1e-6: break
        chosen.append(j); best = r2
    return chosen, best


def target_leak(xs, y, cat_names=(), cont_names=(), task='regression', names=None, seed=0, thresholds=None):
    """Columns of `xs` (the training rows' inputs) that reproduce the target `y` almost exactly on held-out rows
    (see the module docstring for the tests and `AUDIT_THRESHOLDS` for the thresholds). `names` maps column names to
    the names the user knows them by. Returns a list of `target_leak` finding dicts (empty: no leak)."""
    th = {**AUDIT_THRESHOLDS, **(thresholds or {})}
    names = names or {}
    xs, y = xs.reset_index(drop=True), pd.Series(np.asarray(y)).reset_index(drop=True)
    keep = y.notna().to_numpy()
    xs, y = xs[keep].reset_index(drop=True), y[keep].reset_index(drop=True)
    if len(xs) > th['leak_rows']:
        pick = np.sort(np.random.default_rng(seed).choice(len(xs), th['leak_rows'], replace=False))
        xs, y = xs.iloc[pick].reset_index(drop=True), y.iloc[pick].reset_index(drop=True)
    if len(xs) < 8 or y.nunique() < 2: return []
    fit, held = _inner_split(len(xs), seed)
    conts = [c for c in cont_names if c in xs and _is_numeric(xs[c]) and xs[c].nunique() > 1]
    cats = [c for c in cat_names if c in xs]
    found = []
    if task == 'regression':
        yv = y.to_numpy(dtype=float)
        X = np.column_stack([_filled(xs[c], xs[c].iloc[fit]) for c in conts]) if conts else np.zeros((len(xs), 0))
        chosen, best = [], -np.inf
        # the target itself and, when positive, its log (a column holding log(y), as ISLR Wage's logwage does)
        for scale, yt in [('', yv)] + ([('log ', np.log(yv))] if (yv > 0).all() else []):
            chosen, best = _greedy_fit(X, yt, fit, held, th)
            if best >= th['leak_r2']: break
        if best >= th['leak_r2']:
            for j in list(chosen):  # name only the columns needed: drop any whose removal keeps the fit
                rest = [i for i in chosen if i != j]
                if rest and _lstsq_r2(X[:, rest], yt, fit, held) >= th['leak_r2']: chosen = rest
            r2 = _lstsq_r2(X[:, chosen], yt, fit, held)
            cols = [conts[j] for j in chosen]
            what = (f"least squares on {len(cols)} numeric columns" if len(cols) > 1 else "a straight line on one column")
            found.append(_leak_finding(cols, None, f"{what} reproduces the {scale}target on held-out training rows with "
                                       f"R² {r2:.5f} (≥ {th['leak_r2']}): the target can be computed from "
                                       f"{'them' if len(cols) > 1 else 'it'}.", names))
        parts = {}
        for j, c in enumerate(conts):
            x = pd.to_numeric(xs[c], errors='coerce').to_numpy(float)
            ok = np.isfinite(x)
            if ok.mean() < th['leak_cover'] or not ((x[ok] >= 0) & (x[ok] <= yv[ok])).all() or (yv[ok] <= 0).any(): continue
            share = float(np.median(x[ok] / yv[ok]))
            if share < th['part_share'] or (best >= th['leak_r2'] and c in [conts[i] for i in chosen]): continue
            parts[c] = (_lstsq_r2(X[:, [j]], yv, fit, held), share)
        if parts and max(r2 for r2, _ in parts.values()) >= th['part_r2']:
            # one part reproduces the target: name every bounded part that follows it closely (R² >= part_also)
            parts = {c: v for c, v in parts.items() if v[0] >= th['part_also']}
            found.append(_leak_finding(list(parts), None, "parts of the target: on every training row 0 ≤ x ≤ target, and "
                                       "a straight line on each alone reproduces it on held-out rows (" + '; '.join(
                                           f"{names.get(c, c)}: R² {r2:.3f}, median share {share:.2f}"
                                           for c, (r2, share) in parts.items()) + ").", names))
        for c in cats:
            level = xs[c].astype(str)
            means = pd.Series(yv[fit]).groupby(level.iloc[fit].to_numpy()).mean()
            pred = level.iloc[held].map(means)
            seen = pred.notna().to_numpy()
            if seen.mean() < th['leak_cover'] or seen.sum() < 4: continue
            r2 = _r2(pred.to_numpy()[seen], yv[held][seen])
            if r2 >= th['leak_r2']:
                found.append(_leak_finding([c], None, f"the mean target of each level of {names.get(c, c)} reproduces "
                                           f"the target on held-out training rows with R² {r2:.5f}.", names))
    else:
        yv = y.astype(str).to_numpy()
        for c in cats + [c for c in conts if xs[c].nunique() <= 20]:
            level = xs[c].astype(str)
            major = pd.Series(yv[fit]).groupby(level.iloc[fit].to_numpy()).agg(lambda s: s.mode().iloc[0])
            pred = level.iloc[held].map(major)
            seen = pred.notna().to_numpy()
            if seen.mean() < th['leak_cover'] or seen.sum() < 4: continue
            acc = float((pred.to_numpy()[seen] == yv[held][seen]).mean())
            if acc >= th['leak_acc']:
                found.append(_leak_finding([c], None, f"each level of {names.get(c, c)} maps to one class: on held-out "
                                           f"training rows it gives the class with accuracy {acc:.4f}.", names))
        classes = np.unique(yv)
        if len(classes) == 2:
            for c in conts:
                auc = rank_auc(_filled(xs[c], xs[c].iloc[fit])[held], yv[held] == classes[1])
                if math.isfinite(auc) and max(auc, 1 - auc) >= th['leak_auc']:
                    found.append(_leak_finding([c], None, f"{names.get(c, c)} alone separates the two classes on held-out "
                                               f"training rows with ROC AUC {max(auc, 1 - auc):.4f}.", names))
    return found


def design_matrix(train, others, cat_names=(), cont_names=(), max_levels=50):
    """Numeric inputs for a linear model: each continuous column with missing values set to its training median,
    standardized with the training mean and sd, plus a 0/1 missing indicator where the training rows miss any; each
    categorical column one-hot on its `max_levels` most frequent training levels (the others all zero). Returns
    `(X_train, [X for each frame in others], feature names)`, float32."""
    blocks, names = [[] for _ in range(1 + len(others))], []
    frames = [train, *others]
    for c in cont_names:
        ref = pd.to_numeric(train[c], errors='coerce').astype(float)
        med = ref.median(); med = 0. if not np.isfinite(med) else float(med)
        mu, sd = float(ref.fillna(med).mean()), float(ref.fillna(med).std() or 1.)
        for b, f in zip(blocks, frames):
            x = pd.to_numeric(f[c], errors='coerce').astype(float)
            b.append(((x.fillna(med) - mu) / (sd if np.isfinite(sd) and sd > 0 else 1.)).to_numpy()[:, None])
        names.append(c)
        if ref.isna().any():
            for b, f in zip(blocks, frames): b.append(pd.to_numeric(f[c], errors='coerce').isna().to_numpy(float)[:, None])
            names.append(f'{c}_na')
    for c in cat_names:
        levels = train[c].astype(str).value_counts().index[:max_levels]
        for b, f in zip(blocks, frames):
            codes = pd.Categorical(f[c].astype(str), categories=levels).codes
            onehot = np.zeros((len(f), len(levels)), np.float32)
            rows = np.nonzero(codes >= 0)[0]
            onehot[rows, codes[rows]] = 1
            b.append(onehot)
        names += [f'{c}={v}' for v in levels]
    mats = [np.hstack(b).astype(np.float32) if b else np.zeros((len(f), 0), np.float32) for b, f in zip(blocks, frames)]
    return mats[0], mats[1:], names


RIDGE_ALPHAS = (1e-6, 1e-4, 1e-2, 1e-1, 1.)
LOGISTIC_ALPHAS = (1e-4, 1e-2)


def _ridge_path(X, y, alphas):
    """Ridge coefficients for each alpha (penalty alpha·n·‖w‖², intercept unpenalised): `(intercept, w)` per
    alpha, from one eigendecomposition of the centred XᵀX."""
    X, y = X.astype(np.float64), y.astype(np.float64)
    mx, my = X.mean(0), y.mean()
    Xc = X - mx
    s, V = np.linalg.eigh(Xc.T @ Xc)
    proj = V.T @ (Xc.T @ (y - my))
    out = []
    for a in alphas:
        w = V @ (proj / (np.clip(s, 0, None) + a * len(X)))
        out.append((my - mx @ w, w))
    return out


def _fit_logistic(X, y, n_classes, alpha, max_iter=200, weight=None):
    """Multinomial logistic regression, penalty alpha·‖W‖²/2 on the mean cross-entropy (weighted per class by
    `weight`, as torch's `cross_entropy` does), by L-BFGS; returns (W, b)."""
    weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float64)
    Xt, yt = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y, dtype=torch.long)
    W = torch.zeros(X.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=max_iter, line_search_fn='strong_wolfe')
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(Xt @ W + b, yt, weight=weight) + alpha / 2 * (W ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return W.detach().numpy(), b.detach().numpy()


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


ORIGINAL, LOG = ('original', lambda v: v, lambda v: v), ('log', np.log, np.exp)  # (name, encode, decode)


def _ridge_held_out(X, y, alphas, scales=(ORIGINAL,), seed=0):
    """Ridge fitted on the inner split's fit rows of `X`, `y`, for each scale (`(name, encode, decode)`: fitted on
    encode(y)) and alpha: `(held-out rmse on the scale of y, scale, alpha)`, scales then alphas in order."""
    fit, held = _inner_split(len(X), seed, 0.2)
    out = []
    for scale in scales:
        _, enc, dec = scale
        with np.errstate(over='ignore', invalid='ignore'):
            for a, (b0, w) in zip(alphas, _ridge_path(X[fit], enc(y[fit]), alphas)):
                out.append((float(np.sqrt(np.mean((dec(X[held] @ w + b0) - y[held]) ** 2))), scale, a))
    return out


def _logistic_held_out(X, t, n_classes, alphas, weight=None, seed=0):
    """L2 logistic regression fitted on the inner split's fit rows of `X`, class indices `t`, for each alpha:
    `(held-out cross-entropy, alpha)` in order."""
    fit, held = _inner_split(len(X), seed, 0.2)
    out = []
    for a in alphas:
        W, b = _fit_logistic(X[fit], t[fit], n_classes, a, weight=weight)
        p = _softmax(X[held].astype(np.float64) @ W + b)
        out.append((float(-np.log(np.clip(p[np.arange(len(held)), t[held]], 1e-12, None)).mean()), a))
    return out


def _best(scored):
    "The first of the `(score, ...)` tuples with the lowest finite score; None when no score is finite."
    finite = [s for s in scored if np.isfinite(s[0])]
    return min(finite, key=lambda s: s[0]) if finite else None


def linear_baseline(train, valid, target, cat_names=(), cont_names=(), task='regression', y_train=None, y_valid=None,
                    log_too=False, classes=None, class_weights=None, max_levels=50, seed=0):
    """The linear model a network should beat, on the same inputs and split (see the module docstring): ridge
    regression (`task='regression'`) or L2 logistic regression, penalty chosen on an inner split of `train`.
    Targets are `train[target]`/`valid[target]` unless `y_train`/`y_valid` are given (original scale); `log_too`
    also tries a fit on log(y). Returns a dict: `value` (rmse or accuracy on `valid`), `metric`, `pred` (validation
    predictions, original scale, or class labels), `proba` (classification: validation probabilities, one column
    per class of `classes`), `alpha`, `scale` ('original' or 'log'), `n_features`, `describe` (one line).
    `class_weights` (one per class of `classes`) weighs the logistic loss as the network's was weighed; a
    classification also returns `balanced_accuracy`."""
    y_tr = np.asarray(train[target] if y_train is None else y_train)
    y_va = np.asarray(valid[target] if y_valid is None else y_valid)
    X_tr, (X_va,), feats = design_matrix(train, [valid], cat_names, cont_names, max_levels)
    if task == 'regression':
        y_tr, y_va = y_tr.astype(float), y_va.astype(float)
        scales = [ORIGINAL] + ([LOG] if log_too and (y_tr > 0).all() else [])
        _, (scale, enc, dec), a = _best(_ridge_held_out(X_tr, y_tr, RIDGE_ALPHAS, scales, seed))
        (b0, w), = _ridge_path(X_tr, enc(y_tr), [a])
        pred = dec(X_va.astype(np.float64) @ w + b0)
        value = float(np.sqrt(np.mean((pred - y_va) ** 2)))
        return dict(value=value, metric='rmse', pred=pred, proba=None, alpha=a, scale=scale, n_features=len(feats),
                    describe=f"ridge regression on {len(feats)} features{' of log(y)' if scale == 'log' else ''} "
                             f"(alpha={a:g}, chosen on an inner split): rmse {value:.4g}")
    classes = list(classes) if classes is not None else sorted(pd.unique(np.r_[y_tr.astype(str), y_va.astype(str)]))
    index = {c: i for i, c in enumerate(classes)}
    t_tr = np.array([index[str(v)] for v in y_tr])
    _, a = _best(_logistic_held_out(X_tr, t_tr, len(classes), LOGISTIC_ALPHAS, class_weights, seed))
    W, b = _fit_logistic(X_tr, t_tr, len(classes), a, weight=class_weights)
    proba = _softmax(X_va.astype(np.float64) @ W + b)
    pred = np.asarray(classes)[proba.argmax(1)]
    value = float((pred == y_va.astype(str)).mean())
    weighted = ', class-weighted loss' if class_weights is not None else ''
    return dict(value=value, metric='accuracy', pred=pred, proba=proba, alpha=a, scale='original', n_features=len(feats),
                balanced_accuracy=classification_scores(y_va, pred, classes)['balanced_accuracy'],
                describe=f"logistic regression on {len(feats)} features (L2 alpha={a:g}, chosen on an inner split"
                         f"{weighted}): accuracy {value:.4g}")


def classification_scores(truth, pred, classes, proba=None):
    """Scores of class predictions `pred` against `truth` (labels; `classes` in the order of `proba`'s columns):
    `accuracy`, `balanced_accuracy` (mean recall over the classes present), `per_class` (a DataFrame: class,
    support, precision, recall), `confusion` (rows: truth, columns: predicted) and, with two classes and `proba`,
    `roc_auc` (of the second class's probability)."""
    truth, pred = np.asarray(truth).astype(str), np.asarray(pred).astype(str)
    classes = [str(c) for c in classes]
    confusion = pd.crosstab(pd.Categorical(truth, categories=classes), pd.Categorical(pred, categories=classes),
                            dropna=False).reindex(index=classes, columns=classes, fill_value=0)
    confusion.index.name, confusion.columns.name = 'truth', 'predicted'
    tp = np.diag(confusion.to_numpy()).astype(float)
    support, predicted = confusion.sum(1).to_numpy(float), confusion.sum(0).to_numpy(float)
    with np.errstate(invalid='ignore', divide='ignore'):
        recall, precision = tp / support, tp / predicted
    per_class = pd.DataFrame({'class': classes, 'support': support.astype(int), 'precision': precision,
                              'recall': recall})
    out = dict(accuracy=float((truth == pred).mean()), balanced_accuracy=float(np.nanmean(recall[support > 0])),
               per_class=per_class, confusion=confusion)
    if len(classes) == 2 and proba is not None:
        out['roc_auc'] = rank_auc(np.asarray(proba)[:, 1], truth == classes[1])
    return out


def _metric_fn(metric):
    if metric == 'rmse': return lambda t, p: float(np.sqrt(np.mean((p.astype(float) - t.astype(float)) ** 2)))
    return lambda t, p: float(np.mean(p.astype(str) == t.astype(str)))


def value_ci(truth, pred, metric='rmse', n_boot=2000, level=0.95, seed=0):
    """A `level` percentile bootstrap interval `[lo, hi]` of the validation `metric` ('rmse' or 'accuracy'):
    the metric recomputed on `n_boot` resamples (with replacement) of the validation rows."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    n = len(truth)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    if metric == 'rmse':
        sq = (pred.astype(float) - truth.astype(float)) ** 2
        stats = np.sqrt(sq[idx].mean(1))
    else: stats = (pred.astype(str) == truth.astype(str))[idx].mean(1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def paired_diff_ci(truth, pred, other, metric='rmse', n_boot=2000, level=0.95, seed=0):
    """A `level` percentile bootstrap interval of how much worse `pred` is than `other` on the same rows: the
    difference of their `metric` (rmse of `pred` minus rmse of `other`; accuracy of `other` minus accuracy of `pred`),
    both recomputed on each of `n_boot` resamples of the rows, so that the rows' own difficulty cancels."""
    truth, pred, other = np.asarray(truth), np.asarray(pred), np.asarray(other)
    idx = np.random.default_rng(seed).integers(0, len(truth), size=(n_boot, len(truth)))
    if metric == 'rmse':
        a, b = [(np.asarray(v, float) - truth.astype(float)) ** 2 for v in (pred, other)]
        diff = np.sqrt(a[idx].mean(1)) - np.sqrt(b[idx].mean(1))
    else:
        a, b = [(np.asarray(v).astype(str) == truth.astype(str)).astype(float) for v in (pred, other)]
        diff = b[idx].mean(1) - a[idx].mean(1)
    lo, hi = np.quantile(diff, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def balanced_class_weights(y, classes):
    "Loss weights n / (K·n_k) for the K `classes` of the training labels `y` (a class never seen gets weight 1)."
    y = np.asarray(y).astype(str)
    counts = np.array([(y == str(c)).sum() for c in classes], float)
    return np.where(counts > 0, len(y) / (len(classes) * np.maximum(counts, 1)), 1.)


# ---------------------------------------------------------------------------------------------
# From a learner

def _learner_data(learn):
    """What the audit reads from a learner: the processed training and validation inputs, the targets on the
    original scale, the class names, the network's validation predictions (and probabilities), and the names the
    user knows the columns by (a learner from `train_recipe` holds its recipe: targets on the original scale); the
    predictions come from `get_preds` on the weights as they are now."""
    dls = learn.dls
    recipe = getattr(learn, 'l5_recipe', None)
    cats, conts = list(dls.cat_names), list(dls.cont_names)
    train, valid = dls.train_ds.xs, dls.valid_ds.xs
    ycol = dls.y_names[0]
    regression = dls.c == 1 or not hasattr(dls, 'vocab')
    if recipe is not None:
        y_tr = recipe.y_raw.iloc[recipe.train_idx].to_numpy()
        y_va = recipe.y_raw.iloc[recipe.valid_idx].to_numpy()
    else:
        y_tr, y_va = dls.train_ds.ys[ycol].to_numpy(), dls.valid_ds.ys[ycol].to_numpy()
        if not regression:
            vocab = np.asarray(dls.vocab)
            y_tr, y_va = vocab[y_tr.astype(int)], vocab[y_va.astype(int)]
    # the validation predictions of the weights as they are now (without the Recorder, whose history diagnose reads)
    with learn.no_bar(), learn.removed_cbs(learn.recorder): raw, _ = learn.get_preds(dl=dls.valid)
    proba = None
    if regression:
        tt = getattr(recipe, 'target_transform', None)
        pred = raw.float().view(-1).numpy().astype(float)
        if tt is not None: pred = tt.decode(pred)
    else:
        proba = raw.float().numpy()
        pred = np.asarray(dls.vocab)[proba.argmax(1)]
    classes = None if regression else [str(c) for c in dls.vocab]
    names = getattr(recipe, 'names', {}) if recipe is not None else {}
    return dict(train=train, valid=valid, cats=cats, conts=conts, y_tr=y_tr, y_va=y_va, regression=regression,
                classes=classes, pred=pred, proba=proba, names=names,
                log_too=recipe is not None and recipe.target_transform.kind == 'log')


def audit(learn, thresholds=None):
    """The audit's numbers for `learn`'s validation rows: `value`, `value_ci`, `baseline` (constant), `linear`
    (`linear_baseline`'s dict), `leaks` (`target_leak`'s findings on the training rows) and, for classification,
    `scores` (`classification_scores`). Cached on the learner as `l5_audit` (a learner from `train_recipe` has it)."""
    cached = getattr(learn, 'l5_audit', None)
    if cached is not None and getattr(learn, 'l5_audit_key', None) == fit_key(learn): return cached
    d = _learner_data(learn)
    metric = 'rmse' if d['regression'] else 'accuracy'
    value = _metric_fn(metric)(d['y_va'], d['pred'])
    train = d['train'].assign(_y=d['y_tr'])
    valid = d['valid'].assign(_y=d['y_va'])
    linear = linear_baseline(train, valid, '_y', d['cats'], d['conts'], 'regression' if d['regression'] else
                             'classification', log_too=d['log_too'], classes=d['classes'])
    if d['regression']: baseline = float(np.sqrt(np.mean((d['y_va'].astype(float) - d['y_tr'].astype(float).mean()) ** 2)))
    else: baseline = float((d['y_va'].astype(str) == pd.Series(d['y_tr'].astype(str)).mode().iloc[0]).mean())
    leaks = target_leak(d['train'], d['y_tr'], d['cats'], d['conts'], 'regression' if d['regression'] else
                        'classification', names=d['names'], thresholds=thresholds)
    out = dict(metric=metric, value=value, value_ci=value_ci(d['y_va'], d['pred'], metric), baseline=baseline,
               linear=linear, leaks=leaks, n_valid=len(d['y_va']),
               vs_linear_ci=paired_diff_ci(d['y_va'], d['pred'], linear['pred'], metric,
                                           level={**AUDIT_THRESHOLDS, **(thresholds or {})}['level']))
    if not d['regression']:
        out['scores'] = classification_scores(d['y_va'], d['pred'], d['classes'], d['proba'])
        out['train_counts'] = pd.Series(d['y_tr'].astype(str)).value_counts().to_dict()
    learn.l5_audit, learn.l5_audit_key = out, fit_key(learn)
    return out


def fit_key(learn):
    "What identifies the weights the audit scored: the model and the sum of its last parameter (any step changes it)."
    last = list(learn.model.parameters())[-1]
    return id(learn.model), float(last.detach().double().sum())


def _worse_than_linear(a, th):
    "`worse_than_linear` from the audit `a`, or None: see `linear_tol` and `linear_cost` in `AUDIT_THRESHOLDS`."
    metric, lin, name, ours = a['metric'], a['linear']['value'], a['metric'], a['value']
    if a.get('weighted'):  # a class-weighted loss aims at balanced accuracy: compare that, with a weighted linear model
        name, ours, lin = 'balanced accuracy', a['scores']['balanced_accuracy'], a['linear']['balanced_accuracy']
    if metric == 'rmse': worse, cost = ours > (1 + th['linear_tol']) * lin, (ours / max(lin, 1e-12)) ** 2
    else: worse, cost = ours < lin - th['linear_tol'], (1 - ours) / max(1 - lin, 1e-12)
    if not worse: return None
    diff = None if a.get('weighted') else a.get('vs_linear_ci')
    sure = diff is None or diff[0] > 0
    material = cost >= th['linear_cost']
    err = 'rmse²' if metric == 'rmse' else 'error rate'
    why = ('' if diff is None else f"; by {diff[0]:.3g} to {diff[1]:.3g} in a paired bootstrap {th['level']:.0%} "
           f"interval{'' if sure else ', which holds 0: the validation rows cannot tell them apart'}")
    verdict = ('' if sure and material else f", under the {th['linear_cost']:g}x {err} that would make it a warning"
               if sure else '')
    return _finding('worse_than_linear', 'warn' if sure and material else 'info', '',
                    f"the network's validation {name} {ours:.4g} is worse than the {lin:.4g} of "
                    f"{a['linear']['describe'].split(':')[0]} on the same rows ({err} {cost:.2f}x{why}{verdict}).",
                    "use the linear model, or give the network what it lacks: more epochs (`--epochs`), a lower or "
                    "higher lr (`--lr`), and see the other findings (leaks, outliers in the target)")


def _balanced(pred, truth, n_classes):
    "Balanced accuracy (mean recall over the classes present in `truth`) and accuracy of class indices."
    recalls = [(pred[truth == k] == k).mean() for k in range(n_classes) if (truth == k).any()]
    return float(np.mean(recalls)), float((pred == truth).mean())


def _class_weight_effect(learn, a, box, th):
    """Balanced accuracy and accuracy on `box`'s validation rows before and after `imb_steps` steps of a copy at the
    peak lr on the cross-entropy weighted by inverse class frequency: `((bal, acc), (bal, acc))`, or None."""
    classes = [str(c) for c in learn.dls.vocab]  # the order of the model's outputs
    counts = a['train_counts']
    weights = balanced_class_weights(np.repeat(list(counts), list(counts.values())), classes)
    device = next(learn.model.parameters()).device
    loss = CrossEntropyLossFlat(weight=torch.tensor(weights, dtype=torch.float32, device=device))
    model = box.trained(lr=peak_lr(learn), steps=th['imb_steps'], loss_func=loss)
    if model is None or not box.valid: return None
    k = len(classes)
    return _balanced(*box.classes(learn.model), k), _balanced(*box.classes(model), k)


def _class_imbalance(learn, a, th, box):
    """`class_imbalance` from the audit `a`, or None; measured on a copy (`box`, a `Sandbox`, made here when None)
    unless the learner has no optimizer."""
    pc = a['scores']['per_class']
    missed = pc[(pc['support'] > 0) & (pc['recall'] < th['recall_low'])]
    if not len(missed) or a['value'] < a['baseline'] - 1e-12: return None
    worst = missed.sort_values('recall').iloc[0]
    counts = a.get('train_counts', {})
    share = counts.get(worst['class'], 0) / max(sum(counts.values()), 1)
    ev = (f"accuracy {a['value']:.3f} (the majority class alone: {a['baseline']:.3f}) while class {worst['class']} "
          f"({100 * share:.1f}% of the training rows) is found in {int(round(worst['recall'] * worst['support']))} of "
          f"{int(worst['support'])} validation rows (recall {worst['recall']:.2f}); balanced accuracy "
          f"{a['scores']['balanced_accuracy']:.3f}")
    advice = ("weigh the loss by inverse class frequency: `--class-weights` (Python: `train_recipe(recipe, "
              "class_weights=True)`, or `loss_func=CrossEntropyLossFlat(weight=...)`); it trades some accuracy for "
              "recall on the rare class")
    if a.get('weighted'):
        return _finding('class_imbalance', 'info', str(worst['class']), ev + "; the loss is already weighted by "
                        "inverse class frequency.", "the classes overlap on these inputs: more informative columns "
                        "or more rows of the rare class")
    if box is None and getattr(learn, 'opt', None) is not None:
        box = Sandbox(learn, k=th['imb_steps'])
    measured = _class_weight_effect(learn, a, box, th) if box is not None else None
    if measured is None: return _finding('class_imbalance', 'warn', str(worst['class']), ev + '.', advice)
    (bal0, acc0), (bal1, acc1) = measured
    gain = bal1 - bal0
    eff = f"balanced accuracy {bal0:.3f} -> {bal1:.3f} ({gain:+.3f}); accuracy {acc0:.3f} -> {acc1:.3f}"
    ev += (f"; {th['imb_steps']} steps on a copy with class weights give a balanced accuracy of {bal1:.3f} against "
           f"{bal0:.3f}")
    if gain < th['imb_gain']:
        return _finding('class_imbalance', 'info', str(worst['class']), ev + f" (under the +{th['imb_gain']:g} that "
                        "would make it a warning): weights buy little here, the classes overlap.",
                        "if the rare class matters, " + advice, eff)
    return _finding('class_imbalance', 'warn', str(worst['class']), ev + '.', advice, eff)


def audit_findings(learn, thresholds=None, box=None):
    """The practitioner's findings about `learn` (dicts with `kind`, `severity`, `where`, `evidence`, `advice`,
    `effect`), from the data it holds: `target_leak` (training rows), `worse_than_linear`, `class_imbalance` and
    `small_validation` (validation rows). `box`: a `counterfactual.Sandbox` of `learn` to measure class weights on
    (one is made when a class is missed and the learner has an optimizer). Thresholds: `AUDIT_THRESHOLDS`,
    overridden by `thresholds`."""
    th = {**AUDIT_THRESHOLDS, **(thresholds or {})}
    a = audit(learn, thresholds)
    rows = list(a['leaks']) + [_worse_than_linear(a, th)]
    if 'scores' in a: rows.append(_class_imbalance(learn, a, th, box))
    value, (lo, hi), metric = a['value'], a['value_ci'], a['metric']
    wide = (hi - lo) > (th['ci_rel'] * value if metric == 'rmse' else th['ci_abs'])
    if a['n_valid'] < th['min_valid'] or wide:
        why = (f"only {a['n_valid']} validation rows (fewer than {th['min_valid']})" if a['n_valid'] < th['min_valid']
               else f"{a['n_valid']} validation rows")
        rows.append(_finding('small_validation', 'warn', '', f"{why}: the validation {metric} {value:.4g} has a 95% "
                             f"bootstrap interval [{lo:.4g}, {hi:.4g}], so differences smaller than that are noise.",
                             "read the score as the interval; compare models by cross-validation or on more "
                             "labelled rows before trusting a small difference"))
    return [r for r in rows if r is not None]
