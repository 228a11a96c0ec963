"""Trains a small tabular_learner with every fastai_l5 callback under `learn.distrib_ctx(sync_bn=False)`;
launched by tests/test_distributed.py as `launch_cpu('tests/ddp_script.py', OUT_DIR)` (2 CPU processes,
gloo). Each rank writes what it saw to OUT_DIR/rank{r}.pt; the test process checks it."""
import sys
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.distributed import DistributedDL
from fastai.tabular.all import tabular_config, tabular_learner
from fastai.torch_core import num_distrib, rank_distrib, set_seed

from fastai_l5.all import *

N_ROWS, BS, LAYERS = 3000, 200, [32, 16]   # 2400 training rows: 1200 per rank, 6 batches of 200 each
PRECISE_BATCHES = {0: 6, 1: 4}             # rank 1 pools fewer batches than rank 0


def make_learner(**kwargs):
    "The learner both the distributed run and the single-process reference build (same seed, same data)."
    set_seed(0)
    dls = example_dls('diamonds', n_rows=N_ROWS, bs=BS)
    return tabular_learner(dls, layers=LAYERS, config=tabular_config(ps=[0.1, 0.1], embed_p=0.05), **kwargs)


def unshuffled_train(dls):
    "The training set in order, every row once: rank r's `DistributedDL` shard is its r-th half."
    return dls.train.new(shuffle=False, drop_last=False)


def layer_grads(model):
    "{layer: concatenated gradient} for the plain module inside a DDP wrapper."
    model = getattr(model, 'module', model)
    out = {}
    for layer, _, p in layer_params(model):
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[layer] = torch.cat([out[layer], g.flatten()]) if layer in out else g.flatten().clone()
    return out


class GradProbe(Callback):
    """Per training batch: this rank's own gradient (autograd.grad of its loss, before DDP averages) and
    the gradient the optimizer then sees. After backward, the local gradients of all ranks are gathered."""
    order = 12  # after DistributedTrainer (11) has wrapped the model
    def before_fit(self): self.rows = getattr(self, 'rows', [])
    def after_loss(self):
        if not self.training: return
        model = getattr(self.learn.model, 'module', self.learn.model)
        names, params = zip(*[(l, p) for l, _, p in layer_params(model)])
        grads = torch.autograd.grad(self.learn.loss_grad, params, retain_graph=True, allow_unused=True)
        self.local = {}
        for l, p, g in zip(names, params, grads):
            g = (torch.zeros_like(p) if g is None else g).flatten()
            self.local[l] = torch.cat([self.local[l], g]) if l in self.local else g
    def after_backward(self):
        if not self.training: return
        seen = layer_grads(self.learn.model)
        mean_local = {}
        for l, g in self.local.items():
            parts = [torch.zeros_like(g) for _ in range(num_distrib())]
            torch.distributed.all_gather(parts, g.contiguous())
            mean_local[l] = torch.stack(parts).mean(0)
        self.rows.append({l: (seen[l].norm().item(), mean_local[l].norm().item(), self.local[l].norm().item(),
                              (seen[l] - mean_local[l]).norm().item()) for l in seen})


def bn_buffers(model):
    return {n: b.detach().clone() for n, b in model.state_dict().items() if 'running_' in n}


def precise_every_run():
    "BNDrift's per-epoch population-statistics pass inside DDP: its precise_df, or the error it raised."
    learn = make_learner(opt_func=sgd_momentum(mom=0.9), cbs=[BNDrift(precise_every=1, precise_batches=3)])
    try:
        with learn.distrib_ctx(sync_bn=False): learn.fit(1, 1e-2)
    except Exception as e: return dict(error=f'{type(e).__name__}: {e}')
    return dict(error='', precise_df=learn.bn_drift.precise_df, buffers=bn_buffers(learn.model))


def main(out):
    out, rank = Path(out), rank_distrib()
    probe = GradProbe()
    cbs = [MomentumLogger(), DropoutSchedule({'layers.0.3': early_dropout(0.2), 'emb_drop': 0.1}),
           BNDrift(), probe]
    learn = make_learner(opt_func=sgd_momentum(mom=0.9), cbs=cbs)
    try:  # fastai's default sync_bn=True cannot run on CPU: a clear error before any training
        with learn.distrib_ctx(): sync_bn_error = ''
    except ValueError as e: sync_bn_error = str(e)
    with learn.distrib_ctx(sync_bn=False):
        learn.fit_one_cycle(2, 1e-2)
        before_precise = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
        shard = DistributedDL(unshuffled_train(learn.dls))
        precise = precise_bn(learn, n_batches=PRECISE_BATCHES[rank], dl=shard, dropout=False)
    res = dict(precise_every=precise_every_run(), rank=rank, world=num_distrib(), n_shard_batches=len(shard),
               momentum=learn.momentum_logger.df, dropout=learn.dropout_schedule.df, bn=learn.bn_drift.df,
               probe=probe.rows, before_precise=before_precise, after_precise=bn_buffers(learn.model),
               precise=precise, sync_bn_error=sync_bn_error, recorder=list(learn.recorder.values))
    torch.save(res, out / f'rank{rank}.pt')
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # exiting with gloo's threads up aborts now and then


if __name__ == '__main__': main(sys.argv[1])
