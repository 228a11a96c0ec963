"Tests for fastai_l5.optim: exactness against torch.optim and closed forms, fastai integration, state tables, errors."
import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
import fastai.callback.all  # noqa: F401  (fit_one_cycle, no_bar)
from fastai.learner import Learner, load_learner
from fastai.losses import MSELossFlat
from fastai.optimizer import SGD, Adam, OptimWrapper, RMSProp
from fastai.torch_core import params
from fastcore.xtras import even_mults
from torch import nn

from fastai_l5.core import param_layer_names
from fastai_l5.optim import *
import helpers

N_STEPS = 200


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "These models are tiny: one intra-op thread is faster, and immune to a busy machine's thread contention."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------
# A small regression problem with three param groups (discriminative lrs through `slice`)

def make_model(n_hidden=3, width=16, seed=0):
    """Linear-BatchNorm-ReLU blocks and a linear head. The Linear layers before a BatchNorm have no bias, as in fastai's
    `LinBnDrop`: BatchNorm removes any bias, so its gradient would be rounding noise, and RMSProp and Adam, which
    step about lr·sign(g) on such a gradient, would turn last-bit differences between exact implementations into
    differences of lr per step."""
    torch.manual_seed(seed)
    layers, n_in = [], 6
    for _ in range(n_hidden): layers += [nn.Linear(n_in, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]; n_in = width
    return nn.Sequential(*layers, nn.Linear(n_in, 1))


def groups_of(model):
    "Three param groups: first block, middle blocks, head."
    mods = list(model.children())
    return [params(nn.Sequential(*mods[:3])), params(nn.Sequential(*mods[3:-1])), params(mods[-1])]


def batch(t):
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(32, 6, generator=g)
    return x, (x[:, :1] * 2 - x[:, 1:2] + 0.1 * torch.randn(32, 1, generator=g))


def train(model, opt, n_steps=N_STEPS, on_step=None):
    model.train()
    for t in range(n_steps):
        x, y = batch(t)
        nn.functional.mse_loss(model(x), y).backward()
        if on_step: on_step(t)
        opt.step(); opt.zero_grad()
    return model


def flat(model): return torch.cat([p.detach().flatten() for p in model.parameters()])


def assert_rel_close(a, b, rtol=1e-5):
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    rel = ((a - b).norm() / b.norm()).item()
    assert rel <= rtol, f"relative difference {rel:.3g} > {rtol}"
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


LR = slice(1e-3, 3e-2)
LRS = even_mults(LR.start, LR.stop, 3)


def ours_vs_torch(opt_func, torch_cls, lr=LR, **torch_kw):
    "Train the same model with `opt_func` over 3 groups (lr slice) and with `torch_cls` over the same groups."
    m1, m2 = make_model(), make_model()
    o1 = opt_func(groups_of(m1), lr=lr)
    lrs = even_mults(lr.start, lr.stop, 3)
    o2 = torch_cls([{'params': g, 'lr': l} for g, l in zip(groups_of(m2), lrs)], foreach=True, **torch_kw)
    return train(m1, o1), train(m2, o2), o1, o2


# ---------------------------------------------------------------------------------------------------
# Exactness against torch.optim

# Every exactness test runs both step paths: torch's fused kernels (the default) and `_foreach_*` kernels only.
FUSED = pytest.mark.parametrize('fused', [True, False], ids=['fused', 'foreach'])


@FUSED
@pytest.mark.parametrize('wd', [0., 1e-2])
@pytest.mark.parametrize('nesterov', [False, True])
def test_heavy_ball_equals_torch_sgd(wd, nesterov, fused):
    m1, m2, o1, o2 = ours_vs_torch(sgd_momentum(0.9, dampening=False, nesterov=nesterov, wd=wd, decouple_wd=False,
                                                fused=fused),
                                   torch.optim.SGD, momentum=0.9, nesterov=nesterov, weight_decay=wd)
    assert_rel_close(flat(m1), flat(m2))
    p = next(m1.parameters()); q = next(m2.parameters())
    assert_rel_close(o1.state[p]['grad_avg'], o2.state[q]['momentum_buffer'])
    assert o1.state[p]['step'] == N_STEPS


@pytest.mark.parametrize('wd', [0., 1e-2])
@pytest.mark.parametrize('mom,centered', [(0., False), (0., True), (0.9, False), (0.9, True)])
@FUSED
def test_rmsprop_equals_torch(wd, mom, centered, fused):
    m1, m2, o1, o2 = ours_vs_torch(rmsprop(0.99, mom=mom, eps=1e-8, centered=centered, wd=wd, decouple_wd=False,
                                           fused=fused),
                                   torch.optim.RMSprop, lr=slice(1e-4, 3e-3), alpha=0.99, eps=1e-8,
                                   momentum=mom, centered=centered, weight_decay=wd)
    assert_rel_close(flat(m1), flat(m2))
    p = next(m1.parameters()); q = next(m2.parameters())
    assert_rel_close(o1.state[p]['sqr_avg'], o2.state[q]['square_avg'])
    assert ('grad_avg' in o1.state[p]) == (mom > 0) and ('grad_mean' in o1.state[p]) == centered


@pytest.mark.parametrize('wd', [0., 1e-2])
@pytest.mark.parametrize('decouple_wd', [True, False])
@FUSED
def test_adam_equals_torch(wd, decouple_wd, fused):
    ref = torch.optim.AdamW if decouple_wd else torch.optim.Adam
    m1, m2, o1, o2 = ours_vs_torch(adam(0.9, 0.99, eps=1e-5, wd=wd, decouple_wd=decouple_wd, fused=fused), ref,
                                   lr=slice(1e-4, 3e-3), betas=(0.9, 0.99), eps=1e-5, weight_decay=wd)
    assert_rel_close(flat(m1), flat(m2))
    p = next(m1.parameters()); q = next(m2.parameters())
    assert_rel_close(o1.state[p]['grad_avg'], o2.state[q]['exp_avg'])
    assert_rel_close(o1.state[p]['sqr_avg'], o2.state[q]['exp_avg_sq'])


def test_comparison_has_teeth():
    "A small change of one hyper-parameter is far outside the tolerance the tests above use."
    m1, m2, *_ = ours_vs_torch(adam(0.9, 0.99, eps=1e-5, wd=1e-2), torch.optim.AdamW,
                               lr=slice(1e-4, 3e-3), betas=(0.9, 0.99), eps=1e-5, weight_decay=2e-2)
    with pytest.raises(AssertionError): assert_rel_close(flat(m1), flat(m2))


# ---------------------------------------------------------------------------------------------------
# Exactness against the closed form, in float64

@pytest.mark.parametrize('wd', [0., 0.1])
@pytest.mark.parametrize('dampening,debias', [(True, False), (True, True), (False, False)])
@FUSED
def test_momentum_equals_closed_form(wd, dampening, debias, fused):
    """Replay the gradients our run saw through the unrolled sums in float64:
    EWMA S(t) = Σₖ (1−β)βᵏ g(t−k) (÷ (1−βᵗ) with debias), heavy ball Σₖ βᵏ g(t−k)."""
    beta, model = 0.9, make_model()
    ps = list(model.parameters())
    opt = sgd_momentum(beta, dampening=dampening, debias=debias, wd=wd, fused=fused)(groups_of(model), lr=LR)
    lr_of = {id(p): lr for g, lr in zip(groups_of(model), LRS) for p in g}
    p0 = [p.detach().double().clone() for p in ps]
    hist = [[] for _ in ps]
    train(model, opt, on_step=lambda t: [h.append(p.grad.detach().double().flatten().clone()) for h, p in zip(hist, ps)])
    refs, avgs = [], []
    for p, start, h in zip(ps, p0, hist):
        G, ref = torch.stack(h), start.flatten().clone()   # G[t-1] = g(t)
        lr = lr_of[id(p)]
        for t in range(1, N_STEPS + 1):
            w = ewma_weights(beta, t) if dampening else beta ** torch.arange(t, dtype=torch.float64)
            S = w @ G[:t].flip(0)
            if debias: S = S / debias_factor(beta, t)
            ref = ref * (1 - lr * wd) - lr * S
        refs.append(ref); avgs.append(w @ G.flip(0))
    assert_rel_close(flat(model), torch.cat(refs))
    assert_rel_close(torch.cat([opt.state[p]['grad_avg'].flatten() for p in ps]), torch.cat(avgs))


def test_scheduled_mom_uses_each_steps_beta():
    "With `mom` changed every step (as `ParamScheduler` does), grad_avg follows S(t) = β_t S(t−1) + (1−β_t) g(t)."
    model = make_model(); ps = list(model.parameters())
    opt = sgd_momentum(0.9)(ps, lr=1e-2)
    betas = [0.95 - 0.1 * math.sin(math.pi * t / N_STEPS) for t in range(N_STEPS)]
    S = [torch.zeros_like(p, dtype=torch.float64) for p in ps]
    S_fixed = [torch.zeros_like(p, dtype=torch.float64) for p in ps]
    def on_step(t):
        opt.set_hyper('mom', betas[t])
        for s, p in zip(S, ps): s.mul_(betas[t]).add_(p.grad.double(), alpha=1 - betas[t])
        for s, p in zip(S_fixed, ps): s.mul_(0.9).add_(p.grad.double(), alpha=0.1)
    train(model, opt, on_step=on_step)
    ours = torch.cat([opt.state[p]['grad_avg'].flatten() for p in ps])
    assert_rel_close(ours, torch.cat([s.flatten() for s in S]))
    with pytest.raises(AssertionError):  # the EWMA with a fixed β is a different average
        assert_rel_close(ours, torch.cat([s.flatten() for s in S_fixed]))


# ---------------------------------------------------------------------------------------------------
# Multi-tensor step

def count_kernels(monkeypatch):
    "Record the name of every multi-tensor kernel (`torch._foreach_*`, `torch._fused_*`) called from now on."
    calls = []
    for name in [n for n in dir(torch) if n.startswith(('_foreach_', '_fused_'))]:
        f = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _f=f, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    return calls


@pytest.mark.parametrize('opt_func,fused_kernel', [
    (sgd_momentum(0.9, wd=0.1), '_fused_sgd_'), (sgd_momentum(0.9, dampening=False, nesterov=True), '_fused_sgd_'),
    (rmsprop(wd=0.1, decouple_wd=False), '_fused_adam_'), (rmsprop(mom=0.9, centered=True, wd=0.1), None),
    (adam(), '_fused_adamw_'), (adam(decouple_wd=False), '_fused_adam_')])
@FUSED
def test_step_is_multi_tensor(monkeypatch, opt_func, fused_kernel, fused):
    """The number of kernel calls in a step does not grow with the number of parameter tensors; the fused path
    makes one call of torch's fused kernel (plus one decay pass with decoupled wd) where one computes the update."""
    counts = []
    for n_hidden in (1, 20):
        model = make_model(n_hidden); opt = opt_func(list(model.parameters()), lr=1e-3, fused=fused)
        x, y = batch(0); nn.functional.mse_loss(model(x), y).backward()
        calls = count_kernels(monkeypatch)
        opt.step(); counts.append(len(calls)); monkeypatch.undo()
        uses_fused = [c for c in calls if c.startswith('_fused_')]
        assert uses_fused == ([fused_kernel] if fused and fused_kernel else [])
    assert counts[0] == counts[1] > 0
    assert len(list(make_model(20).parameters())) >= 60


def test_fused_path_leaves_gradients_and_saved_state_alone():
    "The fused kernels read p.grad without changing it (L2 decay included); RMSProp's scratch buffer is never saved."
    for opt_func in (sgd_momentum(0.9, wd=0.1, decouple_wd=False), rmsprop(wd=0.1, decouple_wd=False),
                     adam(wd=0.1, decouple_wd=False)):
        model = make_model(); opt = opt_func(list(model.parameters()), lr=1e-3)
        x, y = batch(0); nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), grads): assert torch.equal(p.grad, g)
        keys = {k for st in opt.state_dict()['state'] for k in st}
        assert keys == {'step', *opt.state_keys}, keys


def test_plain_params_and_skipped_grads():
    "`opt_func(params, lr)` works on a list of tensors; a parameter without gradient is left alone."
    a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = sgd_momentum(0.5)([a, b], 0.1)
    a.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((3,), 1 - 0.1 * 0.5))
    torch.testing.assert_close(b.detach(), torch.ones(2))
    assert 'grad_avg' not in opt.state[b] and opt.state[a]['step'] == 1


# ---------------------------------------------------------------------------------------------------
# Bad input

def test_sparse_gradients_are_refused():
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match='sparse=False'): adam()(list(emb.parameters()), lr=1e-3).step()


@pytest.mark.parametrize('make,name,value', [
    (lambda: sgd_momentum(1.0), 'mom', '1.0'), (lambda: sgd_momentum(-0.1), 'mom', '-0.1'),
    (lambda: sgd_momentum(wd=-1e-3), 'wd', '-0.001'), (lambda: rmsprop(sqr_mom=1.5), 'sqr_mom', '1.5'),
    (lambda: rmsprop(eps=0.), 'eps', '0.0'), (lambda: adam(eps=-1e-8), 'eps', '-1e-08'),
    (lambda: adam(mom=float('nan')), 'mom', 'nan'), (lambda: adam(sqr_mom=1.), 'sqr_mom', '1.0'),
    (lambda: sgd_momentum(0.9)([torch.zeros(2, requires_grad=True)], lr=-0.1), 'lr', '-0.1'),
    (lambda: adam()([torch.zeros(2, requires_grad=True)], lr=slice(-1e-3, 1e-2)), 'lr', '-0.001'),
    (lambda: sgd_momentum(nesterov=True), 'nesterov', 'dampening=False'),
    (lambda: sgd_momentum(dampening=False, debias=True), 'debias', 'dampening=True'),
    (lambda: ewma_weights(1., 3), 'beta', '1.0'), (lambda: ewma_weights(0.9, 0), 'n', '0'),
    (lambda: effective_window(-0.5), 'beta', '-0.5'), (lambda: debias_factor(0.9, 0), 't', '0'),
])
def test_bad_hypers_raise(make, name, value):
    with pytest.raises(ValueError, match=name) as e: make()
    assert value in str(e.value)


def test_set_hyper_is_checked():
    opt = adam()([torch.zeros(2, requires_grad=True)], lr=1e-3)
    with pytest.raises(ValueError, match=r'Invalid mom: 1\.2'): opt.set_hyper('mom', 1.2)
    with pytest.raises(ValueError, match='lr'): opt.set_hyper('lr', -1.)
    assert opt.hypers[0]['mom'] == 0.9


def test_load_refuses_other_kinds():
    "State from another optimizer kind or configuration, or another model, is refused before anything changes."
    model = make_model(); ps = list(model.parameters())
    def trained(opt): train(model, opt, n_steps=3); return opt
    ema, heavy, adm = sgd_momentum(0.9)(ps, 1e-3), sgd_momentum(0.9, dampening=False)(ps, 1e-3), adam()(ps, 1e-3)
    trained(ema)
    before = {k: v.clone() for k, v in ema.state[ps[0]].items() if torch.is_tensor(v)}
    for src, match in [(trained(adm), 'ForeachAdam'), (trained(heavy), "'dampening': False"),
                       (trained(Adam(ps, 1e-3)), 'not saved by a fastai_l5 optimizer'),
                       (sgd_momentum(0.9)(list(make_model(2).parameters()), 1e-3), 'another model')]:
        with pytest.raises(ValueError, match=match), pytest.warns(UserWarning):
            ema.load_state_dict(src.state_dict())
        for k, v in before.items(): torch.testing.assert_close(ema.state[ps[0]][k], v)


# ---------------------------------------------------------------------------------------------------
# Teaching helpers

def test_teaching_helpers():
    w = ewma_weights(0.9, 50)
    assert w.shape == (50,) and w[0].item() == pytest.approx(0.1)
    torch.testing.assert_close(w[1:] / w[:-1], torch.full((49,), 0.9, dtype=torch.float64))
    assert w.sum().item() == pytest.approx(debias_factor(0.9, 50))
    assert effective_window(0.9) == pytest.approx(10.) and effective_window(0.) == 1.
    assert debias_factor(0.99, 1) == pytest.approx(0.01)
    np.testing.assert_allclose(debias_factor(0.5, np.array([1, 2, 3])), [0.5, 0.75, 0.875])
    # the recursion started from zero equals the weighted sum of the most recent gradients
    g, s = torch.randn(20, dtype=torch.float64), 0.
    for x in g: s = 0.8 * s + 0.2 * x
    assert s.item() == pytest.approx((ewma_weights(0.8, 20) @ g.flip(0)).item())


# ---------------------------------------------------------------------------------------------------
# fastai integration on real data

DLS = dict(n_rows=3000, bs=256)


def make_learn(dls, opt_func, seed=0, **kw): return helpers.make_learn(dls, opt_func, layers=(32, 16), seed=seed, **kw)


def fit_seeded(learn, n_epoch=1, one_cycle=True, **kw):
    np.random.seed(0)  # fastai's tabular loader (`TabWeightedDL`) shuffles with numpy's global generator
    with learn.no_bar(), learn.no_logging():
        (learn.fit_one_cycle if one_cycle else learn.fit)(n_epoch, **kw)
    return learn


@pytest.mark.parametrize('ours,theirs', [
    (adam(wd=0.01), partial(OptimWrapper, opt=partial(torch.optim.AdamW, betas=(0.9, 0.99), eps=1e-5, foreach=True))),
    (sgd_momentum(0.9, dampening=False, decouple_wd=False),
     partial(OptimWrapper, opt=partial(torch.optim.SGD, momentum=0.9, foreach=True))),
])
def test_fit_one_cycle_matches_torch(dls, ours, theirs):
    "Under `fit_one_cycle` (scheduled lr and mom), ours and torch.optim in fastai's `OptimWrapper` train alike."
    l1 = fit_seeded(make_learn(dls, ours, wd=0.01, wd_bn_bias=True), lr_max=3e-2)
    l2 = fit_seeded(make_learn(dls, theirs, wd=0.01, wd_bn_bias=True), lr_max=3e-2)
    assert_rel_close(flat(l1.model), flat(l2.model))
    moms = np.array(l1.recorder.hps['mom'])  # the schedule ran: 0.95 → 0.85 → 0.95
    assert moms.min() < 0.87 and moms.max() > 0.93
    assert not np.allclose(flat(l1.model).numpy(), flat(make_learn(dls, ours).model).numpy())


def test_do_wd_and_param_groups(dls):
    "fastai's `do_wd=False` on BN and bias parameters is honoured: with wd and no gradient they do not move."
    learn = make_learn(dls, sgd_momentum(0.9, wd=0.5))
    learn.create_opt()
    no_wd = [p for p in learn.model.parameters() if not learn.opt.state[p].get('do_wd', True)]
    wd_ps = [p for p in learn.model.parameters() if learn.opt.state[p].get('do_wd', True)]
    assert no_wd and wd_ps
    before = [p.detach().clone() for p in learn.model.parameters()]
    for p in learn.model.parameters(): p.grad = torch.zeros_like(p)
    learn.opt.set_hyper('lr', 0.1); learn.opt.step()
    for p, b in zip(learn.model.parameters(), before):
        if any(p is q for q in no_wd): torch.testing.assert_close(p.detach(), b)
        else: torch.testing.assert_close(p.detach(), b * (1 - 0.1 * 0.5))


def splitter(m): return [params(m.embeds) + params(m.bn_cont), params(m.layers)]


def test_freeze_unfreeze_and_discriminative_lr(dls):
    learn = make_learn(dls, rmsprop(mom=0.9), splitter=splitter)
    learn.freeze()
    frozen = [p.detach().clone() for p in learn.model.embeds.parameters()]
    fit_seeded(learn, lr_max=1e-3)
    for p, b in zip(learn.model.embeds.parameters(), frozen): torch.testing.assert_close(p.detach(), b)
    df = opt_state(learn)
    assert not df['layer'].str.startswith('embeds').any() and df['layer'].str.startswith('layers').any()
    learn.unfreeze()
    fit_seeded(learn, lr_max=slice(1e-5, 1e-3))
    lrs = [h['lr'] for h in learn.opt.hypers]
    assert lrs[0] < lrs[1]
    assert any(not torch.equal(p.detach(), b) for p, b in zip(learn.model.embeds.parameters(), frozen))


def test_save_load_with_opt(dls, tmp_path):
    "`learn.save(with_opt=True)` round-trips through fastai's weights_only load; resuming equals not stopping."
    straight = fit_seeded(make_learn(dls, adam()), n_epoch=2, one_cycle=False, lr=1e-2)
    first = fit_seeded(make_learn(dls, adam()), one_cycle=False, lr=1e-2)
    rng_after_first = np.random.get_state()
    first.path = tmp_path; first.save('ckpt', with_opt=True)
    resumed = make_learn(dls, adam(), seed=1); resumed.path = tmp_path
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)  # fastai warns when it cannot load the optimizer state
        resumed.load('ckpt', with_opt=True)
    p = next(resumed.model.parameters())
    assert resumed.opt.state[p]['step'] == len(dls.train)
    assert isinstance(resumed.opt, ForeachAdam)
    np.random.set_state(rng_after_first)
    with resumed.no_bar(), resumed.no_logging(): resumed.fit(1, lr=1e-2)
    assert_rel_close(flat(resumed.model), flat(straight.model))


def test_load_wrong_kind_into_learner(dls, tmp_path):
    src = fit_seeded(make_learn(dls, sgd_momentum(0.9)), lr_max=1e-2)
    src.path = tmp_path; src.save('sgd', with_opt=True)
    dst = make_learn(dls, adam()); dst.path = tmp_path
    with pytest.warns(UserWarning, match='ForeachSGD'): dst.load('sgd', with_opt=True)
    assert not any('grad_avg' in dst.opt.state[p] for p in dst.model.parameters())
    torch.testing.assert_close(flat(dst.model), flat(src.model))  # the weights themselves do load


def test_export_load_learner(dls, tmp_path):
    learn = fit_seeded(make_learn(dls, sgd_momentum(0.9, nesterov=True, dampening=False)), lr_max=1e-2)
    learn.path = tmp_path; learn.export('model.pkl')
    learn2 = load_learner(tmp_path / 'model.pkl')
    assert learn2.opt_func.func is ForeachSGD and learn2.opt_func.keywords['nesterov']


# ---------------------------------------------------------------------------------------------------
# opt_state

def first_moment(st, torch_names):
    "The momentum: torch's centered RMSprop also keeps a `grad_avg`, its centering mean, which is not it."
    names = ('momentum_buffer', 'exp_avg') if torch_names else ('grad_avg',)
    return next(st[k] for k in names if k in st)


@pytest.mark.parametrize('name,opt_func,has_sqr', [
    ('ours_sgd', sgd_momentum(0.9), False), ('ours_rmsprop', rmsprop(mom=0.9), True), ('ours_adam', adam(), True),
    ('fastai_sgd', partial(SGD, mom=0.9), False), ('fastai_rmsprop', partial(RMSProp, mom=0.9), True),
    ('fastai_adam', Adam, True),
    ('torch_sgd', partial(OptimWrapper, opt=partial(torch.optim.SGD, momentum=0.9)), False),
    ('torch_adam', partial(OptimWrapper, opt=torch.optim.Adam), True),
    ('torch_adamw', partial(OptimWrapper, opt=torch.optim.AdamW), True),
    ('torch_rmsprop', partial(OptimWrapper, opt=partial(torch.optim.RMSprop, momentum=0.9)), True),
    ('torch_rmsprop_centered', partial(OptimWrapper, opt=partial(torch.optim.RMSprop, momentum=0.9, centered=True)), True),
    ('ours_rmsprop_centered', rmsprop(mom=0.9, centered=True), True),
])
def test_opt_state(dls, name, opt_func, has_sqr):
    learn = make_learn(dls, opt_func)
    learn.create_opt()
    assert len(opt_state(learn)) == 0 and list(opt_state(learn).columns) == [
        'layer', 'param', 'numel', 'step', 'mom', 'grad_avg_norm', 'sqr_avg_rms', 'grad_mean_norm']
    fit_seeded(learn, one_cycle=False, lr=1e-3)
    df = opt_state(learn)
    names = param_layer_names(learn.model)
    ps = list(learn.model.parameters())
    assert len(df) == len(ps)
    assert list(df['param']) == [names[id(p)][1] for p in ps] and list(df['layer']) == [names[id(p)][0] for p in ps]
    assert list(df['numel']) == [p.numel() for p in ps]
    wrapped = isinstance(learn.opt, OptimWrapper)
    state = learn.opt.opt.state if wrapped else learn.opt.state
    for p, row in zip(ps, df.itertuples()):
        st = state[p]
        assert row.grad_avg_norm == pytest.approx(first_moment(st, wrapped).norm().item(), rel=1e-5)
        # a centered RMSprop shows its centering mean beside the momentum buffer
        center = st.get('grad_avg' if wrapped else 'grad_mean') if 'centered' in name else None
        if center is None: assert math.isnan(row.grad_mean_norm)
        else: assert row.grad_mean_norm == pytest.approx(center.norm().item(), rel=1e-5) and row.grad_mean_norm != row.grad_avg_norm
        sq = next((st[k] for k in ('sqr_avg', 'exp_avg_sq', 'square_avg') if k in st), None)
        if has_sqr: assert row.sqr_avg_rms == pytest.approx(sq.mean().sqrt().item(), rel=1e-5)
        else: assert math.isnan(row.sqr_avg_rms)
        assert row.mom == pytest.approx(0.9)
    if name.startswith(('ours', 'fastai_adam', 'torch_adam', 'torch_rmsprop')): assert (df['step'] == len(dls.train)).all()
    else: assert df['step'].isna().all()


def test_opt_state_of_bare_optimizer():
    model = make_model(); opt = adam()(groups_of(model), lr=LR)
    train(model, opt, n_steps=2)
    df = opt_state(opt)
    assert list(df['layer'].unique()) == ['group0', 'group1', 'group2'] and (df['step'] == 2).all()
    tor = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.5); train(model, tor, n_steps=1)
    assert len(opt_state(tor)) == len(list(model.parameters()))
    with pytest.raises(TypeError, match='opt_state reads'): opt_state(model)
    with pytest.raises(ValueError, match='no optimizer yet'):
        opt_state(Learner(None, model, loss_func=MSELossFlat()))


# ---------------------------------------------------------------------------------------------------
# Fused kernels that are missing or broken: the foreach path takes over

@pytest.fixture
def fresh_kernel_checks():
    "Forget which fused kernels run, before and after the test (so the real kernels are tried again afterwards)."
    fused_kernel_runs.cache_clear()
    yield
    fused_kernel_runs.cache_clear()


def _broken_kernel(*args, **kwargs): raise NotImplementedError("no kernel for this device and dtype in this build")


@pytest.mark.parametrize('how', ['missing', 'raising'])
@pytest.mark.parametrize('opt_func,kernel,torch_cls,torch_kw', [
    (adam(0.9, 0.99, eps=1e-5, wd=1e-2), '_fused_adamw_', torch.optim.AdamW,
     dict(betas=(0.9, 0.99), eps=1e-5, weight_decay=1e-2)),
    (sgd_momentum(0.9, dampening=False, wd=1e-2, decouple_wd=False), '_fused_sgd_', torch.optim.SGD,
     dict(momentum=0.9, weight_decay=1e-2))], ids=['adamw', 'sgd'])
def test_without_the_fused_kernel_the_step_falls_back(monkeypatch, fresh_kernel_checks, how, opt_func, kernel, torch_cls,
                                                      torch_kw):
    "With torch's fused kernel taken away (or raising), the optimizer warns once, steps with foreach, equals torch.optim."
    if how == 'missing': monkeypatch.delattr(torch, kernel)
    else: monkeypatch.setattr(torch, kernel, _broken_kernel)
    with pytest.warns(UserWarning, match=f'torch.{kernel} does not run') as record:
        m1, m2, o1, _ = ours_vs_torch(opt_func, torch_cls, lr=slice(1e-4, 3e-3), **torch_kw)
    assert len([w for w in record if kernel in str(w.message)]) == 1   # once, not once a step
    assert o1.fused and not fused_kernel_runs(kernel, torch.device('cpu'), torch.float32)
    assert_rel_close(flat(m1), flat(m2))


def test_a_working_fused_kernel_is_used(fresh_kernel_checks, monkeypatch):
    "The check itself: this torch's fused kernels run on CPU float32, and a step then calls them."
    for kernel in ('_fused_sgd_', '_fused_adam_', '_fused_adamw_'):
        assert fused_kernel_runs(kernel, torch.device('cpu'), torch.float32), kernel
    model = make_model(); opt = adam()(list(model.parameters()), lr=1e-3)
    x, y = batch(0); nn.functional.mse_loss(model(x), y).backward()
    calls = count_kernels(monkeypatch)
    opt.step()
    assert '_fused_adamw_' in calls


@pytest.mark.parametrize('opt_func,along', [(sgd_momentum(0.9), True), (sgd_momentum(0.8, debias=True), True),
                                             (sgd_momentum(0.9, wd=0.1), False),
                                             (sgd_momentum(0.9, dampening=False, nesterov=True), False)],
                         ids=['ewma', 'debias', 'decay', 'nesterov'])
def test_sgd_reports_its_step_along_the_momentum(opt_func, along):
    "`momentum_step_scales`: the c of Δp = −c·grad_avg of the step that just ran, checked against p before and after."
    model = make_model(); opt = opt_func(groups_of(model), lr=LR)
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        train(model, opt, n_steps=1)
        ps = list(model.parameters())
        scales = opt.momentum_step_scales(ps)
        assert opt.steps_along_momentum() == along and (scales is None) == (not along)
        if not along: continue
        states, firsts, seconds = param_moments(opt, ps)
        assert all(s is None for s in seconds)
        for p, p0, c, m in zip(ps, before, scales, firsts):
            torch.testing.assert_close(p - p0, -c * m, rtol=1e-5, atol=1e-7)
