"BNDrift, precise_bn and bn_shift against independent computations from the BN layers' inputs."
import copy
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import TerminateOnNaNCallback
from fastai.learner import Learner, load_learner
from matplotlib.figure import Figure
from torch import nn

from fastai_l5.all import *
from fastai_l5.precise import _merge_moments
from helpers import make_learn


DLS = dict(n_rows=1500, bs=128)


def make_learner(dls, seed=0, **cfg):
    "The shared seeded learner (Adam, layers 32-16, `cfg` to its tabular config) without a progress bar."
    learn = make_learn(dls, layers=(32, 16), seed=seed, **cfg)
    learn.remove_cbs(learn.cbs.filter(lambda cb: type(cb).__name__ == 'ProgressCallback'))
    return learn


def bns(model): return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)]


class RecordBNInputs(Callback):
    "Test-only: each training batch's BN inputs and the running stats just before it, through forward pre-hooks."
    order = 0
    def before_fit(self):
        self.rows = getattr(self, 'rows', [])
        self.handles = [m.register_forward_pre_hook(self.hook(n)) for n, m in bns(self.learn.model)]
    def hook(self, name):
        def f(mod, args):
            if mod.training:
                self.rows.append(dict(layer=name, x=args[0].detach().double().clone(),
                                      mean_r=mod.running_mean.double().clone(), var_r=mod.running_var.double().clone(),
                                      eps=mod.eps))
        return f
    def after_fit(self):
        for h in self.handles: h.remove()


def expected_drift(rows, n_layers):
    "The BNDrift columns from raw BN inputs: μ_0/σ²_0 are each layer's running stats at its first recorded batch."
    out, first = [], {}
    for i, r in enumerate(rows):
        first.setdefault(r['layer'], r)
        r0 = first[r['layer']]
        mean_b, var_b = r['x'].mean(0), r['x'].var(0, unbiased=True)
        out.append(dict(layer=r['layer'],
                        mean_shift=((mean_b - r['mean_r']).abs() / (r['var_r'] + r['eps']).sqrt()).mean().item(),
                        var_shift=torch.log(var_b / r['var_r']).abs().mean().item(),
                        mean_drift=((r['mean_r'] - r0['mean_r']).abs() / (r0['var_r'] + r['eps']).sqrt()).mean().item()))
    return pd.DataFrame(out)


def test_drift_columns_match_bn_inputs(dls):
    learn = make_learner(dls)
    _, m1 = bns(learn.model)[0], bns(learn.model)[1][1]
    learn.model.bn_cont.momentum = None   # cumulative average
    m1.momentum = 0.3
    rec, cb = RecordBNInputs(), BNDrift()
    learn.fit(2, 3e-3, cbs=[rec, cb])
    df, exp = cb.df, expected_drift(rec.rows, 3)
    n_batches = 2 * len(dls.train)
    assert len(df) == 3 * n_batches and list(df.columns) == ['step', 'epoch', 'layer', 'mean_shift', 'var_shift', 'mean_drift']
    assert df['step'].tolist() == [s for s in range(1, n_batches + 1) for _ in range(3)]
    assert df['epoch'].tolist() == [e for e in range(2) for _ in range(3 * len(dls.train))]
    assert df['layer'].tolist() == exp['layer'].tolist() == ['bn_cont', 'layers.0.2', 'layers.1.2'] * n_batches
    for c in ['mean_shift', 'var_shift', 'mean_drift']:
        np.testing.assert_allclose(df[c], exp[c], rtol=2e-3, atol=2e-5, err_msg=c)
    assert (df['mean_drift'].iloc[3:] > 0).all() and (df['var_shift'] > 0).all()
    assert isinstance(cb.plot(), Figure) and cb.precise_df.empty
    with pytest.raises(ValueError, match='unknown layers'): cb.plot(layers='nope')


def test_every_steps_across_fits_and_validate(dls):
    learn = make_learner(dls)
    recs, cb = [RecordBNInputs(), RecordBNInputs()], BNDrift(every=3)
    learn.fit(1, 1e-3, cbs=[recs[0], cb])
    n = len(dls.train)
    learn.validate()                      # fires before_fit/after_fit: the history stays
    learn.fit(1, 1e-3, cbs=[recs[1], cb])  # steps keep counting; the second fit has its own μ_0
    assert sorted(set(cb.df['step'])) == [s for s in range(1, 2 * n + 1) if s % 3 == 0]
    for k, rec in enumerate(recs):
        exp = expected_drift(rec.rows, 3)
        logged = [i for i in range(n) if (k * n + i + 1) % 3 == 0]
        exp = pd.concat([exp.iloc[3 * i:3 * i + 3] for i in logged])
        got = cb.df[(cb.df['step'] > k * n) & (cb.df['step'] <= (k + 1) * n)]
        for c in ['mean_shift', 'var_shift', 'mean_drift']:
            np.testing.assert_allclose(got[c], exp[c], rtol=2e-3, atol=2e-5, err_msg=c)
    blob = pickle.dumps(cb)              # what learn.export does: the logs are left out
    assert len(blob) < 20_000 and len(pickle.loads(blob).df) == 0


def test_frozen_bn_and_zero_momentum_give_nan(dls):
    learn = make_learner(dls)
    learn.model.layers[0][2].momentum = 0.
    class FreezeBN(Callback):
        order = 1
        def before_batch(self):
            if self.training: self.learn.model.bn_cont.eval()
    cb = BNDrift()
    learn.fit(1, 1e-3, cbs=[FreezeBN(), cb])
    df = cb.df
    frozen = df[df['layer'].isin(['bn_cont', 'layers.0.2'])]
    assert frozen[['mean_shift', 'var_shift']].isna().all().all()
    assert df[df['layer'] == 'layers.1.2'][['mean_shift', 'var_shift']].notna().all().all()


class CopyAtEpochEnd(Callback):
    "Test-only: the model right after BNDrift's precise measurement, and the training batches it would see."
    order = 70
    def __init__(self, n): self.n, self.snaps = n, []
    def after_train(self):
        dl = self.learn.dls.train
        state = dl.rng.getstate(), torch.random.get_rng_state(), np.random.get_state()
        it = iter(dl)
        batches = [tuple(t.clone() for t in next(it))]
        masks_rng = torch.random.get_rng_state()   # torch's loader iterator draws a seed before the first batch
        batches += [tuple(t.clone() for t in b) for _, b in zip(range(self.n - 1), it)]
        dl.rng.setstate(state[0]); torch.random.set_rng_state(state[1]); np.random.set_state(state[2])
        self.snaps.append((copy.deepcopy(self.learn.model), batches, masks_rng))


def population_by_hooks(model, batches, n_inp=2, dropout=True, rng_state=None):
    "Each BN layer's inputs over all `batches` concatenated, in training mode: float64 mean and variance (divisor N)."
    model = copy.deepcopy(model).train()
    if rng_state is not None: torch.random.set_rng_state(rng_state)   # the same dropout masks
    if not dropout:
        for m in model.modules():
            if isinstance(m, nn.Dropout): m.eval()
    xs = {n: [] for n, _ in bns(model)}
    hs = [m.register_forward_pre_hook(lambda mod, a, n=n: xs[n].append(a[0].double())) for n, m in bns(model)]
    with torch.no_grad():
        for b in batches: model(*b[:n_inp])
    for h in hs: h.remove()
    return {n: (torch.cat(v).mean(0), torch.cat(v).var(0, unbiased=False)) for n, v in xs.items()}


def gaps(mean_r, var_r, mean_p, var_p, eps=1e-5):
    return (((mean_r.double() - mean_p).abs() / (var_p + eps).sqrt()).mean().item(),
            torch.log(var_r.double() / var_p).abs().mean().item())


def test_precise_every_measures_and_leaves_training_unchanged(dls):
    plain, measured = make_learner(dls, seed=1, ps=0.2), make_learner(dls, seed=1, ps=0.2)
    rng = dls.train.rng.getstate()           # fastai's tabular train loader samples with numpy's global RNG
    torch.manual_seed(5); np.random.seed(5); plain.fit(2, 1e-2, cbs=BNDrift())
    cb, copier = BNDrift(precise_every=1, precise_batches=4), CopyAtEpochEnd(4)
    dls.train.rng.setstate(rng)
    torch.manual_seed(5); np.random.seed(5); measured.fit(2, 1e-2, cbs=[cb, copier])
    for (k, a), b in zip(plain.model.state_dict().items(), measured.model.state_dict().values()):
        assert torch.equal(a, b), k        # same weights and buffers: measuring changed nothing
    pdf = cb.precise_df
    assert list(pdf.columns) == ['epoch', 'layer', 'mean_gap', 'var_gap', 'valid_loss', 'valid_loss_precise']
    assert pdf['epoch'].tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(pdf.groupby('epoch')['valid_loss'].first(),
                               [v[1] for v in measured.recorder.values], rtol=1e-5)
    assert measured.recorder.metric_names[3] == 'valid_loss_precise'
    for epoch, (model, batches, rng_state) in enumerate(copier.snaps):
        pop = population_by_hooks(model, batches, rng_state=rng_state)
        rows = pdf[pdf['epoch'] == epoch].set_index('layer')
        for name, mod in bns(model):
            mg, vg = gaps(mod.running_mean, mod.running_var, *pop[name])
            assert rows.loc[name, 'mean_gap'] == pytest.approx(mg, rel=1e-3, abs=1e-6)
            assert rows.loc[name, 'var_gap'] == pytest.approx(vg, rel=1e-3, abs=1e-6)
        m = copy.deepcopy(model).eval()
        for name, mod in bns(m):
            mod.running_mean.copy_(pop[name][0]); mod.running_var.copy_(pop[name][1])
        with torch.no_grad():
            tot = sum(measured.loss_func(m(*b[:2]), b[2]).item() * len(b[2]) for b in dls.valid)
        assert rows['valid_loss_precise'].iloc[0] == pytest.approx(tot / len(dls.valid_ds), rel=1e-4)
    assert measured.recorder.values[1][2] == pytest.approx(pdf['valid_loss_precise'].iloc[-1])
    assert isinstance(cb.plot(), Figure) and isinstance(cb.plot(stats='mean_shift', layers='bn_cont'), Figure)


def uneven_batches(dls, sizes, seed=0):
    "Batches of the given sizes cut from the validation set, as (cat, cont, y) tuples."
    b = next(iter(dls.valid.new(bs=sum(sizes), shuffle=False, drop_last=False)))
    cuts = np.cumsum([0] + sizes)
    return [tuple(t[cuts[i]:cuts[i + 1]] for t in b) for i in range(len(sizes))]


def test_precise_bn_pools_over_samples(dls):
    learn = make_learner(dls, ps=0.3)
    learn.fit(1, 1e-2)                       # running stats that lag the weights, and optimizer state
    learn.model.eval(); learn.model.layers[1].train()   # an unusual mix of modes, to check it comes back
    batches = uneven_batches(dls, [7, 100, 33, 64])
    before = copy.deepcopy(learn.model)
    opt_state = copy.deepcopy({k: {n: v.clone() for n, v in s.items() if isinstance(v, torch.Tensor)}
                               for k, s in enumerate(learn.opt.state.values())})
    momenta = [m.momentum for _, m in bns(learn.model)]
    modes = [m.training for m in learn.model.modules()]
    res = learn.precise_bn(n_batches=4, dl=batches, dropout=False)
    pop = population_by_hooks(before, batches, dropout=False)
    assert list(res.columns) == ['layer', 'mean_gap', 'var_gap'] and res['layer'].tolist() == [n for n, _ in bns(before)]
    for (name, old), (_, new), row in zip(bns(before), bns(learn.model), res.itertuples()):
        np.testing.assert_allclose(new.running_mean.double(), pop[name][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new.running_var.double(), pop[name][1], rtol=1e-5, atol=1e-6)
        assert new.num_batches_tracked == old.num_batches_tracked
        mg, vg = gaps(old.running_mean, old.running_var, *pop[name])
        assert row.mean_gap == pytest.approx(mg, rel=1e-4) and row.var_gap == pytest.approx(vg, rel=1e-4)
    for (k, a), b in zip(before.named_parameters(), learn.model.parameters()): assert torch.equal(a, b), k
    assert [m.momentum for _, m in bns(learn.model)] == momenta
    assert [m.training for m in learn.model.modules()] == modes
    for k, s in enumerate(learn.opt.state.values()):
        for n, v in s.items():
            if isinstance(v, torch.Tensor): assert torch.equal(v, opt_state[k][n])
    # bn_cont sees raw inputs: any split of the same rows gives the same population statistics
    precise_bn(learn, 3, dl=uneven_batches(dls, [150, 20, 34]), dropout=False)
    np.testing.assert_allclose(learn.model.bn_cont.running_mean.double(), pop['bn_cont'][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(learn.model.bn_cont.running_var.double(), pop['bn_cont'][1], rtol=1e-5, atol=1e-6)


def test_precise_bn_dropout_switch(dls):
    learn = make_learner(dls, ps=0.5)
    batches = uneven_batches(dls, [50, 60])
    runs = {}
    for dropout in (False, True):
        for k in range(2):
            m = make_learner(dls, ps=0.5); m.model.load_state_dict(learn.model.state_dict())
            torch.manual_seed(k); precise_bn(m, 2, dl=batches, dropout=dropout)
            runs[dropout, k] = m.model.layers[1][2].running_var.clone()
    assert torch.equal(runs[False, 0], runs[False, 1])          # no dropout: deterministic
    assert not torch.equal(runs[True, 0], runs[True, 1])        # dropout on: the masks change the statistics
    pop = population_by_hooks(learn.model, batches, dropout=False)
    np.testing.assert_allclose(runs[False, 0].double(), pop['layers.1.2'][1], rtol=1e-5)


def test_merge_moments_across_processes():
    "The all_reduce path: per-process (n, mean, M2) pooled equals the statistics of all samples together."
    torch.manual_seed(0)
    parts = [torch.randn(n, 5, dtype=torch.float64) * 3 + 10 * r for r, n in enumerate([20, 7, 40])]
    n = torch.tensor([[len(p)] * 5 for p in parts], dtype=torch.float64)
    mean = torch.stack([p.mean(0) for p in parts])
    m2 = torch.stack([((p - p.mean(0)) ** 2).sum(0) for p in parts])
    allsum = lambda t: t.sum(0, keepdim=True).expand_as(t).clone()   # what every rank gets from all_reduce
    total, gmean, gm2 = _merge_moments(n, mean, m2, allsum)
    full = torch.cat(parts)
    for r in range(3):
        assert torch.allclose(gmean[r], full.mean(0)) and torch.allclose(gm2[r] / total[r], full.var(0, unbiased=False))
    assert torch.equal(gmean[0], gmean[2])


def test_bad_input(dls):
    with pytest.raises(ValueError, match='every'): BNDrift(every=0)
    with pytest.raises(ValueError, match='precise_every'): BNDrift(precise_every=0.5)
    learn = make_learner(dls)
    with pytest.raises(ValueError, match='n_batches=99'): precise_bn(learn, n_batches=99)
    with pytest.raises(ValueError, match='n_batches'): precise_bn(learn, n_batches=0)
    plain = make_learner(dls, use_bn=False, bn_cont=False)
    with pytest.raises(ValueError, match='BatchNorm'): precise_bn(plain)
    with pytest.raises(ValueError, match='BatchNorm'): plain.fit(1, cbs=BNDrift())
    with pytest.raises(ValueError, match='bn_cont'): bn_shift(plain, dls.valid_ds.items)
    df, _ = example_df('diamonds', n_rows=200)
    with pytest.raises(ValueError, match=r"\['depth'\]"): bn_shift(learn, df.drop(columns='depth'))
    with pytest.raises(ValueError, match='numeric'): bn_shift(learn, df.assign(depth='deep'))


@pytest.fixture(scope='module')
def trained(dls):
    "A learner trained for 3 epochs, for bn_shift (which only reads it)."
    learn = make_learner(dls, seed=1)
    learn.fit(3, 3e-3)
    return learn


def test_bn_shift_units_and_flags(dls, trained):
    learn = trained
    conts = list(dls.cont_names)
    norm = next(p for p in dls.procs if type(p).__name__ == 'Normalize')
    df, _ = example_df('diamonds', n_rows=1500)
    res = bn_shift(learn, df)
    assert list(res.columns) == ['feature', 'train_mean', 'train_std', 'new_mean', 'new_std', 'z', 'effect', 'std_ratio', 'shifted']
    assert res['feature'].tolist() == conts and not res['shifted'].any()
    # train_* are bn_cont's running statistics in the data's own units
    bn = learn.model.bn_cont
    for i, c in enumerate(conts):
        assert res['train_mean'][i] == pytest.approx(norm.means[c] + bn.running_mean[i].item() * norm.stds[c], rel=1e-6)
        assert res['train_std'][i] == pytest.approx(bn.running_var[i].item() ** 0.5 * norm.stds[c], rel=1e-6)
    np.testing.assert_allclose(res['new_mean'], df[conts].mean(), rtol=1e-9)
    np.testing.assert_allclose(res['effect'], (res['new_mean'] - res['train_mean']) / res['train_std'], rtol=1e-12)
    np.testing.assert_allclose(res['std_ratio'], df[conts].std().to_numpy() / res['train_std'].to_numpy(), rtol=1e-9)
    # shift one feature's mean by half a standard deviation, double another's spread
    new = df.sample(800, random_state=1).copy()
    new['carat'] += 0.5 * df['carat'].std()
    new['depth'] = new['depth'].mean() + 2 * (new['depth'] - new['depth'].mean())
    new.loc[new.index[:5], 'table'] = np.nan                 # filled like FillMissing does, not flagged
    res = bn_shift(learn, new)
    assert res.loc[res['shifted'], 'feature'].tolist() == ['carat', 'depth']
    assert res.set_index('feature')['z']['carat'] > 3 and res.set_index('feature')['std_ratio']['depth'] > 1.8
    assert bn_shift(learn, new, threshold=1e6)['shifted'].sum() == 0
    assert bn_shift(learn, new, min_effect=1.5)['shifted'].sum() == 0   # material: half a std and a doubled spread are not 1.5


def test_bn_shift_needs_significant_and_material(trained):
    "Large samples of the training distribution are not flagged; a small move in a large sample is significant, material only past min_effect."
    full, _ = example_df('diamonds')
    samples = [full.sample(5000, random_state=s) for s in range(8)]
    flagged = np.mean([bn_shift(trained, s)['shifted'].mean() for s in samples])
    assert flagged == 0, f"false-positive rate {flagged:.1%} on same-distribution samples"
    big = full.sample(20000, random_state=1)
    big['carat'] += 0.13 * full['carat'].std()
    res = {me: bn_shift(trained, big, min_effect=me).set_index('feature').loc['carat'] for me in (0., 0.1, 0.2)}
    assert res[0.2]['z'] > 3 and 0.1 < res[0.2]['effect'] < 0.2     # significant, and a small effect
    assert res[0.]['shifted'] and res[0.1]['shifted'] and not res[0.2]['shifted']
    with pytest.raises(ValueError, match='min_effect'): bn_shift(trained, big, min_effect=-1)


@pytest.fixture(scope='module')
def bn_ranks(tmp_path_factory):
    "tests/bn_ddp_script.py on 2 CPU processes (gloo), once: what each rank saw, by rank."
    out, root = tmp_path_factory.mktemp('bn_ddp'), Path(__file__).resolve().parents[1]
    env = {'PYTHONPATH': os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')])}
    launch_cpu(root / 'tests' / 'bn_ddp_script.py', out, nproc=2, timeout=180, env=env)
    return [torch.load(out / f'rank{r}.pt', weights_only=False) for r in range(2)]


@pytest.mark.slow
def test_precise_bn_unequal_ranks_raise_together(bn_ranks):
    """Under DDP (2 CPU processes) a rank whose loader is too short makes every rank raise the same ValueError
    (the batch count is all-reduced first), where before it raised alone and left the other waiting forever."""
    r0, r1 = bn_ranks
    assert (r0['n_mine'], r1['n_mine'], r0['n_empty'], r1['n_empty']) == (9, 3, 9, 0)
    assert r0['too_many'] == r1['too_many'] != ''
    assert 'n_batches=5' in r0['too_many'] and 'only 3 batches on the rank with the fewest of 2' in r0['too_many']
    assert r0['empty'] == r1['empty'] != '' and 'loader is empty' in r0['empty']
    assert r0['fits'] == r1['fits'] == ''
    for k, v in r0['buffers'].items(): torch.testing.assert_close(v, r1['buffers'][k])  # pooled: the same everywhere


@pytest.mark.slow
def test_precise_bn_callback_same_buffers_on_every_rank(bn_ranks):
    "Without SyncBatchNorm each rank's EMA follows its own batches; after PreciseBNCallback's pooled pass they are bitwise equal."
    r0, r1 = (r['callback'] for r in bn_ranks)
    assert any(not torch.equal(v, r1['before'][k]) for k, v in r0['before'].items())
    for k, v in r0['after'].items():
        assert torch.equal(v, r1['after'][k]), k
        assert not torch.equal(v, r0['before'][k]), k
    pd.testing.assert_frame_equal(r0['df'], r1['df'])
    assert r0['df']['epoch'].tolist() == [0, 0, 0]


def test_precise_bn_empty_loader_says_so(dls):
    learn = make_learner(dls)
    empty = dls.train.new(bs=len(dls.train_ds) + 1)  # drop_last: no batch at all
    assert len(empty) == 0
    with pytest.raises(ValueError, match=r'loader is empty.*drop_last=False'): precise_bn(learn, dl=empty)


def test_drift_streams_to_disk(dls, tmp_path):
    "With path, .df goes to a CSV file as training goes (keep=False: only there); an exported copy neither holds nor truncates it."
    path = tmp_path / 'sub' / 'bn.csv'
    learn = make_learner(dls)
    learn.add_cb(BNDrift(every=2, path=path, keep=False))
    learn.fit(2, 1e-2)
    cb = learn.bn_drift
    on_disk = pd.read_csv(path)
    assert cb.table.nbytes() == 0 and len(on_disk) == len(cb.df) == (2 * len(dls.train) // 2) * len(bns(learn.model))
    assert list(on_disk.columns) == ['step', 'epoch', 'layer', 'mean_shift', 'var_shift', 'mean_drift']
    copy_ = pickle.loads(pickle.dumps(cb))
    assert copy_.table.path is None and len(copy_.df) == 0
    assert len(pd.read_csv(path)) == len(on_disk)  # unpickling did not start the file again
    # in memory too (keep=True): the same rows as the file
    learn2 = make_learner(dls); learn2.add_cb(BNDrift(path=tmp_path / 'b.csv'))
    learn2.fit(1, 1e-2)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / 'b.csv'), learn2.bn_drift.df, check_dtype=False)


def test_batch_cancelled_by_terminate_on_nan_is_logged(dls):
    "TerminateOnNaNCallback (order -9) cancels the fit in after_batch before BNDrift's runs: that batch is still logged."
    class NaNAt3(Callback):
        def before_fit(self): self.seen = 0
        def after_loss(self):
            if not self.training: return
            self.seen += 1
            if self.seen == 3: self.learn.loss = self.learn.loss * float('nan')
    learn = make_learner(dls)
    learn.add_cbs([BNDrift(), NaNAt3(), TerminateOnNaNCallback()])
    learn.fit(1, 1e-2)
    df = learn.bn_drift.df
    assert sorted(set(df.step)) == [1, 2, 3] and df.mean_shift.notna().all()


class CopyBeforePreciseBN(CopyAtEpochEnd):
    "Test-only: the model and the training batches just before PreciseBNCallback (order 45) runs its pass."
    order = 44


def test_precise_bn_callback_applies_population_stats(dls, tmp_path):
    "Every `every`-th epoch and the last: the buffers become the population statistics of the training batches, before validation."
    learn = make_learner(dls)
    cb, copier = PreciseBNCallback(every=2, n_batches=4), CopyBeforePreciseBN(4)
    learn.add_cbs([cb, copier])
    assert learn.precise_bn_cb is cb and learn.precise_bn.__func__ is Learner.precise_bn   # the method is not shadowed
    learn.fit(3, 1e-2)
    df = cb.df
    assert list(df.columns) == ['epoch', 'layer', 'mean_gap', 'var_gap']
    assert df['epoch'].tolist() == [1, 1, 1, 2, 2, 2] and df['layer'].tolist() == [n for n, _ in bns(learn.model)] * 2
    for epoch, (model, batches, rng_state) in enumerate(copier.snaps):
        pop = population_by_hooks(model, batches, rng_state=rng_state)
        rows = df[df['epoch'] == epoch].set_index('layer')
        for name, mod in bns(model):
            mg, vg = gaps(mod.running_mean, mod.running_var, *pop[name])
            if epoch == 0: assert mg > 1e-3   # not applied: the EMA stays, away from the population
            else:
                assert rows.loc[name, 'mean_gap'] == pytest.approx(mg, rel=1e-3, abs=1e-6)
                assert rows.loc[name, 'var_gap'] == pytest.approx(vg, rel=1e-3, abs=1e-6)
    for name, mod in bns(learn.model):   # after the last epoch: the population statistics, as validated
        np.testing.assert_allclose(mod.running_mean.double(), pop[name][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mod.running_var.double(), pop[name][1], rtol=1e-5, atol=1e-6)
    last_valid = learn.recorder.values[-1][1]
    assert learn.validate()[0] == pytest.approx(last_valid, rel=1e-6)
    learn.remove_cb(copier); learn.export(tmp_path / 'l.pkl')
    loaded = load_learner(tmp_path / 'l.pkl')   # the population statistics are what inference uses; the log stays behind
    for (k, a), b in zip(learn.model.state_dict().items(), loaded.model.state_dict().values()): assert torch.equal(a, b), k
    assert len(loaded.precise_bn_cb.df) == 0 and loaded.precise_bn_cb.every == 2 and callable(loaded.precise_bn)


def test_precise_bn_callback_warns_once_and_covers_an_early_stop(dls):
    "More batches asked than the loader holds: all of them, one warning; a fit cancelled mid-epoch still ends with the pass."
    class StopAt(Callback):
        def __init__(self, n): self.n, self.seen = n, 0
        def after_batch(self):
            self.seen += self.training
            if self.seen == self.n: raise CancelFitException()
    learn = make_learner(dls)
    learn.add_cb(PreciseBNCallback())
    with pytest.warns(UserWarning, match=f'n_batches=200 but the loader holds only {len(dls.train)} batches') as rec:
        learn.fit(2, 1e-2)
    assert len([w for w in rec if 'PreciseBNCallback' in str(w.message)]) == 1
    assert learn.precise_bn_cb.df['epoch'].tolist() == [0, 0, 0, 1, 1, 1]
    stopped = make_learner(dls)
    stopped.add_cbs([PreciseBNCallback(every=5, n_batches=3), StopAt(len(dls.train) + 2)])
    stopped.fit(3, 1e-2)
    assert stopped.precise_bn_cb.df['epoch'].tolist() == [1, 1, 1]


def test_precise_bn_default_count_is_the_loader_at_most_200(dls):
    learn = make_learner(dls)
    state = copy.deepcopy(learn.model.state_dict())
    def buffers_after(**kw):
        learn.model.load_state_dict(state); precise_bn(learn, dropout=False, **kw)
        return [t.clone() for n, t in learn.model.state_dict().items() if 'running_' in n]
    assert all(map(torch.equal, buffers_after(), buffers_after(n_batches=len(dls.train))))
    base = uneven_batches(dls, [2] * 100 + [3] * 30)
    many = base + base[:120]                               # 250 batches: the default stops at 200
    capped, all_ = buffers_after(dl=many), buffers_after(dl=many, n_batches=250)
    assert all(map(torch.equal, capped, buffers_after(dl=many, n_batches=200)))
    assert not all(map(torch.equal, capped, all_))
    with pytest.raises(ValueError, match='n_batches=251 but the loader holds only 250'): precise_bn(learn, 251, dl=many)


def test_drift_precise_pass_uses_all_batches_when_fewer_and_says_so(dls):
    learn = make_learner(dls)
    with pytest.warns(UserWarning, match=f'BNDrift: precise_batches=50 but the loader holds only {len(dls.train)} batches') as rec:
        learn.fit(2, 1e-2, cbs=(cb := BNDrift(precise_every=1)))
    assert len([w for w in rec if 'BNDrift' in str(w.message)]) == 1
    assert cb.precise_df['epoch'].tolist() == [0, 0, 0, 1, 1, 1]
