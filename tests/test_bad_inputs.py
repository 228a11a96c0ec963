"""Every bad input across fastai_l5, in one place: the exception type and what its message names. Errors are
raised before any work is lost: the model, the dropout p values, the optimizer state and the logs already
collected are checked to be exactly as they were. The documented no-ops (an empty loader, a learner without an
optimizer yet, a NaN loss) are here too."""
import warnings

import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.tracker import TerminateOnNaNCallback
from fastai.learner import Learner, load_learner
from fastai.losses import MSELossFlat
from fastai.torch_core import set_seed
from torch import nn

from fastai_l5.all import *
import helpers

DLS = dict(n_rows=2000, bs=256)


@pytest.fixture(scope='module')
def new_df():
    df, _ = example_df('diamonds', n_rows=300, seed=3)
    return df


def make_learn(dls, cbs=(), opt_func=None):
    return helpers.make_learn(dls, opt_func or sgd_momentum(0.9), cbs, ps=(0.1, 0.1))


@pytest.fixture(scope='module')
def trained(dls):
    "A learner with all three callbacks and one epoch of logs: every error below must leave it as it is."
    learn = make_learn(dls, [MomentumLogger(), DropoutSchedule(early_dropout(0.3)), BNDrift(precise_every=1,
                                                                                           precise_batches=2)])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    return learn


class NoBNNoDropout(nn.Module):
    "A tabular model with neither batch norm nor dropout."
    def __init__(self, n_cont): super().__init__(); self.lin = nn.Linear(n_cont, 1)
    def forward(self, x_cat, x_cont): return self.lin(x_cont)


@pytest.fixture
def plain(dls):
    set_seed(0)
    return Learner(dls, NoBNNoDropout(len(dls.cont_names)), loss_func=MSELossFlat(), opt_func=sgd_momentum(0.9))


def snapshot(learn):
    "Everything an error must not change: weights and buffers, dropout p, optimizer state, logs."
    logs = {n: getattr(learn, n).df.copy() for n in ('momentum_logger', 'dropout_schedule', 'bn_drift') if hasattr(learn, n)}
    opt = None if learn.opt is None else {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                                          for p, st in learn.opt.state.items()}
    return dict(model={k: v.detach().clone() for k, v in learn.model.state_dict().items()},
                ps={n: m.p for n, m in learn.model.named_modules() if isinstance(m, nn.Dropout)},
                opt=opt, logs=logs, cbs=sorted(type(cb).__name__ for cb in learn.cbs))


def assert_untouched(learn, before):
    after = snapshot(learn)
    for k, v in before['model'].items(): assert torch.equal(after['model'][k], v), f"{k} changed"
    assert after['ps'] == before['ps'] and after['cbs'] == before['cbs']
    if before['opt'] is not None:
        assert after['opt'].keys() == before['opt'].keys()
        for pid, st in before['opt'].items():
            for k, v in st.items():
                assert (torch.equal(after['opt'][pid][k], v) if isinstance(v, torch.Tensor) else after['opt'][pid][k] == v)
    for n, df in before['logs'].items(): pd.testing.assert_frame_equal(after['logs'][n], df)


# ---- 1. hyper-parameters, schedules and settings, refused when the object is made

CONSTRUCTOR_CASES = [
    # optim.py
    ('sgd mom=1', lambda: sgd_momentum(mom=1.), ValueError, r'Invalid mom: 1\.0'),
    ('sgd mom<0', lambda: sgd_momentum(mom=-0.1), ValueError, r'Invalid mom: -0\.1'),
    ('sgd mom=nan', lambda: sgd_momentum(mom=float('nan')), ValueError, r'Invalid mom: nan'),
    ('sgd wd<0', lambda: sgd_momentum(wd=-1e-2), ValueError, r'Invalid wd: -0\.01'),
    ('sgd nesterov+dampening', lambda: sgd_momentum(nesterov=True), ValueError, r'nesterov.*dampening'),
    ('sgd debias w/o dampening', lambda: sgd_momentum(debias=True, dampening=False), ValueError, r'debias.*dampening'),
    ('rmsprop sqr_mom=1', lambda: rmsprop(sqr_mom=1.), ValueError, r'Invalid sqr_mom: 1\.0'),
    ('rmsprop eps=0', lambda: rmsprop(eps=0.), ValueError, r'Invalid eps: 0\.0'),
    ('adam eps<0', lambda: adam(eps=-1e-8), ValueError, r'Invalid eps: -1e-08'),
    ('adam sqr_mom<0', lambda: adam(sqr_mom=-0.5), ValueError, r'Invalid sqr_mom: -0\.5'),
    ('opt lr<0', lambda: sgd_momentum()([nn.Parameter(torch.zeros(2))], lr=-0.1), ValueError, r'Invalid lr: -0\.1'),
    ('ewma_weights beta=1', lambda: ewma_weights(1., 5), ValueError, r'Invalid beta: 1\.0'),
    ('ewma_weights n=0', lambda: ewma_weights(0.9, 0), ValueError, r'Invalid n: 0'),
    ('effective_window beta=1', lambda: effective_window(1.), ValueError, r'Invalid beta: 1\.0'),
    ('debias_factor t=0', lambda: debias_factor(0.9, 0), ValueError, r'Invalid t: 0'),
    ('opt_state of an object', lambda: opt_state(object()), TypeError, r'not object'),
    # momentum.py
    ('MomentumLogger every=0', lambda: MomentumLogger(every=0), ValueError, r'Invalid every: 0'),
    ('MomentumLogger every=1.5', lambda: MomentumLogger(every=1.5), ValueError, r'Invalid every: 1\.5'),
    # dropout.py
    ('DropoutSchedule p=1', lambda: DropoutSchedule(1.), ValueError, r'p=1\.0.*\[0, 1\)'),
    ('DropoutSchedule p<0', lambda: DropoutSchedule(-0.1), ValueError, r'p=-0\.1'),
    ('DropoutSchedule sched leaves range', lambda: DropoutSchedule(lambda pct: 0.5 + pct), ValueError, r'at pct=0\.5'),
    ('DropoutSchedule dict entry', lambda: DropoutSchedule({'emb_drop': 2.}), ValueError, r"'emb_drop'.*p=2\.0"),
    ('DropoutSchedule list entry', lambda: DropoutSchedule([0.1, 1.]), ValueError, r'entry 1'),
    ('DropoutSchedule a string', lambda: DropoutSchedule('high'), TypeError, r"'high'"),
    ('DropoutSchedule sched returns text', lambda: DropoutSchedule(lambda pct: 'x'), TypeError, r"returned 'x'"),
    ('early_dropout p=1', lambda: early_dropout(1.), ValueError, r'Invalid p: 1\.0'),
    ('early_dropout until=2', lambda: early_dropout(0.1, until=2.), ValueError, r'Invalid until: 2\.0'),
    ('late_dropout start<0', lambda: late_dropout(0.1, start=-0.5), ValueError, r'Invalid start: -0\.5'),
    ('curriculum_dropout gamma=0', lambda: curriculum_dropout(0.1, gamma=0.), ValueError, r'Invalid gamma: 0\.0'),
    ('fastai_ps n=0', lambda: fastai_ps(0.1, 0), ValueError, r'Invalid n: 0'),
    # batchnorm.py
    ('BNDrift every=0', lambda: BNDrift(every=0), ValueError, r'Invalid every: 0'),
    ('BNDrift precise_every=0', lambda: BNDrift(precise_every=0), ValueError, r'Invalid precise_every: 0'),
    ('BNDrift precise_batches=-1', lambda: BNDrift(precise_batches=-1), ValueError, r'Invalid precise_batches: -1'),
    # data.py
    ('example_df unknown name', lambda: example_df('iris'), ValueError, r"'iris'.*diamonds"),
    ('example_df n_rows=5', lambda: example_df('diamonds', n_rows=5), ValueError, r'n_rows=5'),
    ('example_dls valid_pct=1.5', lambda: example_dls(valid_pct=1.5), ValueError, r'valid_pct=1\.5'),
    # distributed.py
    ('launch_cpu nproc=0', lambda: launch_cpu(__file__, nproc=0), ValueError, r'Invalid nproc: 0'),
    ('launch_cpu missing script', lambda: launch_cpu('no_such_script.py'), FileNotFoundError, r'no_such_script'),
    # files
    ('load_learner missing file', lambda: load_learner('no_such_learner.pkl'), FileNotFoundError, r'no_such_learner'),
]


@pytest.mark.parametrize('call,exc,match', [pytest.param(c, e, m, id=i) for i, c, e, m in CONSTRUCTOR_CASES])
def test_bad_argument(call, exc, match):
    with pytest.raises(exc, match=match): call()


# ---- 2. bad calls on a trained learner: a clear error, and nothing it had is lost or changed

LEARNER_CASES = [
    ('fit lr<0', lambda l, df: l.fit(1, lr=-1.), ValueError, r'Invalid lr: -1\.0'),
    ('fit wd<0', lambda l, df: l.fit(1, 1e-3, wd=-0.1), ValueError, r'Invalid wd: -0\.1'),
    ('precise_bn more batches than the loader', lambda l, df: precise_bn(l, n_batches=10_000), ValueError,
     r'n_batches=10000.*only \d+ batches'),
    ('precise_bn n_batches=0', lambda l, df: precise_bn(l, n_batches=0), ValueError, r'Invalid n_batches: 0'),
    ('precise_bn n_batches=2.5', lambda l, df: l.precise_bn(n_batches=2.5), ValueError, r'Invalid n_batches: 2\.5'),
    ('bn_shift missing column', lambda l, df: bn_shift(l, df.drop(columns='carat')), ValueError, r"lacks.*'carat'"),
    ('bn_shift empty frame', lambda l, df: bn_shift(l, df.iloc[:0]), ValueError, r'no rows'),
    ('bn_shift text in a number column', lambda l, df: bn_shift(l, df.assign(carat='heavy')), ValueError, r'numeric'),
    ('bn_shift not a frame', lambda l, df: bn_shift(l, df.to_numpy()), ValueError, r'DataFrame.*ndarray'),
    ('bn_shift threshold=0', lambda l, df: bn_shift(l, df, threshold=0), ValueError, r'Invalid threshold: 0'),
    ('momentum plot unknown stat', lambda l, df: l.momentum_logger.plot(stats=['speed']), ValueError, r"\['speed'\]"),
    ('momentum plot unknown layer', lambda l, df: l.momentum_logger.plot(layers=['layers.9.0']), ValueError,
     r"\['layers\.9\.0'\].*embeds\.0"),
    ('dropout plot unknown layer', lambda l, df: l.dropout_schedule.plot(layers=['x']), ValueError, r"\['x'\]"),
    ('bn plot unknown stat', lambda l, df: l.bn_drift.plot(stats=['drift']), ValueError, r"\['drift'\]"),
    ('learn.load missing file', lambda l, df: l.load('no_such_checkpoint'), FileNotFoundError, r'no_such_checkpoint'),
]


@pytest.mark.parametrize('call,exc,match', [pytest.param(c, e, m, id=i) for i, c, e, m in LEARNER_CASES])
def test_bad_call_keeps_the_learner(trained, new_df, call, exc, match):
    before = snapshot(trained)
    with trained.no_bar(), trained.no_logging(), pytest.raises(exc, match=match): call(trained, new_df)
    assert_untouched(trained, before)


DROPOUT_FIT_CASES = [
    ('unknown layer name', {'layers.9.3': 0.1}, KeyError, r"'layers\.9\.3'.*\['emb_drop', 'layers\.0\.3', 'layers\.1\.3'\]"),
    ('list of the wrong length', [0.1, 0.2], ValueError, r"2 schedules for 3.*\['emb_drop', 'layers\.0\.3', 'layers\.1\.3'\]"),
]


@pytest.mark.parametrize('scheds,exc,match', [pytest.param(s, e, m, id=i) for i, s, e, m in DROPOUT_FIT_CASES])
def test_dropout_schedule_not_matching_the_model(dls, scheds, exc, match):
    "Checked against the model before the first batch: no weight moves, no p changes."
    learn = make_learn(dls)
    learn.create_opt()
    before = snapshot(learn)
    with pytest.raises(exc, match=match): learn.fit(1, 1e-2, cbs=DropoutSchedule(scheds))
    assert_untouched(learn, before)


def test_optimizer_state_of_another_kind_is_refused(trained, dls, tmp_path):
    "fastai's `load` turns the error into a warning; the optimizer keeps its own state, no partial load."
    trained.save(tmp_path / 'sgd', with_opt=True)
    other = make_learn(dls, opt_func=adam())
    with other.no_bar(), other.no_logging(): other.fit(1, 1e-3)
    before = snapshot(other)['opt']
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        other.load(tmp_path / 'sgd', with_opt=True)
    messages = ' | '.join(str(x.message) for x in w)
    assert 'ForeachSGD' in messages and 'ForeachAdam' in messages and 'with_opt=False' in messages
    after = snapshot(other)['opt']
    assert after.keys() == before.keys()
    for pid, st in before.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor): assert torch.equal(after[pid][k], v)


# ---- 3. a model without batch norm or dropout

def test_model_without_dropout_or_bn(plain, new_df):
    for cb, exc, match in [(DropoutSchedule(0.1), ValueError, r'no dropout module.*tabular_config\(ps='),
                           (BNDrift(), ValueError, r'BatchNorm.*has none')]:
        before = snapshot(plain)
        with pytest.raises(exc, match=match): plain.fit(1, 1e-2, cbs=cb)
        assert_untouched(plain, before)
    with pytest.raises(ValueError, match=r'BatchNorm.*has none'): precise_bn(plain)
    with pytest.raises(ValueError, match=r'bn_cont'): bn_shift(plain, new_df)
    # MomentumLogger needs neither: it logs the one layer
    mom = MomentumLogger()
    with plain.no_bar(), plain.no_logging(): plain.fit(1, 1e-2, cbs=mom)
    assert set(mom.df.layer) == {'lin'}


# ---- 4. a learner whose optimizer is not created yet, an empty loader: documented no-ops

def test_before_the_optimizer_exists(dls):
    cbs = [MomentumLogger(), DropoutSchedule(0.2), BNDrift()]
    learn = make_learn(dls, cbs)
    assert learn.opt is None
    with pytest.raises(ValueError, match=r'no optimizer yet.*create_opt'): opt_state(learn)
    for cb in cbs:
        assert len(cb.df) == 0 and 'layer' in cb.df.columns  # empty, with its columns
        with pytest.raises(ValueError, match='nothing logged yet'): cb.plot()
    with learn.no_bar(): learn.validate()  # validation alone logs nothing and needs no optimizer
    assert all(len(cb.df) == 0 for cb in cbs) and learn.opt is None
    precise_bn(learn, n_batches=2)          # needs no optimizer, and creates none
    assert learn.opt is None


def test_empty_training_loader(dls):
    "Fewer rows than one batch (drop_last): the fit trains nothing and logs nothing; precise_bn refuses."
    tiny = example_dls('diamonds', n_rows=100, bs=128)
    assert len(tiny.train) == 0
    cbs = [MomentumLogger(), DropoutSchedule(0.2), BNDrift()]
    learn = make_learn(tiny, cbs)
    before = snapshot(learn)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert all(len(cb.df) == 0 for cb in cbs)
    assert_untouched(learn, {**before, 'opt': None, 'logs': {}})
    with pytest.raises(ValueError, match=r'only 0 batches'): precise_bn(learn)


# ---- 5. a NaN loss

class NaNLossAt(Callback):
    "Makes the loss of training batch `at` NaN."
    def __init__(self, at): self.at = at
    def before_fit(self): self.seen = 0
    def after_loss(self):
        if not self.training: return
        self.seen += 1
        if self.seen == self.at:
            self.learn.loss_grad = self.learn.loss_grad * float('nan')
            self.learn.loss = self.learn.loss_grad.detach().clone()


def test_nan_loss_is_logged_and_never_crashes(dls):
    """With fastai's TerminateOnNaNCallback the fit stops after the NaN batch: the logs keep every step up to
    it (the NaN step's gradient as NaN), dropout p comes back, and the weights are exactly those of the
    same run without MomentumLogger and BNDrift: they only read."""
    def run(cbs):
        learn = make_learn(dls, cbs + [NaNLossAt(3), TerminateOnNaNCallback()])
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
        return learn
    learn = run([MomentumLogger(), BNDrift(), DropoutSchedule({'layers.0.3': 0.3})])
    bare = run([DropoutSchedule({'layers.0.3': 0.3})])
    for k, v in bare.model.state_dict().items():
        torch.testing.assert_close(learn.model.state_dict()[k], v, rtol=0, atol=0, equal_nan=True)
    mom = learn.momentum_logger.df
    assert sorted(set(mom.step)) == [1, 2, 3]
    assert mom[mom.step < 3].grad_norm.notna().all() and mom[mom.step == 3].grad_norm.isna().all()
    # BNDrift logs in after_batch, which TerminateOnNaN (order 0) cancels for the NaN batch itself
    assert sorted(set(learn.bn_drift.df.step))[:2] == [1, 2] and learn.bn_drift.df.mean_shift.notna().all()
    assert {n: m.p for n, m in learn.model.named_modules() if isinstance(m, nn.Dropout)}['layers.0.3'] == 0.1


# ---- 6. the command line: tests/test_cli.py (in process: one line on stderr, exit status 2, no traceback)
