"""Data shift across all the features of new data: `cat_shift`, the categorical counterpart of `bn_shift` (level
shares of new data against the training shares the learner holds), and `shift_table`, both kinds under one
multiple-testing rule, which `diagnose(learn, new_df)` reads."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from fastai.tabular.core import Categorify
from scipy import stats
from scipy.spatial.distance import jensenshannon

from .batchnorm import bn_shift

__all__ = ['cat_shift', 'shift_table', 'SHIFT_ALPHA']

# The family-wise false-alarm rate of `shift_table`: a sample drawn from the training distribution gets any feature
# flagged with probability at most SHIFT_ALPHA (Bonferroni over every test of every feature).
SHIFT_ALPHA = 0.02
# Samples larger than this are judged by the Jensen-Shannon distance as well as the chi-squared test (Evidently's
# rule: with many rows any tiny move is significant; a user asks whether the mix *moved*).
CHI2_MAX_ROWS, JS_MIN = 1000, 0.1


def _categorify(learn):
    "The learner's `Categorify` proc (found by type, as the callbacks are), or None."
    procs = getattr(learn.dls, 'procs', None) or []
    return next((p for p in procs if isinstance(p, Categorify)), None)


def _train_codes(learn, cats):
    items = getattr(getattr(learn.dls, 'train_ds', None), 'items', None)
    if not isinstance(items, pd.DataFrame) or not len(items) or not set(cats) <= set(items.columns):
        raise ValueError("cat_shift compares with the training rows the learner's DataLoaders hold, and these hold "
                         "none (an exported learner?): call it on the learner you trained")
    return items[cats]


def _new_codes(learn, df, cats):
    "The codes fastai's procs give `df` (unseen levels become #na#, code 0), via `learn.dls.test_dl`."
    try: return learn.dls.test_dl(df).items[cats]
    except Exception as e:
        raise ValueError(f"cat_shift could not process df with the learner's procs ({type(e).__name__}: {e}); it needs "
                         f"the columns the model was trained on: {list(learn.dls.cat_names) + list(learn.dls.cont_names)}") from e


def _unseen(df, col, vocab):
    "Values of `df[col]` (not missing) that the training vocabulary lacks, most frequent first."
    if col not in df.columns: return pd.Series(dtype=int)
    known = set(map(str, vocab))
    vals = df[col].dropna()
    return vals[~vals.astype(str).isin(known)].astype(str).value_counts()


def cat_shift(learn, df, alpha=0.01, min_js=JS_MIN, max_chi2_rows=CHI2_MAX_ROWS):
    """Which categorical features of new data `df` changed their mix of levels against the training rows the learner
    holds (`learn.dls.train_ds`, coded by its `Categorify`; `df` goes through the same procs, so a level unseen in
    training counts as `#na#`). Per feature:

    - `chi2`, `p_value`: Pearson's chi-squared test of homogeneity on the 2 × K table of level counts (training,
      new), levels absent from both dropped: does the new sample come from the training mix?
    - `js`: the Jensen-Shannon distance between the two shares (natural log, so 0..√ln 2 ≈ 0.83).
    - `test`: `'chi2'` for samples of at most `max_chi2_rows` rows, where the test alone decides (p < `alpha`);
      `'js'` for larger ones, where the mix must also have moved materially (js ≥ `min_js`), since with many rows
      any tiny move is significant (Evidently's rule).
    - `moved`: the levels whose share moved most, as 'level a% -> b%'; `unseen`: levels never seen in training.
    - `shifted` (bool).

    `alpha` is per feature; `shift_table` sets it from one rule over all features. Raises `ValueError` for a
    learner without training rows or `df` its procs cannot process."""
    if not isinstance(df, pd.DataFrame): raise ValueError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    if not len(df): raise ValueError("df has no rows")
    cats = list(learn.dls.cat_names)
    cols = ['feature', 'n_new', 'chi2', 'p_value', 'js', 'test', 'moved', 'unseen', 'shifted']
    if not cats: return pd.DataFrame(columns=cols)
    tr, new = _train_codes(learn, cats), _new_codes(learn, df, cats)
    proc = _categorify(learn)
    rows = []
    for c in cats:
        vocab = list(proc.classes[c]) if proc is not None and c in proc.classes else list(range(int(tr[c].max()) + 1))
        k = max(len(vocab), int(tr[c].max()) + 1, int(new[c].max()) + 1)
        a = np.bincount(tr[c].to_numpy().astype(int), minlength=k).astype(float)
        b = np.bincount(new[c].to_numpy().astype(int), minlength=k).astype(float)
        keep = (a + b) > 0
        if keep.sum() < 2: chi2, p = 0., 1.
        else: chi2, p = stats.chi2_contingency(np.stack([a[keep], b[keep]]), correction=False)[:2]
        sa, sb = a / a.sum(), b / b.sum()
        js = float(jensenshannon(sa, sb))
        n = int(b.sum())
        test = 'chi2' if n <= max_chi2_rows else 'js'
        shifted = p < alpha and (test == 'chi2' or js >= min_js)
        order = np.argsort(-np.abs(sb - sa))[:3]
        name = lambda i: str(vocab[i]) if i < len(vocab) else str(i)
        moved = ', '.join(f"{name(i)} {100 * sa[i]:.0f}% -> {100 * sb[i]:.0f}%" for i in order if abs(sb[i] - sa[i]) >= .005)
        unseen = _unseen(df, c, vocab)
        rows.append(dict(feature=c, n_new=n, chi2=float(chi2), p_value=float(p), js=js, test=test, moved=moved,
                         unseen=', '.join(f"{v} ({cnt})" for v, cnt in unseen.head(3).items()), shifted=bool(shifted)))
    return pd.DataFrame(rows, columns=cols)


def _z_crit(alpha_each): return float(stats.norm.isf(alpha_each / 2))


def shift_table(learn, df, alpha=SHIFT_ALPHA, min_effect=0.1):
    """Every feature of new data `df` under one multiple-testing rule: Bonferroni over all the tests, the mean and
    the spread of each continuous feature (`bn_shift`, at |z| > the matching critical value, and its `min_effect`)
    and the level mix of each categorical one (`cat_shift`), so that a sample from the training distribution gets
    any feature flagged with probability at most `alpha`. One row per feature: `feature`, `kind` ('continuous',
    'categorical'), `shifted`, `test` (which test fired: 'mean z', 'spread z', 'chi2', 'js'), `evidence` (one
    sentence with the numbers) and `stat` (|z|, or -log10 p, to rank the features). A model without `bn_cont`
    has its categorical features tested alone."""
    from .core import unwrap_model
    from .precise import BN_TYPES
    conts, cats = list(learn.dls.cont_names), list(learn.dls.cat_names)
    if not isinstance(getattr(unwrap_model(learn.model), 'bn_cont', None), BN_TYPES): conts = []  # bn_shift's reference
    m = 2 * len(conts) + len(cats)
    if not m: return pd.DataFrame(columns=['feature', 'kind', 'shifted', 'test', 'evidence', 'stat'])
    each = alpha / m
    rows = []
    if conts:
        z = _z_crit(each)
        for r in bn_shift(learn, df, threshold=z, min_effect=min_effect).itertuples():
            mean_moved = abs(r.z) > z and abs(r.effect) > min_effect
            test = 'mean z' if mean_moved else ('spread z' if r.shifted else '')
            if mean_moved or not r.shifted:
                ev = (f"{r.feature} has mean {r.new_mean:.3g} in the new data against {r.train_mean:.3g} in training, "
                      f"{r.effect:+.2f} training sd (z={r.z:.3g}, over the critical {z:.2f} for {m} tests at "
                      f"{alpha:g}); sd ratio {r.std_ratio:.3g}.")
            else:
                ev = (f"{r.feature} has a spread {r.std_ratio:.3g}x its training sd ({r.new_std:.3g} against "
                      f"{r.train_std:.3g}; the spread's z is over the critical {z:.2f} for {m} tests at {alpha:g}); "
                      f"its mean moved {r.effect:+.2f} training sd.")
            rows.append(dict(feature=r.feature, kind='continuous', shifted=bool(r.shifted), test=test, evidence=ev,
                             stat=abs(r.z)))
    if cats:
        for r in cat_shift(learn, df, alpha=each).itertuples():
            why = (f"chi-squared {r.chi2:.3g}, p={r.p_value:.2g} < {each:.2g} ({m} tests at {alpha:g}) on {r.n_new} rows"
                   if r.test == 'chi2' else
                   f"Jensen-Shannon distance {r.js:.3f} >= {JS_MIN} on {r.n_new} rows, chi-squared p={r.p_value:.2g}")
            ev = (f"{r.feature}'s mix of levels moved ({r.moved or 'no level moved by 0.5 points'})"
                  + (f"; levels unseen in training: {r.unseen}" if r.unseen else '') + f": {why}.")
            rows.append(dict(feature=r.feature, kind='categorical', shifted=bool(r.shifted), test=r.test if r.shifted else '',
                             evidence=ev, stat=-math.log10(max(r.p_value, 1e-300))))
    return pd.DataFrame(rows)
