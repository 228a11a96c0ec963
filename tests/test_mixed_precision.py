"""fastai_l5's callbacks under mixed precision. On CPU: bf16 autocast training, and steps cancelled and
gradients scaled exactly as fastai's `MixedPrecision` (order 10) does with fp16. fastai's `to_fp16` needs
CUDA: those tests run only where a GPU is present."""
import math

import pytest
import torch
from fastai.callback.core import Callback, CancelStepException
from fastai.callback.fp16 import MixedPrecision
from fastcore.test import test_close as close_enough

from fastai_l5.all import *
import helpers

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="fastai's MixedPrecision (to_fp16, to_bf16) "
                                "autocasts on CUDA only; no GPU on this machine")


DLS = dict(n_rows=3000, bs=256)


def make_learn(dls, cbs=()): return helpers.make_learn(dls, sgd_momentum(0.9), cbs, ps=(0.1, 0.1))


def l5_callbacks(): return [MomentumLogger(), DropoutSchedule(early_dropout(0.2)), BNDrift()]


class CPUAutocast(Callback):
    "bf16 autocast on CPU, entered and left where fastai's `MixedPrecision` does; bf16 needs no loss scaling."
    order = 10
    def before_fit(self): self.pred_dtypes = set()
    def before_batch(self):
        self.ctx = torch.autocast('cpu', dtype=torch.bfloat16); self.ctx.__enter__()
    def after_pred(self):
        self.pred_dtypes.add(self.learn.pred.dtype)
        self.learn.pred = self.learn.pred.float()
    def after_loss(self): self.ctx.__exit__(None, None, None)


class ScaleAndSkip(Callback):
    """What `MixedPrecision` does with fp16, simulated on CPU: the loss is multiplied by `scale` before backward,
    the gradients divided by it in `before_step`, and the steps of the batches in `skip` (an overflow) cancelled."""
    order = 10
    def __init__(self, scale=2.**10, skip=()): self.scale, self.skip = scale, set(skip)
    def before_fit(self): self.batch, self.skipped = 0, []
    def before_backward(self): self.learn.loss_grad = self.learn.loss_grad * self.scale
    def before_step(self):
        self.batch += 1
        for p in self.learn.model.parameters():
            if p.grad is not None: p.grad.div_(self.scale)
        if self.batch in self.skip:
            self.skipped.append(self.batch); raise CancelStepException()


class GradNorms(Callback):
    """Each layer's gradient norm as the optimizer will see it (after order 10 unscaled it), for every batch
    whose step was not cancelled by order 10: `rows[k]` is `(batch number in the fit, {layer: norm})`."""
    order = 11
    def before_fit(self): self.rows, self.batch = [], 0
    def after_backward(self): self.batch += 1
    def before_step(self):
        sq = {}
        for layer, _, p in layer_params(self.learn.model):
            if p.grad is not None: sq[layer] = sq.get(layer, 0.) + p.grad.double().square().sum().item()
        self.rows.append((self.batch, {l: math.sqrt(v) for l, v in sq.items()}))


def check_grad_norms(mom_df, rows, eps):
    "The logger's step k is the k-th step that ran, and logs that step's unscaled gradient norm per layer."
    assert sorted(set(mom_df.step)) == list(range(1, len(rows) + 1))
    for step, (_, row) in enumerate(rows, start=1):
        logged = mom_df[mom_df.step == step].set_index('layer')['grad_norm']
        for layer, g in row.items(): close_enough(logged[layer], g, eps=eps * max(g, 1.))


def test_bf16_autocast_with_every_callback(dls):
    auto, norms = CPUAutocast(), GradNorms()
    learn = make_learn(dls, cbs=[auto, norms] + l5_callbacks())
    learn.fit_one_cycle(1, 1e-2)
    assert auto.pred_dtypes == {torch.bfloat16}  # the forward really ran in bf16
    n = len(dls.train)
    mom = learn.momentum_logger.df
    assert len(norms.rows) == n and mom[['grad_norm', 'mom_norm', 'update_norm']].notna().all().all()
    check_grad_norms(mom, norms.rows, 1e-5)
    assert learn.dropout_schedule.df.step.max() == n
    bn = learn.bn_drift.df
    assert len(bn) and bn[['mean_shift', 'var_shift']].notna().all().all()
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())  # master weights stay fp32


def test_scaled_gradients_are_logged_unscaled(dls):
    "A loss scale of 2^10 (exact in floating point) changes nothing in the logs: they read the unscaled gradient."
    plain = make_learn(dls, cbs=[MomentumLogger()])
    plain.fit(1, 1e-2)
    scaled = make_learn(dls, cbs=[ScaleAndSkip(2.**10), MomentumLogger()])
    scaled.fit(1, 1e-2)
    a, b = plain.momentum_logger.df, scaled.momentum_logger.df
    assert len(a) == len(b) > 0
    for col in ('grad_norm', 'mom_norm', 'update_norm', 'param_norm'):
        close_enough(b[col].to_numpy(), a[col].to_numpy(), eps=1e-4)


def test_skipped_steps_are_not_logged(dls):
    skip = (2, 3, 7)
    scaler, norms = ScaleAndSkip(2.**8, skip=skip), GradNorms()
    learn = make_learn(dls, cbs=[scaler, norms] + l5_callbacks())
    learn.fit(1, 1e-2)
    n = len(dls.train)
    real = [b for b in range(1, n + 1) if b not in skip]
    assert scaler.skipped == list(skip)
    assert [b for b, _ in norms.rows] == real
    assert learn.momentum_logger.n_step == len(real)
    check_grad_norms(learn.momentum_logger.df, norms.rows, 1e-5)  # real steps only, unscaled gradients
    # dropout and BN log every training batch; a cancelled step does not advance their step count
    assert learn.dropout_schedule.n_step == learn.bn_drift.n_step == len(real)
    assert learn.dropout_schedule.df.step.max() == len(real)


@needs_cuda
def test_fp16_with_every_callback_on_gpu(dls):
    "fastai's own MixedPrecision, fp16, a huge initial loss scale so the first steps overflow and are skipped."
    norms, dls = GradNorms(), example_dls('diamonds', n_rows=3000, bs=64)
    learn = make_learn(dls, cbs=[norms] + l5_callbacks()).to_fp16(init_scale=2.**24)
    learn.fit(1, 1e-2)
    n, mom = len(dls.train), learn.momentum_logger.df
    assert 0 < len(norms.rows) < n  # the first steps overflowed and were skipped, later ones ran
    assert learn.momentum_logger.n_step == len(norms.rows)
    check_grad_norms(mom, norms.rows, 1e-3)
    assert mom[['grad_norm', 'mom_norm']].map(math.isfinite).all().all()


@needs_cuda
def test_bf16_fastai_on_gpu(dls):
    learn = make_learn(dls, cbs=l5_callbacks()).to_bf16()
    learn.fit(1, 1e-2)
    assert learn.momentum_logger.n_step == len(dls.train)
    assert learn.momentum_logger.df.grad_norm.notna().all()
