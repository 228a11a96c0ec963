"""fastai's distributed training (`learn.distrib_ctx`) on CPU processes with the gloo backend.

fastai 2.8's `DistributedDL._broadcast` moves the batch-order indices to CUDA before broadcasting them
from rank 0, because NCCL only takes CUDA tensors. gloo (the backend Accelerate picks for CPU processes)
takes host tensors, and on a machine without CUDA that `.cuda()` raises. Importing this module (which
`from fastai_l5.all import *` does) patches `DistributedDL._broadcast` to broadcast a host tensor when the
process group is gloo or MPI, and to run fastai's own code, unchanged, otherwise. It also makes
`sync_bn=True` (fastai's default) fail at once with a clear message on CPU, where `SyncBatchNorm` cannot
run, instead of at the first training batch.

Launch a script that trains inside `with learn.distrib_ctx(sync_bn=False): learn.fit(...)` with
`ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 script.py`, or `launch_cpu('script.py')`."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
from fastai.distributed import DistributedDL
from fastai.learner import Learner
from fastcore.basics import patch
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ['cpu_collectives', 'launch_cpu']

_CPU_BACKENDS = ('gloo', 'mpi')


def cpu_collectives():
    "True when a process group is up and its backend (gloo or MPI) communicates host tensors."
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_backend() in _CPU_BACKENDS)


# Keep fastai's originals once, so importing (or reloading) this module twice patches once.
_fastai_broadcast = getattr(DistributedDL._broadcast, '_fastai_l5_original', DistributedDL._broadcast)
_fastai_to_distributed = getattr(Learner.to_distributed, '_fastai_l5_original', Learner.to_distributed)


@patch
def _broadcast(self: DistributedDL, t, rank):
    """Broadcast the index list `t` from `rank` to every rank and return it, equal on all ranks.
    On a gloo/MPI group the tensor stays on the host; on any other backend (NCCL) fastai's own
    CUDA broadcast runs unchanged."""
    if not cpu_collectives(): return _fastai_broadcast(self, t, rank)
    t = torch.as_tensor(t, dtype=torch.long)
    torch.distributed.broadcast(t, rank)
    return t.tolist()

DistributedDL._broadcast._fastai_l5_original = _fastai_broadcast


@patch
def to_distributed(self: Learner, sync_bn=True, **kwargs):
    """fastai's `Learner.to_distributed`, plus a clear error when `sync_bn=True` meets BatchNorm layers
    on a CPU process group: `SyncBatchNorm` only runs on GPUs, so use `distrib_ctx(sync_bn=False)`
    there (each rank then normalises with its own batch statistics, as DDP does by default)."""
    res = _fastai_to_distributed(self, sync_bn, **kwargs)
    if sync_bn and cpu_collectives() and any(isinstance(m, _BatchNorm) for m in self.model.modules()):
        self.detach_distributed()
        raise ValueError("sync_bn=True needs GPUs (SyncBatchNorm cannot run on CPU tensors); "
                         "on CPU processes use `learn.distrib_ctx(sync_bn=False)`")
    return res

Learner.to_distributed._fastai_l5_original = _fastai_to_distributed


def launch_cpu(script, *args, nproc=2, timeout=600, env=None, check=True):
    """Run `script` (with `args`) in `nproc` CPU processes under `torchrun --standalone` with
    `ACCELERATE_USE_CPU=1`, the way to use `learn.distrib_ctx(sync_bn=False)` without GPUs.
    Returns the `subprocess.CompletedProcess` (output captured as text); with `check`, a failed or
    timed-out run raises `RuntimeError` carrying the end of its output."""
    if int(nproc) < 1: raise ValueError(f"nproc={nproc!r} must be at least 1")
    if not os.path.exists(script): raise FileNotFoundError(f"no script at {script!r}")
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={int(nproc)}',
           str(script), *map(str, args)]
    full_env = {**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1', **(env or {})}
    try: res = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b'')[-3000:]
        if isinstance(out, bytes): out = out.decode(errors='replace')
        raise RuntimeError(f"{nproc} processes of {script} did not finish in {timeout}s "
                           f"(a deadlock?); last output:\n{out}") from None
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {res.returncode}; last output:\n"
                           f"{(res.stdout + res.stderr)[-4000:]}")
    return res
