"""Our per-layer telemetry in fastai's own logger callbacks, read back from the loggers' own files: TensorBoard's
event file through tensorboard's `EventAccumulator`, an offline W&B run through `wandb leet inspect --json` (the
W&B CLI's reader of a run's `.wandb` transaction log). The values must equal the callbacks' `.df`."""
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from fastai_l5.all import MomentumLogger, DropoutSchedule, BNDrift
from fastai_l5.loggers import block_rows, fix_wandb_config, log_tables
from helpers import make_learn

pytest.importorskip('tensorboard')
pytest.importorskip('wandb')

# (tag prefix, x column, stat columns) per frame of the three callbacks, as API.md section 9 names them
MOMENTUM_STATS = ['grad_norm', 'mom_norm', 'cos_mom_grad', 'sign_flip', 'update_norm', 'param_norm', 'update_ratio',
                  'beta', 'sqr_avg_rms']


DLS = dict(n_rows=500, bs=64)


def _fit(dls, logger, epochs=2):
    learn = make_learn(dls, cbs=[MomentumLogger(every=2), DropoutSchedule(0.2), BNDrift(precise_every=1, precise_batches=2),
                                 logger], layers=(8, 4), ps=0.1)
    with learn.no_bar(): learn.fit(epochs, 1e-2)
    return learn


def _expected(learn):
    "`{tag: (xs, values)}` from the callbacks' frames, as API.md section 9 names them."
    frames = [('momentum', 'step', MOMENTUM_STATS, learn.momentum_logger.df),
              ('dropout', 'step', ['p'], learn.dropout_schedule.df),
              ('bn', 'step', ['mean_shift', 'var_shift', 'mean_drift'], learn.bn_drift.df),
              ('bn_precise', 'epoch', ['mean_gap', 'var_gap'], learn.bn_drift.precise_df)]
    out = {}
    for prefix, x, stats, df in frames:
        assert len(df), prefix
        for layer, g in df.groupby('layer', sort=False):
            for s in stats: out[f'{prefix}/{s}/{layer}'] = (g[x].to_numpy(), g[s].to_numpy(dtype=np.float64))
    return out


def _assert_equal(got, expected, dtype):
    assert set(expected) <= set(got), sorted(set(expected) - set(got))[:5]
    for tag, (xs, vals) in expected.items():
        gx, gv = got[tag]
        np.testing.assert_array_equal(gx, xs, err_msg=tag)
        np.testing.assert_array_equal(np.asarray(gv, dtype), vals.astype(dtype), err_msg=tag)


def test_tensorboard_event_file_holds_every_column(dls, tmp_path):
    from fastai.callback.tensorboard import TensorBoardCallback
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    learn = _fit(dls, TensorBoardCallback(log_dir=str(tmp_path), trace_model=False, log_preds=False))
    acc = EventAccumulator(str(tmp_path), size_guidance={'scalars': 0})
    acc.Reload()
    ours = [t for t in acc.Tags()['scalars'] if t.split('/')[0] in ('momentum', 'dropout', 'bn', 'bn_precise')]
    got = {t: ([e.step for e in acc.Scalars(t)], [e.value for e in acc.Scalars(t)]) for t in ours}
    expected = _expected(learn)
    _assert_equal(got, expected, np.float32)   # TensorBoard keeps scalars as float32
    assert set(got) == set(expected)
    # the sinks come off with the fit: a later flush sends nothing
    assert all(t.sink is None for cb in learn.cbs for t in log_tables(cb))


def _wandb_history(run_dir):
    "Every history row of an offline run, read back with the W&B CLI."
    out = subprocess.run([sys.executable, '-m', 'wandb', 'leet', 'inspect', '--json', str(run_dir)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [r['history']['item'] for r in records if r.get('type') == 'history']


@pytest.mark.slow
def test_wandb_offline_run_holds_every_column(dls, tmp_path, monkeypatch, capsys):
    import wandb
    from fastai.callback.wandb import WandbCallback
    monkeypatch.setenv('WANDB_MODE', 'offline'); monkeypatch.setenv('WANDB_SILENT', 'true')
    fix_wandb_config()   # fastai issue #4173: WandbCallback cannot start otherwise
    run = wandb.init(project='fastai_l5_test', dir=str(tmp_path))
    try:
        learn = _fit(dls, WandbCallback(log=None, log_preds=False))
        config = dict(run.config)
    finally: run.finish()
    # the learner's config reaches W&B, objects by their name (fastai prints "could not log config" otherwise)
    assert 'could not log config' not in capsys.readouterr().out
    assert config['Learner']['model']['_name'] == 'TabularModel' and config['batch size'] == dls.bs
    history = _wandb_history(Path(run.dir).parent)
    got = defaultdict(lambda: ([], []))
    for item in history:
        for tag, v in item.items():
            prefix = tag.split('/')[0]
            if prefix in ('momentum', 'dropout', 'bn', 'bn_precise') and tag.count('/') == 2:
                x = 'epoch' if prefix == 'bn_precise' else 'step'
                got[tag][0].append(item[f'{prefix}/{x}']); got[tag][1].append(v)
    expected = _expected(learn)
    _assert_equal(got, expected, np.float64)
    assert set(got) == set(expected)
    # fastai's own rows are all there: one per training batch, at W&B steps 0, 1, 2, ...
    losses = [item['_step'] for item in history if 'train_loss' in item]
    assert losses == list(range(2 * len(dls.train)))


def test_block_rows_groups_by_step():
    block = dict(step=np.array([3, 3, 5, 5]), layer=np.array(['a', 'b', 'a', 'b'], dtype=object),
                 g=np.array([1., 2., 3., 4.], dtype=np.float32))
    assert block_rows(block, 'momentum', 'step', ['g']) == [(3, ['momentum/g/a', 'momentum/g/b'], [1., 2.]),
                                                            (5, ['momentum/g/a', 'momentum/g/b'], [3., 4.])]
    assert block_rows(dict(step=np.array([]), layer=np.array([]), g=np.array([])), 'momentum', 'step', ['g']) == []


@pytest.mark.slow
def test_without_a_logger_nothing_is_imported_or_attached():
    "In a fresh process: a fit with all three callbacks imports neither package, and no table has a sink."
    code = ("import sys\n"
            "from fastai.tabular.learner import tabular_learner, tabular_config\n"
            "from fastai_l5.all import *\n"
            "from fastai_l5.loggers import log_tables\n"
            "dls = example_dls('diamonds', n_rows=300, bs=64)\n"
            "learn = tabular_learner(dls, layers=[4], config=tabular_config(ps=0.1), "
            "cbs=[MomentumLogger(), DropoutSchedule(0.1), BNDrift()])\n"
            "with learn.no_bar(): learn.fit(1)\n"
            "assert len(learn.momentum_logger.df)\n"
            "print(sorted(m for m in ('tensorboard', 'wandb', 'torch.utils.tensorboard') if m in sys.modules),"
            " [t.sink for cb in learn.cbs for t in log_tables(cb) if t.sink is not None])\n")
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parent.parent), 'OMP_NUM_THREADS': '1'}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == '[] []'


def test_precise_bn_callback_gaps_reach_tensorboard(dls, tmp_path):
    from fastai.callback.tensorboard import TensorBoardCallback
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from fastai_l5.all import PreciseBNCallback
    learn = make_learn(dls, cbs=[PreciseBNCallback(n_batches=2),
                                 TensorBoardCallback(log_dir=str(tmp_path), trace_model=False, log_preds=False)], layers=(8, 4))
    with learn.no_bar(): learn.fit(2, 1e-2)
    acc = EventAccumulator(str(tmp_path), size_guidance={'scalars': 0})
    acc.Reload()
    df = learn.precise_bn_cb.df
    assert len(df) == 2 * df.layer.nunique()
    for layer, g in df.groupby('layer'):
        for stat in ('mean_gap', 'var_gap'):
            events = acc.Scalars(f'bn_precise/{stat}/{layer}')
            assert [e.step for e in events] == g.epoch.tolist()
            np.testing.assert_allclose([e.value for e in events], g[stat].to_numpy(), rtol=1e-6)


def test_fix_wandb_config_leaves_the_callbacks_config_untouched(dls):
    "The config W&B gets is plain values; the objects it came from (a ParamScheduler's schedules) are not changed."
    import fastai.callback.wandb as fw
    from fastai.callback.schedule import ParamScheduler, SchedCos
    fix_wandb_config()
    learn = make_learn(dls, cbs=ParamScheduler({'lr': SchedCos(1e-3, 1e-4)}))
    sched = learn.param_scheduler.scheds['lr']
    config = learn.gather_args()
    fw._format_config(config)
    assert learn.param_scheduler.scheds['lr'] is sched and callable(sched)
    assert isinstance(config['ParamScheduler']['scheds']['lr'], (str, dict))        # a plain copy, not the schedule
    assert config['Learner']['model']['_name'] == 'TabularModel'
    learn.fit(1)                                                   # the schedule still runs
