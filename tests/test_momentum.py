"Tests of `MomentumLogger`: every column against an independent float64 computation from recorded tensors."
import math
import warnings
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
import fastai.callback.schedule  # noqa: F401  (patches fit_one_cycle onto Learner)
from fastai.callback.training import GradientAccumulation
from fastai.learner import load_learner
from fastai.optimizer import SGD, Adam, OptimWrapper, RMSProp
from fastai.torch_core import params, set_seed
from matplotlib.figure import Figure

from fastai_l5.all import *
from helpers import SkipEvery, make_learn

warnings.filterwarnings('ignore', category=UserWarning)

STATS = ['grad_norm', 'mom_norm', 'cos_mom_grad', 'sign_flip', 'update_norm', 'param_norm', 'update_ratio',
         'beta', 'sqr_avg_rms']


DLS = dict(n_rows=3000, bs=256)


def torch_opt(cls, **kw): return partial(OptimWrapper, opt=partial(cls, **kw))


class RecordSteps(Callback):
    """Keeps float64 copies of what each real optimizer step saw: p and g before it, p after it, the first moment
    before (`mp`: what the step carried in, None where the state holds none yet) and after it (`m`), the second
    moment after it (read by the given state names) and β (read from fastai hypers or torch param groups directly)."""
    order = 45

    def __init__(self, first=(), second=()):
        self.first, self.second, self.steps, self.cancelled, self.n = first, second, [], False, 0

    def _stepped(self): return [p for pg in self.learn.opt.param_lists for p in pg if p.grad is not None]

    def _states(self):
        opt = self.learn.opt
        return opt.opt.state if isinstance(opt, OptimWrapper) else opt.state

    def _read(self, p, names):
        st = self._states().get(p, {})
        t = next((st[n] for n in names if isinstance(st.get(n), torch.Tensor)), None)
        return None if t is None else t.detach().double().clone()

    def before_step(self):
        ps = self._stepped()
        self.before = [p.detach().double().clone() for p in ps]
        self.grads = [p.grad.detach().double().clone() for p in ps]
        self.carried = [self._read(p, self.first) for p in ps]

    def after_cancel_step(self): self.cancelled = True

    def after_step(self):
        if self.cancelled: self.cancelled = False; return
        self.n += 1
        opt, ps = self.learn.opt, self._stepped()
        wrapped = isinstance(opt, OptimWrapper)
        owner = {id(p): n for n, m in self.learn.model.named_modules() for p in m.parameters(recurse=False)}
        group = {id(p): i for i, pg in enumerate(opt.param_lists) for p in pg}
        def beta(p):
            if not wrapped: return opt.hypers[group[id(p)]].get('mom', math.nan)
            pg = opt.opt.param_groups[group[id(p)]]
            return pg['betas'][0] if 'betas' in pg else pg.get('momentum', math.nan)
        self.steps.append(dict(
            step=self.n, epoch=self.learn.epoch, layers=[owner[id(p)] for p in ps], g=self.grads, p0=self.before,
            p1=[p.detach().double().clone() for p in ps], beta=[beta(p) for p in ps], mp=self.carried,
            m=[self._read(p, self.first) for p in ps], v=[self._read(p, self.second) for p in ps]))


def expected_df(rec):
    "The logger's columns computed in float64 from the recorded tensors, one row per (step, layer)."
    rows = []
    cat = lambda ts: torch.cat([t.reshape(-1) for t in ts]) if ts else None
    for s in rec.steps:
        for layer in dict.fromkeys(s['layers']):
            i = [k for k, l in enumerate(s['layers']) if l == layer]
            g, dp, p1 = cat([s['g'][k] for k in i]), cat([s['p1'][k] - s['p0'][k] for k in i]), cat([s['p1'][k] for k in i])
            im = [k for k in i if s['m'][k] is not None]
            imp = [k for k in i if s['mp'][k] is not None]
            iv = [k for k in i if s['v'][k] is not None]
            m, v = cat([s['m'][k] for k in im]), cat([s['v'][k] for k in iv])
            # the gradient against the momentum carried in from the steps before (m_{t-1})
            gmp, mp = cat([s['g'][k] for k in imp]), cat([s['mp'][k] for k in imp])
            nan = math.nan
            row = dict(step=s['step'], epoch=s['epoch'], layer=layer, grad_norm=g.norm().item(),
                       mom_norm=m.norm().item() if im else nan,
                       cos_mom_grad=(gmp @ mp / (g.norm() * mp.norm())).item() if imp else nan,
                       sign_flip=(gmp * mp < 0).double().mean().item() if imp else nan,
                       update_norm=dp.norm().item(), param_norm=p1.norm().item(),
                       update_ratio=(dp.norm() / p1.norm()).item(), beta=float(s['beta'][i[0]]),
                       sqr_avg_rms=v.mean().sqrt().item() if iv else nan)
            rows.append(row)
    return pd.DataFrame(rows)


def assert_matches(got, rec, steps=None):
    exp = expected_df(rec)
    if steps is not None: exp = exp[exp.step.isin(steps)].reset_index(drop=True)
    assert len(got) == len(exp) > 0, (len(got), len(exp))
    got = got.reset_index(drop=True)
    assert got.step.tolist() == exp.step.tolist() and got.layer.tolist() == exp.layer.tolist()
    assert got.epoch.tolist() == exp.epoch.tolist()
    for c in STATS:
        np.testing.assert_allclose(got[c].to_numpy(float), exp[c].to_numpy(float), rtol=2e-4, atol=1e-6,
                                   equal_nan=True, err_msg=c)


FAMILIES = {
    'fastai_adam': (Adam, ('grad_avg',), ('sqr_avg',)),
    'fastai_sgd_mom': (partial(SGD, mom=0.9), ('grad_avg',), ()),
    'fastai_sgd_plain': (SGD, ('grad_avg',), ()),
    'fastai_rmsprop': (RMSProp, ('grad_avg',), ('sqr_avg',)),
    'torch_sgd': (torch_opt(torch.optim.SGD, momentum=0.9, weight_decay=1e-3), ('momentum_buffer',), ()),
    'torch_adam': (torch_opt(torch.optim.Adam), ('exp_avg',), ('exp_avg_sq',)),
    'torch_adamw': (torch_opt(torch.optim.AdamW, weight_decay=0.1), ('exp_avg',), ('exp_avg_sq',)),
    'torch_rmsprop_mom': (torch_opt(torch.optim.RMSprop, momentum=0.5, centered=True), ('momentum_buffer',), ('square_avg',)),
    'torch_sgd_plain': (torch_opt(torch.optim.SGD), ('momentum_buffer',), ()),
    'l5_sgd': (sgd_momentum(0.9), ('grad_avg',), ()),
    'l5_heavy_ball': (sgd_momentum(0.9, dampening=False, nesterov=True), ('grad_avg',), ()),
    'l5_rmsprop_mom': (rmsprop(mom=0.5, centered=True), ('grad_avg',), ('sqr_avg',)),
    'l5_adam': (adam(), ('grad_avg',), ('sqr_avg',)),
}


@pytest.mark.parametrize('family', list(FAMILIES))
def test_columns_match_independent_computation(dls, family):
    opt_func, first, second = FAMILIES[family]
    rec = RecordSteps(first, second)
    learn = make_learn(dls, opt_func, cbs=[MomentumLogger(), rec])
    has_first = family not in ('fastai_sgd_plain', 'fastai_rmsprop', 'torch_sgd_plain')
    # fit_one_cycle would give torch's optimizers a momentum through its `mom` schedule
    if family == 'torch_sgd_plain': learn.fit(1, 1e-2)
    else: learn.fit_one_cycle(1, 1e-2)
    df = learn.momentum_logger.df
    assert list(df.columns) == ['step', 'epoch', 'layer'] + STATS
    assert_matches(df, rec)
    assert df.step.min() == 1 and df.step.max() == len(dls.train)
    assert df.mom_norm.notna().all() == has_first and df.mom_norm.isna().all() == (not has_first)
    # step 1 carries no momentum in: nothing to compare its gradient with
    first = df[df.step == 1]
    assert first.cos_mom_grad.isna().all() and first.sign_flip.isna().all()
    assert df[df.step > 1].cos_mom_grad.notna().all() == has_first
    assert df.sqr_avg_rms.notna().all() == bool(second)
    if family in ('fastai_adam', 'torch_adam', 'l5_adam', 'torch_sgd'):
        # fit_one_cycle moves β: the logged β is the scheduled one, 0.95 at the start, lower mid-way
        assert df.beta.iloc[0] == pytest.approx(0.95) and df.beta.min() < 0.9


def test_beta_is_the_one_the_ewma_used(dls):
    "grad_avg_t = β_t·grad_avg_{t-1} + (1-β_t)·g_t, with β_t the logged beta: rebuild the EWMA from the gradients."
    rec = RecordSteps(('grad_avg',), ('sqr_avg',))
    learn = make_learn(dls, Adam, cbs=[MomentumLogger(), rec])
    learn.fit_one_cycle(1, 1e-2)
    df = learn.momentum_logger.df
    m = [torch.zeros_like(g) for g in rec.steps[0]['g']]
    for s in rec.steps:
        beta = df[df.step == s['step']].beta.to_numpy()[0]
        m = [beta * mk + (1 - beta) * g for mk, g in zip(m, s['g'])]
        for mk, got in zip(m, s['m']): torch.testing.assert_close(mk, got, rtol=1e-5, atol=1e-7)
        # and mom_norm of the first layer is the norm of that rebuilt EWMA
        first = [k for k, l in enumerate(s['layers']) if l == s['layers'][0]]
        want = torch.cat([m[k].reshape(-1) for k in first]).norm().item()
        assert df[df.step == s['step']].mom_norm.iloc[0] == pytest.approx(want, rel=1e-4)


def test_every(dls):
    rec = RecordSteps(('grad_avg',), ('sqr_avg',))
    learn = make_learn(dls, cbs=[MomentumLogger(every=3), rec])
    learn.fit(1, 1e-2)
    steps = [s for s in range(1, len(dls.train) + 1) if s % 3 == 0]
    assert sorted(set(learn.momentum_logger.df.step)) == steps
    assert_matches(learn.momentum_logger.df, rec, steps)
    with pytest.raises(ValueError, match='Invalid every: 0'): MomentumLogger(every=0)


def test_history_survives_validate_get_preds_and_counts_across_fits(dls):
    rec = RecordSteps(('grad_avg',), ('sqr_avg',))
    learn = make_learn(dls, cbs=[MomentumLogger(), rec])
    logger, n = learn.momentum_logger, len(dls.train)
    learn.fit(1, 1e-2)
    before, nbytes = logger.df, logger.table.nbytes()
    learn.validate(); learn.get_preds()
    pd.testing.assert_frame_equal(logger.df, before)
    assert len(learn.metrics) == 0  # the epoch columns were taken out again
    learn.fit(2, 1e-3)
    df = logger.df
    assert df.step.max() == 3 * n and sorted(set(df.step)) == list(range(1, 3 * n + 1))
    assert_matches(df, rec)
    # what is kept is a constant number of floats per (step, layer), all of it flushed to the host
    assert len(df) == 3 * len(before) and logger.table.nbytes() <= 3 * nbytes + 1024
    assert len(logger.table) == len(df)
    # the progress table's columns are the epoch means of the logged rows (epochs of the last fit)
    names = learn.recorder.metric_names[1:-1]
    assert 'cos_mom_grad' in names and 'sign_flip' in names
    for epoch, values in enumerate(learn.recorder.values):
        row, rows = dict(zip(names, values)), df[(df.epoch == epoch) & (df.step > n)]
        assert row['cos_mom_grad'] == pytest.approx(rows.cos_mom_grad.mean(), rel=1e-5)
        assert row['sign_flip'] == pytest.approx(rows.sign_flip.mean(), rel=1e-5)


def test_gradient_accumulation_logs_real_steps_only(dls):
    rec = RecordSteps(('grad_avg',), ('sqr_avg',))
    learn = make_learn(dls, cbs=[MomentumLogger(), rec, GradientAccumulation(n_acc=512)])
    learn.fit(1, 1e-2)
    df = learn.momentum_logger.df
    assert df.step.max() == rec.n == len(dls.train) // 2
    assert_matches(df, rec)


def test_skipped_steps_are_not_steps(dls):
    rec = RecordSteps(('grad_avg',), ('sqr_avg',))
    learn = make_learn(dls, cbs=[MomentumLogger(), rec, SkipEvery(3)])
    learn.fit(1, 1e-2)
    n = len(dls.train)
    assert learn.momentum_logger.n_step == rec.n == n - n // 3
    assert_matches(learn.momentum_logger.df, rec)


def test_freeze_unfreeze_clearing_state(dls):
    rec = RecordSteps(('grad_avg',), ('sqr_avg',))
    splitter = lambda m: [params(m.embeds) + params(m.bn_cont), params(m.layers)]
    learn = make_learn(dls, cbs=[MomentumLogger(), rec], splitter=splitter)
    learn.fit(1, 1e-2)
    learn.freeze()  # clears the optimizer state: the EWMA restarts from zero
    learn.fit(1, 1e-2)
    n = len(dls.train)
    restart = learn.momentum_logger.df.query(f'step == {n + 1}')
    # a cleared state carries no momentum in: nothing to compare the gradient with, until the next step
    assert restart.cos_mom_grad.isna().all() and restart.sign_flip.isna().all() and restart.mom_norm.notna().all()
    trained = learn.momentum_logger.df.query(f'step == {n + 2} and layer.str.startswith("layers")')
    assert len(trained) and trained.cos_mom_grad.notna().all()  # (the frozen layers' g and m are 0: NaN)
    learn.unfreeze()
    learn.fit(1, 1e-2)
    assert_matches(learn.momentum_logger.df, rec)


class CancelAt(Callback):
    def __init__(self, at): self.at, self.i = at, 0
    def after_batch(self):
        self.i += 1
        if self.i == self.at: raise CancelFitException()


def test_cancelled_fit_keeps_rows(dls):
    rec = RecordSteps(('grad_avg',), ('sqr_avg',))
    learn = make_learn(dls, cbs=[MomentumLogger(), rec])
    learn.fit(2, 1e-2, cbs=CancelAt(5))
    assert learn.momentum_logger.df.step.max() == 5
    learn.fit(1, 1e-2)
    assert learn.momentum_logger.df.step.max() == 5 + len(dls.train)
    assert_matches(learn.momentum_logger.df, rec)


class Poison(Callback):
    "At batch `at`, after backward: a NaN in `layers.0.0`'s gradient and an inf in `layers.1.0`'s."
    order = 5
    def __init__(self, at): self.at, self.i = at, 0
    def after_backward(self):
        self.i += 1
        if self.i != self.at: return
        self.learn.model.layers[0][0].weight.grad[0, 0] = math.nan
        self.learn.model.layers[1][0].weight.grad[1, 1] = math.inf


def test_nan_and_inf_gradients_are_recorded(dls):
    n = len(dls.train)
    learn = make_learn(dls, partial(SGD, mom=0.9), cbs=[MomentumLogger(), Poison(n)])
    learn.fit(1, 1e-3)
    df = learn.momentum_logger.df.set_index(['step', 'layer'])
    assert np.isnan(df.loc[(n, 'layers.0.0'), 'grad_norm']) and np.isnan(df.loc[(n, 'layers.0.0'), 'cos_mom_grad'])
    assert np.isnan(df.loc[(n, 'layers.0.0'), 'sign_flip']) and np.isnan(df.loc[(n, 'layers.1.0'), 'sign_flip'])
    assert np.isinf(df.loc[(n, 'layers.1.0'), 'grad_norm']) and np.isinf(df.loc[(n, 'layers.1.0'), 'mom_norm'])
    # the other layers of that step are untouched: a NaN or inf stays in its own layer
    others = df.loc[n].drop(index=['layers.0.0', 'layers.1.0'])
    assert len(others) and np.isfinite(others[['grad_norm', 'mom_norm', 'cos_mom_grad', 'sign_flip']]).all().all()
    assert np.isfinite(df.loc[n - 1, 'grad_norm']).all()


def test_export_leaves_history_out(dls, tmp_path):
    learn = make_learn(dls)
    learn.export(tmp_path / 'plain.pkl')
    logger = MomentumLogger()
    learn = make_learn(dls, cbs=[logger])
    learn.fit(2, 1e-2)
    assert len(logger.df) > 150
    learn.export(tmp_path / 'logged.pkl')
    grown = (tmp_path / 'logged.pkl').stat().st_size - (tmp_path / 'plain.pkl').stat().st_size
    assert grown < 10_000, grown
    assert len(logger.df) > 150  # exporting does not wipe the live history
    loaded = load_learner(tmp_path / 'logged.pkl')
    assert len(loaded.momentum_logger.df) == 0 and loaded.momentum_logger.n_step == 2 * len(dls.train)


def test_stream_to_csv(dls, tmp_path):
    path = tmp_path / 'mom.csv'
    learn = make_learn(dls, cbs=[MomentumLogger(every=2, path=path, keep=False)])
    learn.fit(1, 1e-2)
    logger = learn.momentum_logger
    assert logger.table.nbytes() == 0  # nothing kept in memory
    on_disk = pd.read_csv(path)
    assert len(on_disk) == len(logger.df) > 0 and sorted(set(on_disk.step)) == list(range(2, len(dls.train) + 1, 2))
    learn.export(tmp_path / 'e.pkl')
    load_learner(tmp_path / 'e.pkl')
    assert len(pd.read_csv(path)) == len(on_disk)  # loading the export leaves the file alone
    with pytest.raises(ValueError, match='keep=False needs a `path`'): MomentumLogger(keep=False)


def test_plot(dls):
    learn = make_learn(dls, cbs=[MomentumLogger()])
    with pytest.raises(ValueError, match='nothing logged'): learn.momentum_logger.plot()
    learn.fit(1, 1e-2)
    fig = learn.momentum_logger.plot()
    assert isinstance(fig, Figure) and len([a for a in fig.axes if a.get_visible()]) == 6
    assert len(fig.axes[0].lines) == learn.momentum_logger.df.layer.nunique()
    fig = learn.momentum_logger.plot(stats=['cos_mom_grad'], layers=['layers.0.0'])
    assert len(fig.axes[0].lines) == 1
    with pytest.raises(ValueError, match='unknown stats'): learn.momentum_logger.plot(stats=['nope'])
    with pytest.raises(ValueError, match='unknown layers'): learn.momentum_logger.plot(layers=['nope'])


def float64_learner(opt_func, cbs):
    "A float64 regression model on random data: rounding is then ~1e-16, so exact formulas agree to ~1e-12."
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import MSELossFlat
    set_seed(0)
    x = torch.randn(512, 6, dtype=torch.float64)
    y = x @ torch.randn(6, 1, dtype=torch.float64) + 0.1 * torch.randn(512, 1, dtype=torch.float64)
    dls = DataLoaders.from_dsets(list(zip(x[:448], y[:448])), list(zip(x[448:], y[448:])), bs=64, drop_last=True)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)).double()
    return Learner(dls, model, loss_func=MSELossFlat(), opt_func=opt_func, cbs=list(cbs))


@pytest.mark.parametrize('opt_func', [sgd_momentum(0.9), sgd_momentum(0.8, debias=True),
                                      sgd_momentum(0.9, dampening=False), sgd_momentum(0.9, fused=False)],
                         ids=['ewma', 'debias', 'heavy_ball', 'foreach'])
def test_update_norm_from_sgd_state_is_exact(opt_func):
    """With ForeachSGD the logger reads ‖Δp‖ off the momentum (Δp = −lr·m/(1−βᵗ)) instead of copying p: in
    float64 it equals the change measured from copies of p before and after each step, to 1e-12."""
    rec = RecordSteps(('grad_avg',), ())
    learn = float64_learner(opt_func, [MomentumLogger(), rec])
    learn.fit_one_cycle(2, 1e-2)
    got, exp = learn.momentum_logger.df, expected_df(rec)
    assert len(got) == len(exp) == 2 * 7 * 2 and got.step.tolist() == exp.step.tolist()
    for c in ('update_norm', 'update_ratio', 'grad_norm', 'mom_norm', 'cos_mom_grad', 'sign_flip'):
        np.testing.assert_allclose(got[c], exp[c], rtol=1e-12, atol=0, err_msg=c)


@pytest.mark.parametrize('opt_func', [sgd_momentum(0.9, wd=0.1), sgd_momentum(0.9, dampening=False, nesterov=True), adam()],
                         ids=['decay', 'nesterov', 'adam'])
def test_update_norm_measured_where_state_does_not_give_it(opt_func):
    "Weight decay, Nesterov and Adam's steps are not −c·m: the logger measures Δp from a copy of p, exactly."
    rec = RecordSteps(('grad_avg',), ('sqr_avg',))
    learn = float64_learner(opt_func, [MomentumLogger(), rec])
    learn.fit_one_cycle(1, 1e-2)
    got, exp = learn.momentum_logger.df, expected_df(rec)
    np.testing.assert_allclose(got.update_norm, exp.update_norm, rtol=1e-12, atol=0)


def one_batch_learner(opt_func, cbs):
    """A bias-free float64 `Linear(2, 1)` from w = 0 on one batch of 4 rows, fit with MSE in float64 (fastai's
    `MSELossFlat` computes in float32): each epoch is one step."""
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    x = torch.tensor([[1., 0.], [0., 1.], [1., 1.], [2., -1.]], dtype=torch.float64)
    y = torch.tensor([[1.], [-2.], [-1.], [4.]], dtype=torch.float64)
    dls = DataLoaders.from_dsets(list(zip(x, y)), list(zip(x, y)), bs=4, shuffle=False, drop_last=False)
    model = torch.nn.Linear(2, 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    mse = lambda pred, targ: ((pred - targ) ** 2).mean().float()  # float32 only for the Recorder's running mean
    return Learner(dls, model, loss_func=mse, opt_func=opt_func, cbs=list(cbs)), x, y


@pytest.mark.parametrize('opt_func', [sgd_momentum(0.9, dampening=False),
                                      torch_opt(torch.optim.SGD, momentum=0.9)], ids=['l5', 'torch'])
def test_heavy_ball_by_hand(opt_func):
    """Three heavy-ball steps worked by hand: g_t = (2/N)·Xᵀ(Xw − y), m_t = β·m_{t−1} + g_t, w ← w − lr·m_t. The
    logged cosine and sign flips compare g_t with m_{t−1} (none at step 1), `mom_norm` is ‖m_t‖."""
    lr, beta = 0.2, 0.9
    learn, x, y = one_batch_learner(opt_func, [MomentumLogger()])
    learn.fit(3, lr)
    df = learn.momentum_logger.df
    assert df.step.tolist() == [1, 2, 3] and (df.layer == '').all()
    w, m, want = torch.zeros(2, dtype=torch.float64), None, []
    for t in range(3):
        g = 2 / len(x) * x.T @ (x @ w - y[:, 0])
        cos = math.nan if m is None else float(g @ m / (g.norm() * m.norm()))
        flip = math.nan if m is None else float((g * m < 0).double().mean())
        m = g.clone() if m is None else beta * m + g
        w = w - lr * m
        want.append(dict(grad_norm=float(g.norm()), mom_norm=float(m.norm()), cos_mom_grad=cos, sign_flip=flip))
    want = pd.DataFrame(want)
    for c in want.columns:
        np.testing.assert_allclose(df[c].to_numpy(float), want[c].to_numpy(float), rtol=1e-10, equal_nan=True, err_msg=c)
    # the lr overshoots here: at step 3 one weight's gradient has turned against the momentum it carries in
    assert want.sign_flip.tolist()[1:] == [0., 0.5] and want.cos_mom_grad.iloc[1] > 0.9 > 0 > want.cos_mom_grad.iloc[2]
    np.testing.assert_allclose(learn.model.weight.detach()[0].numpy(), w.numpy(), rtol=1e-12)
