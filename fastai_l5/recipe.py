"""The default recipe behind `fastai-l5 report`: how a user's table becomes a `tabular_learner` worth
instrumenting. Every choice it makes is kept (`TabularRecipe.describe()`) so the report can say it.

- **Columns.** Named columns (`cat_names`, `cont_names`) are used as given. The others are sorted by dtype
  (numbers continuous; text and booleans categorical) after three checks: an *identifier-like* column
  (every value distinct, integer or text dtype: a row number, an id) is left out, since at best it carries
  nothing and at worst it leaks the row order; a *date/time-like* text column is expanded with fastai's
  `add_datepart` (year, month, day of week, ..., elapsed seconds); a *near-unique text* column (more
  distinct values than half the rows: free text, names) is left out. In every text column kept as
  categorical, levels seen in fewer than `RARE` rows become one level `#rare#`, so the embedding tables
  hold only levels the model can learn something about.
- **Target.** A numeric target with more than 20 distinct values, or any fractional value, is a regression;
  anything else (text, booleans, a few whole numbers) a classification. A regression target is trained on a transformed scale: log(y) when every value is
  positive and the skewness exceeds 1 (or with `log_target=True`), else standardized, (y − mean) / sd with
  the training rows' mean and sd. `y_range` for fastai's final sigmoid is the transformed training targets'
  min..max widened by 5% each side. Metrics, baseline and predictions are on the original scale.
- **Fit size.** `bs = 2^round(log2(n_train / 32))` clipped to [16, 1024] (about 32 batches an epoch), and
  `epochs = ceil(300 / steps_per_epoch)` clipped to [3, 40] (at least about 300 optimizer steps where 40
  epochs allow it)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.data.block import CategoryBlock, RegressionBlock
from fastai.data.transforms import RandomSplitter
from fastai.metrics import AccumMetric
from fastai.tabular.all import Categorify, FillMissing, Normalize, TabularDataLoaders, add_datepart

__all__ = ['TabularRecipe', 'TargetTransform', 'tabular_recipe', 'read_table', 'fit_size']

RARE, STEPS_PER_EPOCH, MIN_STEPS, MIN_EPOCHS, MAX_EPOCHS, MIN_BS, MAX_BS = 5, 32, 300, 3, 40, 16, 1024


def fit_size(n_train, bs=None, epochs=None):
    """`(bs, epochs)` for `n_train` training rows: `bs = 2^round(log2(n_train/32))` clipped to [16, 1024],
    `epochs = ceil(300 / (n_train // bs))` clipped to [3, 40]. Either can be given instead."""
    if bs is None: bs = int(np.clip(2 ** round(math.log2(max(n_train, 1) / STEPS_PER_EPOCH)), MIN_BS, MAX_BS))
    bs = max(2, min(bs, n_train // 2))
    if epochs is None: epochs = int(np.clip(math.ceil(MIN_STEPS / max(n_train // bs, 1)), MIN_EPOCHS, MAX_EPOCHS))
    return bs, epochs


def read_table(path):
    "Read a CSV file into a `DataFrame`; `ValueError` with a one-line reason if it is not one."
    path = Path(path)
    if path.is_dir(): raise ValueError(f"{path} is a directory; give the path of a CSV file")
    if not path.is_file(): raise ValueError(f"no such file: {path}")
    try: df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"could not read {path} as CSV: {str(e).splitlines()[0]}") from e
    if df.empty: raise ValueError(f"{path} has no data rows")
    return df


class TargetTransform:
    """The scale a regression target is trained on: `kind` is `'standardize'` ((y − mean)/sd), `'log'`
    (log y) or `'none'`. `encode` maps original values to that scale, `decode` maps back."""
    def __init__(self, kind='none', mean=0., sd=1.): self.kind, self.mean, self.sd = kind, float(mean), float(sd)

    @classmethod
    def fit(cls, y, log=None):
        "Choose for training values `y`: log when `log` is True, or when `log` is None and y > 0 with skewness > 1."
        y = pd.Series(np.asarray(y, dtype=float))
        if log is None: log = bool((y > 0).all() and y.skew() > 1)
        return cls('log') if log else cls('standardize', y.mean(), y.std() or 1.)

    def encode(self, y):
        if self.kind == 'log': return np.log(y)
        return (y - self.mean) / self.sd

    def decode(self, y):
        if self.kind == 'log': return torch.exp(y) if isinstance(y, torch.Tensor) else np.exp(y)
        return y * self.sd + self.mean

    def __repr__(self):
        if self.kind == 'standardize': return f'standardize: (y − {self.mean:.4g}) / {self.sd:.4g}'
        return {'log': 'log: log(y)', 'none': 'none'}[self.kind]


def original_rmse(tt):
    "fastai metric `rmse` on the target's original scale, for a model trained on `tt`'s scale."
    def rmse(preds, targs): return torch.sqrt(((tt.decode(preds.float()) - tt.decode(targs.float())) ** 2).mean())
    return AccumMetric(rmse, name='rmse')


def _is_text(s): return pd.api.types.is_object_dtype(s) or pd.api.types.is_string_dtype(s)


def _is_identifier(s):
    return (pd.api.types.is_integer_dtype(s) or _is_text(s)) and s.notna().all() and s.nunique() == len(s)


def _is_datetime_like(s):
    if pd.api.types.is_datetime64_any_dtype(s): return True
    if not _is_text(s): return False
    sample = s.dropna().astype(str).head(200)
    if not len(sample) or not sample.str.match(r'^\s*\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}').all(): return False
    return pd.to_datetime(sample, errors='coerce', format='mixed').notna().mean() > 0.95


class TabularRecipe:
    """A table prepared for `tabular_learner` (see the module docstring for the rules): `df` (rows with a
    target, date columns expanded, rare levels lumped, the target on its training scale), `cat_names`,
    `cont_names`, `dropped` ({column: why}), `notes`, `task`, `target`, `target_transform`, the split
    (`train_idx`, `valid_idx`), `y_raw` (the target on its original scale) and `bs`, `epochs`."""
    def __init__(self, **kwargs): self.__dict__.update(kwargs)

    @property
    def is_regression(self): return self.task == 'regression'

    def dls(self):
        "`TabularDataLoaders` with `Categorify`, `FillMissing` and `Normalize`, this recipe's split and `bs`."
        return TabularDataLoaders.from_df(self.df, procs=[Categorify, FillMissing, Normalize], cat_names=self.cat_names,
                                          cont_names=self.cont_names, y_names=self.target, valid_idx=self.valid_idx,
                                          y_block=RegressionBlock() if self.is_regression else CategoryBlock(), bs=self.bs)

    def y_range(self):
        "The transformed training targets' min..max, 5% wider each side (None for a classification)."
        if not self.is_regression: return None
        y = self.df[self.target].to_numpy(dtype=float)[self.train_idx]
        lo, hi = float(np.min(y)), float(np.max(y))
        return (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))

    def metric(self):
        "The fastai metric: `rmse` on the original scale, or `accuracy`."
        from fastai.metrics import accuracy
        return original_rmse(self.target_transform) if self.is_regression else accuracy

    def baseline(self):
        """A constant predictor's score on the validation rows: the RMSE of the training mean (original
        scale), or the accuracy of the training rows' majority class."""
        train, valid = self.y_raw.iloc[self.train_idx], self.y_raw.iloc[self.valid_idx]
        if self.is_regression: return float(np.sqrt(((valid.astype(float) - train.astype(float).mean()) ** 2).mean()))
        return float((valid == train.mode().iloc[0]).mean())

    def describe(self):
        "The choices this recipe made, as `(label, text)` lines."
        n_train = len(self.train_idx)
        steps = max(n_train // self.bs, 1)
        kinds = {'regression': f'regression of {self.target} (metric: rmse on the original scale)',
                 'classification': f'classification of {self.target} into {self.y_raw.nunique()} classes (metric: accuracy)'}
        lines = [('task', kinds[self.task]),
                 ('rows', f'{len(self.df):,} kept ({n_train:,} training, {len(self.valid_idx):,} validation, random split); '
                          f'{self.n_missing_target:,} dropped for a missing target'),
                 ('categorical', ', '.join(self.cat_names) or '(none)'),
                 ('continuous', ', '.join(self.cont_names) or '(none)'),
                 ('dropped', '; '.join(f'{c} ({why})' for c, why in self.dropped.items()) or '(none)')]
        if self.is_regression: lines.append(('target scale', repr(self.target_transform) + ' for training; metric and '
                                             'predictions decoded to the original scale'))
        lines.append(('batches', f'bs={self.bs}: {steps} steps an epoch, {steps * self.epochs:,} in {self.epochs} epochs '
                                 f'(rule: bs≈rows/{STEPS_PER_EPOCH} in [{MIN_BS}, {MAX_BS}], epochs for ≥{MIN_STEPS} steps in '
                                 f'[{MIN_EPOCHS}, {MAX_EPOCHS}])'))
        return lines + [('note', n) for n in self.notes]


def _sort_columns(df, target, cat_names, cont_names, drop):
    "Decide each unnamed column's kind; returns `(df, cat_names, cont_names, dropped, notes)`."
    named = set(cat_names) | set(cont_names) | {target}
    cat_names, cont_names, notes = list(cat_names), list(cont_names), []
    dropped = {c: 'asked (--drop)' for c in drop}
    for c in [c for c in df.columns if c not in named and c not in dropped]:
        s = df[c]
        if s.isna().all(): dropped[c] = 'every value missing'
        elif _is_identifier(s): dropped[c] = f'identifier-like: all {len(s):,} values distinct; name it with --cat/--cont to use it'
        elif _is_datetime_like(s):
            parts = _expand_date(df, c)
            cat_names += [p for p in parts if pd.api.types.is_bool_dtype(df[p])]
            cont_names += [p for p in parts if not pd.api.types.is_bool_dtype(df[p])]
            notes.append(f'{c} looks like a date/time: expanded with add_datepart into {len(parts)} columns')
        elif _is_text(s) and s.nunique() > len(s) / 2:
            dropped[c] = f'near-unique text: {s.nunique():,} distinct values in {len(s):,} rows'
        elif pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s): cont_names.append(c)
        else: cat_names.append(c)
    for c in cat_names:
        if not _is_text(df[c]): continue
        counts = df[c].value_counts()
        rare = counts.index[counts < RARE]
        if len(rare) and len(rare) < len(counts):
            df[c] = df[c].where(~df[c].isin(rare), '#rare#')
            notes.append(f'{c}: {len(rare):,} of {len(counts):,} levels seen in fewer than {RARE} rows lumped into #rare#')
    return df.drop(columns=list(dropped)), cat_names, cont_names, dropped, notes


def _expand_date(df, col):
    "Replace `col` by fastai's `add_datepart` columns (with hour/minute/second when any time is not midnight)."
    when = pd.to_datetime(df[col], errors='coerce', format='mixed', utc=True).dt.tz_localize(None)
    has_time = bool((when.dropna() != when.dropna().dt.normalize()).any())
    before = set(df.columns)
    df[col] = when.astype('datetime64[ns]')
    add_datepart(df, col, prefix=f'{col}_', time=has_time)
    return [c for c in df.columns if c not in before]


def _check_names(df, target, cat_names, cont_names, drop):
    named = [target, *cat_names, *cont_names, *drop]
    unknown = [c for c in dict.fromkeys(named) if c not in df.columns]
    if unknown: raise ValueError(f"unknown column(s) {unknown}; the columns are {list(df.columns)}")
    if target in {*cat_names, *cont_names}:
        raise ValueError(f"the target {target!r} is also named as an input (--cat/--cont): a model given its own "
                         "target learns nothing usable; leave it out of --cat/--cont")
    both = [c for c in cat_names if c in cont_names]
    if both: raise ValueError(f"{both} named both --cat and --cont; give each column one kind")
    clash = [c for c in drop if c in {target, *cat_names, *cont_names}]
    if clash: raise ValueError(f"{clash} named in --drop and as the target or an input; name each column once")


def tabular_recipe(df, target, cat_names=(), cont_names=(), drop=(), log_target=None, bs=None, epochs=None,
                   valid_pct=0.2, seed=42):
    """Prepare `df` to predict `target` by the rules in this module's docstring; returns a `TabularRecipe`.
    `log_target`: True forces log(y), False forbids it, None decides from the data. Raises `ValueError`
    with a one-line reason on bad input, before any training."""
    cat_names, cont_names, drop = list(cat_names or []), list(cont_names or []), list(drop or [])
    _check_names(df, target, cat_names, cont_names, drop)
    n_rows = len(df)
    df = df.dropna(subset=[target]).reset_index(drop=True)
    if len(df) < 10: raise ValueError(f"{len(df)} rows have a target; at least 10 are needed")
    y = df[target]
    is_regression = (pd.api.types.is_numeric_dtype(y) and not pd.api.types.is_bool_dtype(y)
                     and (y.nunique() > 20 or bool((y != y.round()).any())))
    if log_target and not is_regression:
        raise ValueError(f"--log-target needs a regression target (numeric, with more than 20 distinct values or fractions); "
                         f"{target!r} is a classification")
    if log_target and (y <= 0).any():
        raise ValueError(f"--log-target needs a positive target; {target!r} has {(y <= 0).sum():,} values ≤ 0")
    df, cat_names, cont_names, dropped, notes = _sort_columns(df.copy(), target, cat_names, cont_names, drop)
    if not cat_names and not cont_names: raise ValueError(f"no input columns are left to predict {target!r} from")
    train_idx, valid_idx = map(list, RandomSplitter(valid_pct, seed=seed)(range(len(df))))
    y_raw = df[target].copy()
    tt = TargetTransform('none')
    if is_regression:
        tt = TargetTransform.fit(y_raw.iloc[train_idx], log=log_target)
        df[target] = tt.encode(y_raw.astype(float)).astype('float32')
    else: df[target] = y_raw.astype(str)
    bs, epochs = fit_size(len(train_idx), bs, epochs)
    return TabularRecipe(df=df, target=target, task='regression' if is_regression else 'classification',
                         cat_names=cat_names, cont_names=cont_names, dropped=dropped, notes=notes, target_transform=tt,
                         train_idx=train_idx, valid_idx=valid_idx, y_raw=y_raw, bs=bs, epochs=epochs,
                         n_missing_target=n_rows - len(df))
