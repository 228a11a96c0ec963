"""fastai's distributed training (`learn.distrib_ctx`) on CPU processes with the gloo backend.

fastai 2.8's `DistributedDL._broadcast` moves the batch-order indices to CUDA before broadcasting them
from rank 0, because NCCL only takes CUDA tensors. gloo (the backend Accelerate picks for CPU processes)
takes host tensors, and on a machine without CUDA that `.cuda()` raises. Importing this module (which
`from fastai_l5.all import *` does; these two patches are its only side effects) patches `DistributedDL._broadcast` to broadcast a host tensor when the
process group is gloo or MPI, and to run fastai's own code, unchanged, otherwise. It also makes
`sync_bn=True` (fastai's default) fail at once with a clear message on CPU, where `SyncBatchNorm` cannot
run, instead of at the first training batch. Both patches need `accelerate` (the `distributed` extra), which
`fastai.distributed` imports; without it nothing is patched (`PATCHED` is False) and the rest of fastai_l5 works.

Launch a script that trains inside `with learn.distrib_ctx(sync_bn=False): learn.fit(...)` with
`ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 script.py`, or `launch_cpu('script.py')`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings

import torch

from fastai.learner import Learner
from fastcore.basics import patch_to

from .core import check_count
from .precise import BN_TYPES

__all__ = ['cpu_collectives', 'launch_cpu']

_CPU_BACKENDS = ('gloo', 'mpi')


def cpu_collectives():
    "True when a process group is up and its backend (gloo or MPI) communicates host tensors."
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_backend() in _CPU_BACKENDS)


def _fastai_distributed():
    """fastai's `DistributedDL`, or None without `accelerate` (the `distributed` extra): `fastai.distributed` needs
    it at import, and without it there is no `distrib_ctx` to patch, so the library imports and trains as usual."""
    try: import accelerate  # noqa: F401
    except ImportError: return None
    with warnings.catch_warnings():  # accelerate, imported by fastai.distributed, warns about Jupyter widgets
        warnings.filterwarnings('ignore', message='IProgress not found')
        from fastai.distributed import DistributedDL
    return DistributedDL


def _broadcast(self, t, rank):
    """Broadcast the index list `t` from `rank` to every rank and return it, equal on all ranks.
    On a gloo/MPI group the tensor stays on the host; on any other backend (NCCL) fastai's own
    CUDA broadcast runs unchanged."""
    if not cpu_collectives(): return _fastai_broadcast(self, t, rank)
    t = torch.as_tensor(t, dtype=torch.long)
    torch.distributed.broadcast(t, rank)
    return t.tolist()


def to_distributed(self, sync_bn=True, **kwargs):
    """fastai's `Learner.to_distributed`, plus a clear error when `sync_bn=True` meets BatchNorm layers
    on a CPU process group: `SyncBatchNorm` only runs on GPUs, so use `distrib_ctx(sync_bn=False)`
    there (each rank then normalises with its own batch statistics, as DDP does by default)."""
    res = _fastai_to_distributed(self, sync_bn, **kwargs)
    if sync_bn and cpu_collectives() and any(isinstance(m, BN_TYPES) for m in self.model.modules()):
        self.detach_distributed()
        raise ValueError("sync_bn=True needs GPUs (SyncBatchNorm cannot run on CPU tensors); "
                         "on CPU processes use `learn.distrib_ctx(sync_bn=False)`")
    return res


def _install_patches():
    "Patch fastai's two distributed methods, keeping fastai's originals once (importing twice patches once)."
    global _fastai_broadcast, _fastai_to_distributed
    DistributedDL = _fastai_distributed()
    if DistributedDL is None: return False
    _fastai_broadcast = getattr(DistributedDL._broadcast, '_fastai_l5_original', DistributedDL._broadcast)
    _fastai_to_distributed = getattr(Learner.to_distributed, '_fastai_l5_original', Learner.to_distributed)
    for cls, f, orig in ((DistributedDL, _broadcast, _fastai_broadcast), (Learner, to_distributed, _fastai_to_distributed)):
        patch_to(cls)(f)
        getattr(cls, f.__name__)._fastai_l5_original = orig
    return True


_fastai_broadcast = _fastai_to_distributed = None
PATCHED = _install_patches()


def _failure_text(out, n=4000):
    """The ranks' own errors in torchrun's output: their `[rankN]:` lines (a Python exception), else the end of
    `out`, where a rank that died in native code (a C++ abort prints no traceback) left its last words just
    before torchrun's own traceback and summary of which rank failed."""
    ranks = [l for l in out.splitlines() if l.startswith('[rank')]
    return '\n'.join(ranks)[-n:] if ranks else out[-n:]


def _stop(proc, grace=20):
    """End a torchrun launch: SIGTERM lets torchrun stop its workers (each runs in a session of its own, out of
    reach of a signal to torchrun's group), then SIGKILL for whatever is left of torchrun's group."""
    os.killpg(proc.pid, signal.SIGTERM)
    try: return proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()  # a worker that outlived torchrun may still hold the pipes: do not wait for them
        return '', f'torchrun did not stop within {grace}s of SIGTERM and was killed'



def launch_cpu(script, *args, nproc=2, timeout=600, env=None, check=True):
    """Run `script` (with `args`) in `nproc` CPU processes under `torchrun --standalone` with
    `ACCELERATE_USE_CPU=1`, the way to use `learn.distrib_ctx(sync_bn=False)` without GPUs.
    Returns the `subprocess.CompletedProcess` (output captured as text); with `check`, a failed run raises
    `RuntimeError` carrying the ranks' tracebacks. A run still going after `timeout` seconds (a deadlock)
    is killed with all its processes, and raises `TimeoutError`."""
    check_count('nproc', nproc)
    if not os.path.isfile(script): raise FileNotFoundError(f"no script at {str(script)!r}")
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           str(script), *map(str, args)]
    full_env = {**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1', **(env or {})}
    # its own session, so a timeout can reach torchrun and its process group
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try: out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _stop(proc)
        raise TimeoutError(f"{nproc} processes of {script} did not finish in {timeout}s (a deadlock?); "
                           f"they were stopped. Last output:\n{_failure_text(out + err)}") from None
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {res.returncode}:\n{_failure_text(out + err)}")
    return res
