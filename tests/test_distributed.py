"""fastai_l5 under fastai's `distrib_ctx` on 2 CPU processes (torchrun + gloo), and the gloo fix itself."""
import importlib
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from fastai.distributed import DistributedDL
from fastai.learner import Learner
from fastcore.test import test_close as close_enough

import fastai_l5.distributed as l5_distributed
from fastai_l5.all import *

import ddp_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    "Run tests/ddp_script.py on 2 CPU processes once; what each rank saw, by rank."
    out = tmp_path_factory.mktemp('ddp')
    env = {'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    launch_cpu(ROOT / 'tests' / 'ddp_script.py', out, nproc=2, timeout=240, env=env)
    return [torch.load(out / f'rank{r}.pt', weights_only=False) for r in range(2)]


@pytest.mark.slow
def test_two_ranks_train_in_step(ranks):
    r0, r1 = ranks
    assert (r0['rank'], r1['rank'], r0['world']) == (0, 1, 2)
    assert r0['n_shard_batches'] == r1['n_shard_batches'] == 6  # the shard is half the training set
    params = [k for k in r0['before_precise'] if 'running_' not in k and 'num_batches' not in k]
    for k in params: assert torch.equal(r0['before_precise'][k], r1['before_precise'][k]), k
    assert 'sync_bn=False' in r0['sync_bn_error']


LOGS = ['momentum', 'dropout', 'bn']


@pytest.mark.slow
@pytest.mark.parametrize('key', LOGS)
def test_logs_kept_on_rank0_only(ranks, key):
    r0, r1 = ranks
    assert len(r0[key]) > 0
    assert len(r1[key]) == 0, f"rank 1 kept {len(r1[key])} rows of {key} logs"


NAMED = ['momentum', 'dropout', 'bn']


@pytest.mark.slow
@pytest.mark.parametrize('key', NAMED)
def test_layer_names_are_the_plain_models(ranks, key):
    "Inside DDP the model is wrapped (`module.`...), but logs name layers as in a single process."
    names = {n for n, _ in ddp_script.make_learner().model.named_modules()}
    logged = set(ranks[0][key]['layer'])
    assert logged and logged <= names, sorted(logged - names)
    if key == 'dropout': assert {'layers.0.3', 'emb_drop'} <= logged


@pytest.mark.slow
def test_telemetry_reads_averaged_gradients(ranks):
    r0, r1 = ranks
    probe0, probe1 = r0['probe'], r1['probe']
    assert len(probe0) == len(probe1) == 12  # 6 batches per rank per epoch, 2 epochs
    for row0, row1 in zip(probe0, probe1):
        for layer, (seen, mean_local, local, err) in row0.items():
            assert err <= 1e-6 * max(seen, 1e-12), (layer, err)  # the step used the mean of the ranks' gradients
            close_enough(seen, row1[layer][0], eps=1e-6)
    # the ranks' own gradients differ, so the check above could fail
    assert any(abs(row0[l][2] - row1[l][2]) > 1e-4 for row0, row1 in zip(probe0, probe1) for l in row0)
    df = r0['momentum'].assign(layer=lambda d: d.layer.str.removeprefix('module.'))  # names: tested above
    for step, row in enumerate(probe0, start=1):
        logged = df[df.step == step].set_index('layer')['grad_norm']
        assert set(logged.index) == set(row), step
        for layer, (seen, *_) in row.items(): close_enough(logged[layer], seen, eps=1e-4 * max(seen, 1.))
    assert set(df.step) == set(range(1, 13))


@pytest.mark.slow
def test_precise_bn_pools_over_ranks(ranks):
    "Rank 0 pools 6 batches of its shard, rank 1 pools 4 (no deadlock): both end with the statistics of all 10."
    r0, r1 = ranks
    for k, v in r0['after_precise'].items(): close_enough(v, r1['after_precise'][k], eps=1e-6)
    learn = ddp_script.make_learner()
    learn.model.load_state_dict(r0['before_precise'])
    total = sum(ddp_script.PRECISE_BATCHES.values())
    precise_bn(learn, n_batches=total, dl=ddp_script.unshuffled_train(learn.dls), dropout=False)
    single = ddp_script.bn_buffers(learn.model)
    for k, v in single.items():
        assert not torch.allclose(v, r0['before_precise'][k]), k  # precise_bn changed it...
        close_enough(r0['after_precise'][k], v, eps=1e-4)           # ...to the single-process population value


@pytest.mark.slow
def test_bn_drift_precise_pass_under_ddp(ranks):
    "The per-epoch precise pass all-reduces like precise_bn: the same gaps and losses on both ranks, buffers restored."
    r0, r1 = (r['precise_every'] for r in ranks)
    assert r0['error'] == r1['error'] == ''
    assert len(r0['precise_df']) > 0
    pd.testing.assert_frame_equal(r0['precise_df'], r1['precise_df'])
    for k, v in r0['buffers'].items(): close_enough(v, r1['buffers'][k], eps=1e-6)


def _gloo_group(tmp_path):
    torch.distributed.init_process_group('gloo', init_method=f'file://{tmp_path}/pg', rank=0, world_size=1)


def test_index_broadcast_runs_on_gloo_without_cuda(tmp_path):
    dls = example_dls('diamonds', n_rows=300, bs=64)
    _gloo_group(tmp_path)
    try:
        assert cpu_collectives()
        ddl = DistributedDL(dls.train.new(shuffle=False, drop_last=False), rank=0, world_size=1)
        assert sum(len(b[0]) for b in ddl) == len(dls.train_ds)
    finally: torch.distributed.destroy_process_group()
    assert not cpu_collectives()


def test_other_backends_keep_fastais_broadcast(monkeypatch):
    "On NCCL (or with no group) the call goes to fastai's original, CUDA-moving `_broadcast`, untouched."
    calls = []
    monkeypatch.setattr(l5_distributed, '_fastai_broadcast', lambda self, t, rank: calls.append((t, rank)) or t)
    ddl = DistributedDL.__new__(DistributedDL)
    assert ddl._broadcast([3, 1, 2], 0) == [3, 1, 2] and calls == [([3, 1, 2], 0)]
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.distributed, 'get_backend', lambda *a: 'nccl')
    ddl._broadcast([5], 0)
    assert calls[-1] == ([5], 0)


def test_patch_is_idempotent():
    original = DistributedDL._broadcast._fastai_l5_original
    assert original.__module__ == 'fastai.distributed'
    importlib.reload(l5_distributed); importlib.reload(l5_distributed)
    assert DistributedDL._broadcast._fastai_l5_original is original
    assert Learner.to_distributed._fastai_l5_original.__module__ == 'fastai.distributed'


def test_single_process_distrib_ctx_is_a_no_op():
    "Without torchrun, `distrib_ctx` trains as usual (fastai adds nothing when WORLD_SIZE is unset)."
    learn = ddp_script.make_learner(cbs=[MomentumLogger()])
    with learn.distrib_ctx(sync_bn=False): learn.fit(1, 1e-3)
    assert len(learn.momentum_logger.df) > 0 and not hasattr(learn, 'distributed_trainer')


@pytest.mark.slow
def test_launch_cpu_reports_the_failing_rank(tmp_path):
    script = tmp_path / 'fail.py'
    script.write_text("import os\nif os.environ['RANK'] == '1': raise ValueError('rank one broke')\n")
    with pytest.raises(RuntimeError, match=r"(?s)exited with 1.*ValueError: rank one broke"): launch_cpu(script)
    assert launch_cpu(script, check=False).returncode == 1


@pytest.mark.slow
def test_launch_cpu_reports_a_native_crash(tmp_path):
    "A rank that aborts in native code prints no Python traceback: its last words still reach the error."
    script = tmp_path / 'abort.py'
    script.write_text("import os, sys\nif os.environ['RANK'] == '1':\n"
                      "    sys.stderr.write('terminate called without an active exception\\n'); sys.stderr.flush(); os.abort()\n")
    with pytest.raises(RuntimeError, match=r"(?s)exited with 1.*terminate called without an active exception.*SIGABRT"):
        launch_cpu(script)


@pytest.mark.slow
def test_launch_cpu_stops_a_deadlock(tmp_path):
    "Rank 0 waits in a barrier that rank 1 never reaches: the run is stopped, with every process it started."
    import time
    script = tmp_path / 'hang.py'
    script.write_text("import os, sys, time, torch.distributed as dist\n"
                      "open(os.path.join(sys.argv[1], f'pid{os.environ[\"RANK\"]}'), 'w').write(str(os.getpid()))\n"
                      "dist.init_process_group('gloo')\n"
                      "dist.barrier() if dist.get_rank() == 0 else time.sleep(300)\n")
    with pytest.raises(TimeoutError, match=r'did not finish in 15s'): launch_cpu(script, tmp_path, timeout=15)
    pids = [int((tmp_path / f'pid{r}').read_text()) for r in range(2)]

    def alive(pid):
        try: os.kill(pid, 0)
        except ProcessLookupError: return False
        return Path(f'/proc/{pid}/status').exists() and 'zombie' not in Path(f'/proc/{pid}/status').read_text()
    deadline = time.time() + 10
    while any(map(alive, pids)) and time.time() < deadline: time.sleep(0.2)
    assert not any(map(alive, pids))
