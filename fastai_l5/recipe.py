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
  the training rows' mean and sd (below 10,000 training rows the report may put a log(y) it was not asked for back
  to standardized: `report.skip_target_scale`). `y_range` for fastai's final sigmoid is the transformed training targets'
  min..max widened by 5% each side, unless the target is heavy-tailed: when the middle half of the training
  targets (the IQR) spans less than `Y_RANGE_IQR` = 10% of min..max, there is no `y_range`, since the sigmoid
  would squeeze the bulk of the rows into its flat end (nycflights13 `arr_delay`: the IQR is 2.3% of the range;
  with the sigmoid a 160,000-row sample ended at rmse 52.4 against 44.3 for the constant, without it at 11.7;
  every other regression target tried has an IQR of 15-43% of its range). Metrics, baseline and predictions are
  on the original scale.
- **Edges.** A target with one value (or one class in the training rows) is a one-line error before any
  training. A column whose name fastai's tabular objects answer as their own attribute (`c`, `x`, `y`, `cats`,
  ...: `safe_names`) is trained under another name and described under the user's. `read_table` detects the
  separator (`detect_sep`), and an unknown column in a header that holds another separator says so.
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

__all__ = ['TabularRecipe', 'TargetTransform', 'tabular_recipe', 'read_table', 'detect_sep', 'fit_size',
           'fit_size_reason', 'safe_names']

RARE, STEPS_PER_EPOCH, MIN_STEPS, MIN_EPOCHS, MAX_EPOCHS, MIN_BS, MAX_BS = 5, 32, 300, 3, 40, 16, 1024
Y_RANGE_IQR = 0.1


def fit_size_reason(n_train, bs=None, epochs=None):
    "How `fit_size(n_train, bs, epochs)` got its numbers, in words, naming every clip that applied."
    out_bs, out_epochs = fit_size(n_train, bs, epochs)
    if bs is None:
        raw = 2 ** round(math.log2(max(n_train, 1) / STEPS_PER_EPOCH))
        why = f'rule: 2^round(log2(rows/{STEPS_PER_EPOCH})) = {raw:g}'
        if raw < MIN_BS: why += f', raised to the minimum {MIN_BS}'
        if raw > MAX_BS: why += f', lowered to the maximum {MAX_BS}'
    else: why = 'given'
    if out_bs < (bs or int(np.clip(2 ** round(math.log2(max(n_train, 1) / STEPS_PER_EPOCH)), MIN_BS, MAX_BS))):
        why += f', capped at half the {n_train:,} training rows'
    steps = max(n_train // out_bs, 1)
    if epochs is None:
        raw = math.ceil(MIN_STEPS / steps)
        ewhy = f'rule: ceil({MIN_STEPS} / {steps} steps) = {raw}'
        if raw < MIN_EPOCHS: ewhy += f', raised to the minimum {MIN_EPOCHS}'
        if raw > MAX_EPOCHS: ewhy += f', lowered to the maximum {MAX_EPOCHS}'
    else: ewhy = 'given'
    return f'bs={out_bs} ({why}); epochs={out_epochs} ({ewhy})'


def fit_size(n_train, bs=None, epochs=None):
    """`(bs, epochs)` for `n_train` training rows: `bs = 2^round(log2(n_train/32))` clipped to [16, 1024],
    `epochs = ceil(300 / (n_train // bs))` clipped to [3, 40]. Either can be given instead."""
    if bs is None: bs = int(np.clip(2 ** round(math.log2(max(n_train, 1) / STEPS_PER_EPOCH)), MIN_BS, MAX_BS))
    bs = max(2, min(bs, n_train // 2))
    if epochs is None: epochs = int(np.clip(math.ceil(MIN_STEPS / max(n_train // bs, 1)), MIN_EPOCHS, MAX_EPOCHS))
    return bs, epochs


SEPARATORS = ',;\t|'


def detect_sep(path, default=','):
    """The field separator of the CSV file at `path`: the one of `,` `;` tab `|` that splits the header and the
    first data lines into the same number of fields (more than one), the most fields winning; `default` if none."""
    with open(path, encoding='utf-8', errors='replace') as f: lines = [l for l in (f.readline() for _ in range(20)) if l.strip()]
    best, best_n = default, 1
    for sep in SEPARATORS:
        counts = {len(l.rstrip('\r\n').split(sep)) for l in lines}
        if len(counts) == 1 and (n := counts.pop()) > best_n: best, best_n = sep, n
    return best


def read_table(path, sep=None):
    """Read a CSV file into a `DataFrame`, the separator detected (`detect_sep`) unless `sep` is given; the
    separator used is kept in `df.attrs['sep']`. `ValueError` with a one-line reason if it is not one."""
    path = Path(path)
    if path.is_dir(): raise ValueError(f"{path} is a directory; give the path of a CSV file")
    if not path.is_file(): raise ValueError(f"no such file: {path}")
    try:
        sep = sep or detect_sep(path)
        df = pd.read_csv(path, sep=sep)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"could not read {path} as CSV: {str(e).splitlines()[0]}") from e
    if df.empty: raise ValueError(f"{path} has no data rows")
    df.attrs['sep'] = sep
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
    `cont_names`, `dropped` ({column: why}), `notes`, `task`, `target`, `target_transform`, `log_target` (as asked:
    True, False or None), the split (`train_idx`, `valid_idx`), `y_raw` (the target on its original scale) and `bs`,
    `epochs`."""
    def __init__(self, **kwargs): self.__dict__.update(kwargs)

    @property
    def is_regression(self): return self.task == 'regression'

    def dls(self):
        "`TabularDataLoaders` with `Categorify`, `FillMissing` and `Normalize`, this recipe's split and `bs`."
        # copies: FillMissing appends its `_na` columns to the list it is given
        return TabularDataLoaders.from_df(self.df, procs=[Categorify, FillMissing, Normalize], cat_names=list(self.cat_names),
                                          cont_names=list(self.cont_names), y_names=self.target, valid_idx=self.valid_idx,
                                          y_block=RegressionBlock() if self.is_regression else CategoryBlock(), bs=self.bs)

    def y_range(self):
        """The transformed training targets' min..max, 5% wider each side; None for a classification, or for a
        heavy-tailed target (IQR < `Y_RANGE_IQR` x the range: see the module docstring)."""
        if not self.is_regression or self.heavy_tailed(): return None
        y = self.df[self.target].to_numpy(dtype=float)[self.train_idx]
        lo, hi = float(np.min(y)), float(np.max(y))
        return (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))

    def tail_share(self):
        "The training targets' IQR as a share of their min..max, on the training scale (None for a classification)."
        if not self.is_regression: return None
        y = self.df[self.target].to_numpy(dtype=float)[self.train_idx]
        q1, q3 = np.quantile(y, [0.25, 0.75])
        return float((q3 - q1) / max(float(y.max() - y.min()), 1e-12))

    def heavy_tailed(self): return self.is_regression and self.tail_share() < Y_RANGE_IQR

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
        user = self.user_name
        kinds = {'regression': f'regression of {user(self.target)} (metric: rmse on the original scale)',
                 'classification': f'classification of {user(self.target)} into {self.y_raw.nunique()} classes (metric: accuracy)'}
        lines = [('task', kinds[self.task]),
                 ('rows', f'{len(self.df):,} kept ({n_train:,} training, {len(self.valid_idx):,} validation, random split); '
                          f'{self.n_missing_target:,} dropped for a missing target'),
                 ('categorical', ', '.join(map(user, self.cat_names)) or '(none)'),
                 ('continuous', ', '.join(map(user, self.cont_names)) or '(none)'),
                 ('dropped', '; '.join(f'{user(c)} ({why})' for c, why in self.dropped.items()) or '(none)')]
        if self.is_regression:
            tail = (f'; no y_range: the middle half of the training targets spans {100 * self.tail_share():.1f}% of their '
                    f'range (< {100 * Y_RANGE_IQR:.0f}%), a heavy tail a sigmoid would squeeze the bulk against'
                    if self.heavy_tailed() else '')
            lines.append(('target scale', repr(self.target_transform) + ' for training; metric and predictions decoded '
                          'to the original scale' + tail))
        lines.append(('batches', f'{steps} steps an epoch, {steps * self.epochs:,} in all: '
                                 + fit_size_reason(n_train, self.bs_given, self.epochs_given)))
        renamed = [f'{user(c)} as {c}' for c in self.names]
        if renamed: self_notes = [f"trained under another name, since fastai reads these names as its own attributes: "
                                  f"{', '.join(renamed)} (the report uses your names)"]
        else: self_notes = []
        return lines + [('note', n) for n in self.notes + self_notes]

    def user_name(self, col):
        "The name the user gave column `col` (columns fastai would shadow are trained under another name)."
        return getattr(self, 'names', {}).get(col, col)


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


def _reserved_names():
    "Names fastai's tabular objects answer as attributes (`dls.c`, `to.y`, ...): a column by such a name is shadowed."
    from fastai.data.core import DataLoaders, TfmdDL
    from fastai.learner import Learner
    from fastai.tabular.core import TabularPandas
    from fastai.tabular.data import TabularDataLoaders
    names = {'c', 'x', 'y', 'n', 'xs', 'ys', 'cats', 'conts', 'vocab', 'classes', 'items', 'procs', 'device', 'bs', 'train',
             'valid', 'loss_func', 'model', 'dls', 'splits', 'n_inp', 'dataset', 'y_names', 'cat_names', 'cont_names'}
    for cls in (TabularPandas, TabularDataLoaders, DataLoaders, TfmdDL, Learner):
        names |= {a for a in dir(cls) if not a.startswith('_')}
    return names


def safe_names(columns):
    """`{column: internal name}` for the columns whose name fastai would shadow (see `_reserved_names`): the name
    with `_col` appended (more underscores if that is taken). The report maps them back to the user's names."""
    reserved, taken = _reserved_names(), set(map(str, columns))
    out = {}
    for c in columns:
        if str(c) not in reserved: continue
        new = f'{c}_col'
        while new in taken or new in reserved: new += '_'
        out[c] = new; taken.add(new)
    return out


def _check_names(df, target, cat_names, cont_names, drop):
    named = [target, *cat_names, *cont_names, *drop]
    unknown = [c for c in dict.fromkeys(named) if c not in df.columns]
    if unknown:
        seps = [repr(sep) for sep in SEPARATORS if any(sep in str(c) for c in df.columns)]
        hint = (f" (the header holds {' and '.join(seps)}: is the file separated by {seps[0]}? say so with --sep)"
                if seps else '')
        raise ValueError(f"unknown column(s) {unknown}; the columns are {list(df.columns)}{hint}")
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
    user_target, n_rows = target, len(df)
    rename = safe_names(df.columns)
    if rename:  # fastai would read a column named `c`, `x`, `y`, ... as its own attribute: train under another name
        df = df.rename(columns=rename)
        target = rename.get(target, target)
        cat_names, cont_names, drop = ([rename.get(c, c) for c in names] for names in (cat_names, cont_names, drop))
    has_target = df[target].notna().to_numpy()
    rows = np.arange(n_rows)[has_target]  # each kept row's 0-based position in the input
    df = df[has_target].reset_index(drop=True)
    if len(df) < 10: raise ValueError(f"{len(df)} rows have a target; at least 10 are needed")
    y = df[target]
    if y.nunique() < 2:
        raise ValueError(f"the target {user_target!r} has one value ({y.iloc[0]!r}) in all {len(df):,} rows with a "
                         "target: there is nothing to learn; choose a column that varies")
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
    bs_given, epochs_given = bs, epochs
    bs, epochs = fit_size(len(train_idx), bs, epochs)
    n_classes_train = 0 if is_regression else y_raw.iloc[train_idx].nunique()
    if not is_regression and n_classes_train < 2:
        raise ValueError(f"the training rows hold only one class of {user_target!r}; a classification needs two: "
                         "give more rows, or another target")
    return TabularRecipe(df=df, target=target, task='regression' if is_regression else 'classification',
                         names={v: k for k, v in rename.items()}, rows=rows,
                         cat_names=cat_names, cont_names=cont_names, dropped=dropped, notes=notes, target_transform=tt,
                         train_idx=train_idx, valid_idx=valid_idx, y_raw=y_raw, bs=bs, epochs=epochs,
                         bs_given=bs_given, epochs_given=epochs_given, log_target=log_target,
                         n_missing_target=n_rows - len(df))
