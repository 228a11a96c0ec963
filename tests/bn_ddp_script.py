"""precise_bn and PreciseBNCallback under `learn.distrib_ctx(sync_bn=False)`; launched by
tests/test_batchnorm.py as `launch_cpu('tests/bn_ddp_script.py', OUT_DIR)` (2 CPU processes, gloo).
precise_bn: rank 0 pools the training loader (9 batches), rank 1 the validation loader (3) or an empty
one. PreciseBNCallback: a one-epoch fit, with each rank's buffers just before its pass and after the fit.
Each rank writes what each call raised (or the buffers it left) to OUT_DIR/rank{r}.pt."""
import sys
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.tabular.all import tabular_learner
from fastai.torch_core import rank_distrib, set_seed

from fastai_l5.all import *


def outcome(f):
    try: f()
    except ValueError as e: return f'ValueError: {e}'
    return ''


def bn_buffers(model):
    return {k: v.detach().clone() for k, v in getattr(model, 'module', model).state_dict().items() if 'running_' in k}


class BuffersBeforePass(Callback):
    "Each rank's running statistics at the end of training, just before PreciseBNCallback (order 45) runs."
    order = 44
    def after_train(self): self.buffers = bn_buffers(self.learn.model)


def callback_run(dls):
    set_seed(0)
    before = BuffersBeforePass()
    learn = tabular_learner(dls, layers=[16, 8], cbs=[PreciseBNCallback(n_batches=3), before])
    with learn.distrib_ctx(sync_bn=False): learn.fit(1, 1e-2)
    return dict(before=before.buffers, after=bn_buffers(learn.model), df=learn.precise_bn_cb.df)


def main(out):
    rank = rank_distrib()
    set_seed(0)
    dls = example_dls('diamonds', n_rows=1500, bs=128)
    learn = tabular_learner(dls, layers=[16, 8])
    mine = dls.train.new(shuffle=False) if rank == 0 else dls.valid.new(shuffle=False)
    empty = dls.train.new(shuffle=False) if rank == 0 else dls.train.new(bs=5000)  # drop_last: no batch
    with learn.distrib_ctx(sync_bn=False):
        res = dict(n_mine=len(mine), n_empty=len(empty),
                   too_many=outcome(lambda: precise_bn(learn, n_batches=5, dl=mine)),
                   empty=outcome(lambda: precise_bn(learn, n_batches=1, dl=empty)),
                   fits=outcome(lambda: precise_bn(learn, n_batches=3, dl=mine)))
    res['buffers'] = bn_buffers(learn.model)
    res['callback'] = callback_run(dls)
    torch.save(res, Path(out) / f'rank{rank}.pt')
    # leave together and close the group: a rank exiting with gloo's threads still up aborts now and then
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == '__main__': main(sys.argv[1])
