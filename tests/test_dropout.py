import math
from functools import partial

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.schedule import ParamScheduler, SchedCos, SchedLin, SchedNo, combine_scheds
from fastai.learner import Learner, load_learner
from fastcore.test import test_close as close_enough
from matplotlib.figure import Figure
from torch import nn

from fastai_l5.all import *
import helpers


DLS = dict(n_rows=1500, bs=256)  # 4 training batches an epoch


ORIGINAL = {'emb_drop': 0.05, 'layers.0.3': 0.1, 'layers.1.3': 0.2}


# three dropout layers: emb_drop (0.05), layers.0.3 (0.1), layers.1.3 (0.2)
make_learn = partial(helpers.make_learn, ps=(0.1, 0.2), embed_p=0.05)


def current_ps(learn): return {n: m.p for n, m in dropout_layers(learn.model).items()}


class PRecorder(Callback):
    "Reads every dropout module's p from outside, after DropoutSchedule has run, in every batch."
    order = DropoutSchedule.order + 1

    def __init__(self): self.rows = []
    def before_batch(self):
        self.rows.append(dict(training=self.learn.training, pct=self.learn.pct_train, epoch=self.learn.epoch,
                              ps=current_ps(self.learn)))
    def train_rows(self): return [r for r in self.rows if r['training']]


class RaiseAt(Callback):
    "Raises `exc` in the training batch number `at` of the fit."
    def __init__(self, exc, at=3): self.exc, self.at, self.seen = exc, at, 0
    def before_fit(self): self.seen = 0
    def after_pred(self):
        if not self.learn.training: return
        self.seen += 1
        if self.seen == self.at: raise self.exc


MIXED = {'emb_drop': SchedLin(0.3, 0.),
         'layers.0.3': early_dropout(0.4, until=0.5),
         'layers.1.3': combine_scheds([0.5, 0.5], [SchedCos(0., 0.5), SchedNo(0.5, 0.5)])}


def test_applied_p_is_the_schedule_at_pct_seen_from_outside(dls):
    rec = PRecorder()
    learn = make_learn(dls, cbs=[DropoutSchedule(MIXED), rec])
    assert current_ps(learn) == ORIGINAL
    learn.fit(2, 1e-3)
    train = rec.train_rows()
    assert len(train) == 2 * len(dls.train)
    for r in train:
        for name, f in MIXED.items(): close_enough(r['ps'][name], float(f(r['pct'])), eps=1e-6)
    # the schedules really move: early dropout is on at the start and off at the end
    assert train[0]['ps']['layers.0.3'] == 0.4 and train[-1]['ps']['layers.0.3'] == 0.
    # validation batches see the model's own p; and the model gets its p back after the fit
    assert all(r['ps'] == ORIGINAL for r in rec.rows if not r['training'])
    assert any(not r['training'] for r in rec.rows)
    assert current_ps(learn) == ORIGINAL
    # the log holds what the recorder saw: one row per (training batch, dropout layer)
    df = learn.dropout_schedule.df
    assert list(df.columns) == ['step', 'epoch', 'pct', 'layer', 'p'] and len(df) == 3 * len(train)
    seen = np.array([[r['ps'][n] for n in ORIGINAL] for r in train])
    close_enough(df['p'].to_numpy().reshape(-1, 3), seen)
    close_enough(df['pct'].to_numpy()[::3], [r['pct'] for r in train])
    assert list(df['layer'][:3]) == list(ORIGINAL) and list(df['epoch'][::3]) == [r['epoch'] for r in train]
    assert list(df['step'][::3]) == list(range(1, len(train) + 1))


@pytest.mark.parametrize('scheds, expect', [
    (0.3, lambda pct: [0.3, 0.3, 0.3]),
    (late_dropout(0.25, start=0.5), lambda pct: [0.25 * (pct >= .5)] * 3),
    ([0., 0.1, curriculum_dropout(0.5)], lambda pct: [0., 0.1, 0.5 * (1 - math.exp(-10 * pct))]),
    ({'layers.1.3': 0.45}, lambda pct: [0.05, 0.1, 0.45]),  # layers not named keep their p
])
def test_number_callable_list_and_dict(dls, scheds, expect):
    rec = PRecorder()
    learn = make_learn(dls, cbs=[DropoutSchedule(scheds), rec])
    learn.fit(1, 1e-3)
    for r in rec.train_rows(): close_enough(list(r['ps'].values()), expect(r['pct']), eps=1e-6)
    assert current_ps(learn) == ORIGINAL


def test_preset_formulas():
    pcts = np.linspace(0, 1, 101)
    for pct in pcts:
        assert early_dropout(0.3)(pct) == (0.3 if pct < 0.2 else 0.)
        close_enough(early_dropout(0.3, until=0.4, linear=True)(pct), 0.3 * (1 - pct / 0.4) if pct < 0.4 else 0.)
        assert late_dropout(0.3, start=0.6)(pct) == (0.3 if pct >= 0.6 else 0.)
        close_enough(curriculum_dropout(0.3, gamma=5.)(pct), 0.3 * (1 - math.exp(-5. * pct)))
    # curriculum dropout is Morerio et al.'s retain probability θ(t) = (1−θ̄)e^(−γt) + θ̄ with θ̄ = 1 − p
    theta_bar, gamma = 0.7, 10.
    for pct in pcts: close_enough(1 - curriculum_dropout(0.3, gamma)(pct), (1 - theta_bar) * math.exp(-gamma * pct) + theta_bar)
    assert fastai_ps(0.4, 3) == [0.2, 0.2, 0.4] and fastai_ps(0.5, 1) == [0.5]
    half, full = fastai_ps(early_dropout(0.4), 2)
    assert half(0.1) == 0.2 and full(0.1) == 0.4 and half(0.9) == 0.
    # presets check their own arguments
    with pytest.raises(ValueError, match='Invalid p: 1.2'): early_dropout(1.2)
    with pytest.raises(ValueError, match='until'): early_dropout(0.3, until=1.5)
    with pytest.raises(ValueError, match='start'): late_dropout(0.3, start=-0.1)
    with pytest.raises(ValueError, match='gamma'): curriculum_dropout(0.3, gamma=0)
    with pytest.raises(ValueError, match='Invalid n: 0'): fastai_ps(0.3, 0)


def test_presets_survive_pickling():
    import pickle
    f = pickle.loads(pickle.dumps(curriculum_dropout(0.3)))
    close_enough(f(0.5), 0.3 * (1 - math.exp(-5)))


class CountBatches(Callback):
    def __init__(self): self.n = 0
    def before_batch(self): self.n += 1


def _raises_before_any_batch(learn, exc, match):
    counter = CountBatches()
    learn.add_cb(counter)
    w = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(exc, match=match): learn.fit(1, 1e-2)
    assert counter.n == 0 and all(torch.equal(a, b) for a, b in zip(w, learn.model.parameters()))
    assert current_ps(learn) == ORIGINAL or not dropout_layers(learn.model)


def test_bad_inputs_raise_before_the_first_batch(dls):
    names = r"\['emb_drop', 'layers.0.3', 'layers.1.3'\]"
    _raises_before_any_batch(make_learn(dls, cbs=DropoutSchedule({'layers.0.2': 0.1})), KeyError, names)
    _raises_before_any_batch(make_learn(dls, cbs=DropoutSchedule({'layers.0.2': 0.1})), KeyError, r"tabular_config\(ps=")
    _raises_before_any_batch(make_learn(dls, cbs=DropoutSchedule([0.1, 0.2])), ValueError, '2 schedules for 3 dropout layers.*' + names)
    # a schedule that only leaves [0, 1) somewhere inside the fit, named by layer and pct
    spike = lambda pct: 1.5 if abs(pct - 0.37) < 1e-9 else 0.1
    sched = DropoutSchedule(0.1)
    sched.scheds = {'layers.1.3': spike}  # past the constructor's check: before_fit checks at this fit's pcts too
    _raises_before_any_batch(make_learn(dls, cbs=sched), ValueError, r"layer 'layers.1.3' gives p=1.5 at pct=0.37")
    # a model with no dropout module at all
    plain = Learner(dls, nn.Sequential(nn.Linear(1, 1)), loss_func=nn.MSELoss(), cbs=DropoutSchedule(0.1))
    with pytest.raises(ValueError, match=r"no dropout module.*tabular_config\(ps="): plain.fit(1)


def test_bad_inputs_raise_when_built():
    with pytest.raises(ValueError, match=r"gives p=1.0 at pct=1"): DropoutSchedule(SchedLin(0.5, 1.))
    with pytest.raises(ValueError, match=r"layer 'emb_drop' gives p=-0.1"): DropoutSchedule({'emb_drop': -0.1})
    with pytest.raises(ValueError, match=r"entry 1 of the list gives p=1"): DropoutSchedule([0.1, 1])
    with pytest.raises(TypeError, match='must be a number'): DropoutSchedule('0.1')
    with pytest.raises(TypeError, match="returned None"): DropoutSchedule(lambda pct: None)
    with pytest.raises(TypeError, match="give a number in"): DropoutSchedule({'emb_drop': 'high'})


@pytest.mark.parametrize('how', ['attached', 'fit_cbs'])
@pytest.mark.parametrize('exc', [RuntimeError('boom'), KeyboardInterrupt()])
def test_p_restored_after_a_fit_that_raised(dls, how, exc):
    sched, rec = DropoutSchedule(0.45), PRecorder()
    learn = make_learn(dls, cbs=[sched, rec] if how == 'attached' else [rec])
    with pytest.raises(type(exc)):
        learn.fit(2, 1e-3, cbs=[RaiseAt(exc, at=3)] + ([sched] if how == 'fit_cbs' else []))
    assert rec.train_rows()[-1]['ps'] == {n: 0.45 for n in ORIGINAL}  # it was applied when the error hit
    assert current_ps(learn) == ORIGINAL
    assert len(sched.df) == 3 * 3
    learn.fit(1, 1e-3, cbs=[] if how == 'attached' else [sched])  # the next fit starts clean
    assert current_ps(learn) == ORIGINAL and len(sched.df) == 3 * (3 + len(dls.train))


def test_p_restored_after_a_cancelled_fit(dls):
    learn = make_learn(dls, cbs=[DropoutSchedule(0.45), RaiseAt(CancelFitException(), at=2)])
    learn.fit(2, 1e-3)
    assert current_ps(learn) == ORIGINAL and len(learn.dropout_schedule.df) == 3 * 2


def test_several_fits_one_cycle_fine_tune_with_param_scheduler(dls):
    rec = PRecorder()
    learn = make_learn(dls, cbs=[DropoutSchedule({'layers.1.3': SchedLin(0.4, 0.), 'emb_drop': late_dropout(0.2)}), rec])
    n = len(dls.train)
    learn.fit(1, 1e-3)
    learn.fit_one_cycle(2, 1e-3)
    moms = learn.recorder.hps['mom']  # ParamScheduler still did its work alongside
    assert min(moms) < 0.9 < max(moms) and len(moms) == 2 * n
    learn.fit(1, 1e-3, cbs=ParamScheduler({'lr': SchedCos(1e-3, 1e-4)}))
    learn.fine_tune(1, 1e-3)  # two fits: one frozen epoch, one unfrozen
    n_batches = n * (1 + 2 + 1 + 1 + 1)
    df, train = learn.dropout_schedule.df, rec.train_rows()
    assert len(train) == n_batches and len(df) == 3 * n_batches
    assert list(df['step'][::3]) == list(range(1, n_batches + 1))  # steps keep counting across fits
    for r in train:
        close_enough(r['ps']['layers.1.3'], 0.4 * (1 - r['pct']), eps=1e-6)
        assert r['ps']['emb_drop'] == (0.2 if r['pct'] >= 0.5 else 0.) and r['ps']['layers.0.3'] == 0.1
    assert sum(r['pct'] == 0 for r in train) == 5  # pct starts again with every fit
    assert current_ps(learn) == ORIGINAL


def test_validate_get_preds_keep_log_and_p(dls):
    learn = make_learn(dls, cbs=DropoutSchedule(0.3))
    learn.fit(1, 1e-3)
    df = learn.dropout_schedule.df
    assert len(learn.validate()) == 1  # no extra column outside fit
    learn.get_preds()
    assert learn.dropout_schedule.df.equals(df) and current_ps(learn) == ORIGINAL


def test_epoch_column_is_mean_applied_p(dls):
    learn = make_learn(dls, cbs=DropoutSchedule({'layers.0.3': SchedLin(0.4, 0.)}))
    learn.fit(2, 1e-3)
    assert 'dropout_p' in learn.recorder.metric_names
    means = learn.dropout_schedule.df.groupby('epoch')['p'].mean().to_numpy()
    close_enough([v[-1] for v in learn.recorder.values], means)
    assert means[0] > means[1]
    assert not any(getattr(m, 'name', '') == 'dropout_p' for m in learn.metrics)


def test_export_sees_original_p_and_leaves_log_out(dls, tmp_path):
    learn = make_learn(dls, cbs=DropoutSchedule(early_dropout(0.4, linear=True)))
    learn.path = tmp_path
    with pytest.raises(RuntimeError): learn.fit(1, 1e-3, cbs=RaiseAt(RuntimeError('stop'), at=2))
    learn.export('raised.pkl')  # straight after the failed fit
    assert current_ps(load_learner(tmp_path / 'raised.pkl')) == ORIGINAL
    learn.fit(1, 1e-3)
    assert len(learn.dropout_schedule.df) > 0
    learn.export('model.pkl')
    loaded = load_learner(tmp_path / 'model.pkl')
    assert current_ps(loaded) == ORIGINAL
    assert len(loaded.dropout_schedule.df) == 0  # the log is not pickled
    new_rows = loaded.dls.test_dl(example_df('diamonds', n_rows=50)[0])
    loaded.get_preds(dl=new_rows)  # get_preds fires before_fit/after_fit on the loaded callback: still fine
    assert current_ps(loaded) == ORIGINAL and len(loaded.dropout_schedule.df) == 0
    assert len(learn.dropout_schedule.df) > 0


def test_plot(dls):
    learn = make_learn(dls, cbs=DropoutSchedule(MIXED))
    with pytest.raises(ValueError, match='nothing logged'): learn.dropout_schedule.plot()
    learn.fit(1, 1e-3)
    fig = learn.dropout_schedule.plot()
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 3
    assert len(learn.dropout_schedule.plot(layers=['emb_drop'], x='pct').axes[0].lines) == 1


def test_other_ranks_set_p_but_keep_no_log(dls, monkeypatch):
    import fastai_l5.core as core  # the one place the rank-0 decision is taken
    monkeypatch.setattr(core, 'rank_distrib', lambda: 1)
    rec = PRecorder()
    learn = make_learn(dls, cbs=[DropoutSchedule(0.35), rec])
    learn.fit(1, 1e-3)
    assert all(set(r['ps'].values()) == {0.35} for r in rec.train_rows())
    assert len(learn.dropout_schedule.df) == 0 and current_ps(learn) == ORIGINAL


def test_log_streams_to_csv_and_survives_a_crash(dls, tmp_path):
    import pandas as pd
    path = tmp_path / 'dropout.csv'
    sched = DropoutSchedule({'layers.0.3': late_dropout(0.3)}, path=path, keep=False)
    learn = make_learn(dls, cbs=sched)
    learn.path = tmp_path
    learn.fit(2, 1e-3)
    on_disk = pd.read_csv(path)
    assert len(on_disk) == 3 * 2 * len(dls.train) and sched.table.nbytes() == 0
    assert on_disk.equals(sched.df) and set(on_disk.layer) == set(ORIGINAL)
    with pytest.raises(RuntimeError): learn.fit(1, 1e-3, cbs=RaiseAt(RuntimeError('crash'), at=2))
    assert len(pd.read_csv(path)) == 3 * (2 * len(dls.train) + 2)  # the crashed fit's batches are on disk
    learn.export('model.pkl')
    assert len(load_learner(tmp_path / 'model.pkl').dropout_schedule.df) == 0
    assert len(pd.read_csv(path)) == 3 * (2 * len(dls.train) + 2)  # loading the export left the file alone
