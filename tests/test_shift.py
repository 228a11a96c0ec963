"""cat_shift and shift_table: a same-distribution sample is not flagged, a changed level mix names its feature with
the test that fired and the levels that moved, unseen levels are listed, and the Bonferroni rule spans every test."""
import functools

import numpy as np
import pytest
import torch
from fastai.tabular.all import tabular_learner
from fastai.torch_core import set_seed
from scipy import stats

import fastai_l5.all as l5
from fastai_l5.all import cat_shift, diagnose, example_df, example_dls, shift_table
from fastai_l5.shift import SHIFT_ALPHA


@functools.cache
def learner():
    torch.set_num_threads(1)
    set_seed(0)
    learn = tabular_learner(example_dls('diamonds', n_rows=3000, bs=128), layers=[32], y_range=(5.5, 10.))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 3e-3)
    return learn


def new_rows(n, seed=7):
    df, _ = example_df('diamonds', n_rows=20000, seed=seed)
    return df.sample(n, random_state=seed).reset_index(drop=True)


def test_same_distribution_is_not_flagged():
    learn = learner()
    flagged = sum(bool(shift_table(learn, new_rows(400, seed=s))['shifted'].any()) for s in range(6))
    assert flagged <= 1


def test_changed_mix_names_the_feature_with_its_test_and_levels():
    learn = learner()
    df = new_rows(4000)
    w = np.where(df['cut'] == 'Ideal', 0.3, 1.5)          # Ideal loses most of its share
    small = df.sample(600, weights=w, random_state=0)
    t = cat_shift(learn, small).set_index('feature')
    assert t.loc['cut', 'shifted'] and t.loc['cut', 'test'] == 'chi2' and 'Ideal' in t.loc['cut', 'moved']
    big = df.sample(3000, weights=w, replace=True, random_state=0)
    t = cat_shift(learn, big).set_index('feature')
    assert t.loc['cut', 'test'] == 'js' and t.loc['cut', 'js'] >= 0.1 and t.loc['cut', 'shifted']
    f = diagnose(learn, small)
    hit = f[(f['kind'] == 'data_shift') & (f['where'] == 'cut')]
    assert len(hit) and hit['severity'].iloc[0] == 'warn' and 'chi-squared' in hit['evidence'].iloc[0]
    assert 'Ideal' in hit['evidence'].iloc[0]
    # the labels are in the new rows: the measured effect is the loss there against the validation loss
    assert hit['effect'].iloc[0].startswith('loss valid -> new data')


def test_unseen_levels_are_listed():
    df = new_rows(500).copy()
    df.loc[:99, 'color'] = 'Z'
    t = cat_shift(learner(), df).set_index('feature')
    assert 'Z (100)' in t.loc['color', 'unseen'] and t.loc['color', 'shifted']


def test_one_bonferroni_rule_over_all_features():
    learn = learner()
    df = new_rows(300)
    m = 2 * len(learn.dls.cont_names) + len(learn.dls.cat_names)
    z = stats.norm.isf(SHIFT_ALPHA / m / 2)
    t = shift_table(learn, df.assign(carat=df['carat'] + df['carat'].std())).set_index('feature')
    assert t.loc['carat', 'shifted'] and t.loc['carat', 'test'] == 'mean z' and f'{z:.2f}' in t.loc['carat', 'evidence']


def test_bad_input_and_export():
    with pytest.raises(ValueError, match='DataFrame'): cat_shift(learner(), [1, 2])
    with pytest.raises(ValueError, match='no rows'): cat_shift(learner(), new_rows(10).iloc[:0])
    assert 'cat_shift' in l5.__dict__ and 'shift_table' in l5.__dict__
