"`fastai-l5 bench`: the quick smoke run's structure and files. No timing assertions: speed is what the full run reports."
import contextlib
import io
import os
import json
import math

import pandas as pd
import pytest
import torch

import time

from fastai.callback.core import Callback

from fastai_l5.bench import BenchConfig, bench, SECTIONS, format_table
from fastai_l5.bench import common, fits, run
from helpers import make_learn

DLS = dict(n_rows=600, bs=64)
STATUSES = {'ok', 'MISSED', 'info', 'baseline', 'n/a'}


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    "One quick run shared by the tests: (results, output folder, what it printed)."
    out = tmp_path_factory.mktemp('bench') / 'results'
    buf, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)   # structure only: one thread keeps a busy CI machine from slowing it tenfold
    try:
        with contextlib.redirect_stdout(buf): res = bench(quick=True, out=str(out))
    finally: torch.set_num_threads(threads)
    return res, out, buf.getvalue()


def _ratio_columns(df): return [c for c in df.columns if 'ratio' in c or c == 'speedup']


@pytest.mark.slow
def test_sections_and_statuses(quick):
    res, _, _ = quick
    assert tuple(res) == tuple(SECTIONS)
    for name, df in res.items():
        assert isinstance(df, pd.DataFrame) and len(df), name
        assert {'target', 'status'} <= set(df.columns), name
        assert set(df['status']) <= STATUSES, (name, set(df['status']))
        assert df['target'].map(lambda t: isinstance(t, str) and len(t) > 0).all(), name


@pytest.mark.slow
def test_ratios_are_finite_positive(quick):
    res, _, _ = quick
    for name, df in res.items():
        cols = ['share'] if name == 'diagnose' else _ratio_columns(df)
        assert cols, f"{name} has no ratio column"
        for c in cols:
            vals = df[c].astype(float)
            assert vals.map(math.isfinite).all() and (vals > 0).all(), (name, c, vals.tolist())
    # our callbacks are judged on their in-callback share: 'ok' exactly when within the target
    ov = res['overhead'].set_index('variant')
    floor = ov.loc[fits.READ_FLOOR, 'share']
    limits = {'+MomentumLogger': fits.FLOOR_FACTOR * floor, '+MomentumLogger(every=10)': fits.SHARE_TARGETS['every10'],
              '+DropoutSchedule': fits.SHARE_TARGETS['DropoutSchedule'], '+BNDrift': fits.SHARE_TARGETS['BNDrift'],
              '+all three': fits.SHARE_TARGETS['all three']}
    for v, limit in limits.items():
        assert ov.loc[v, 'status'] == ('ok' if ov.loc[v, 'share'] <= limit else 'MISSED'), v
        assert ov.loc[v, 'target'].startswith('share <=')
    assert ov.loc['plain', 'ratio'] == 1.0


OURS = ['+MomentumLogger', '+MomentumLogger(every=10)', '+DropoutSchedule', '+BNDrift', '+all three']
WANDB = ['+W&B (WandbCallback, log=None)', '+W&B gradients, log_freq=1000', '+W&B gradients, log_freq=10',
         '+W&B gradients, log_freq=1', '+MomentumLogger -> W&B', '+MomentumLogger(every=10) -> W&B',
         '+TensorBoard (TensorBoardCallback)', '+MomentumLogger -> TensorBoard', '+MomentumLogger(every=10) -> TensorBoard']


@pytest.mark.slow
def test_overhead_rows(quick):
    ov = quick[0]['overhead']
    assert list(ov['threads']) == [1] * len(ov)   # the fixture runs at one thread: one pass, not two
    assert list(ov['variant']) == ['plain', 'plain (A/A repeat)', *OURS, fits.READ_FLOOR, '+ActivationStats (fastai)',
                                   *WANDB]
    by = ov.set_index('variant')
    assert (by.loc[[fits.READ_FLOOR, '+ActivationStats (fastai)', *WANDB], 'status'] == 'info').all()
    assert (ov['min_s'] <= ov['median_s']).all() and (ov['median_s'] <= ov['max_s']).all()
    assert (ov['ratio_min'] <= ov['ratio']).all() and (ov['ratio'] <= ov['ratio_max']).all()
    assert (ov['rounds'] == BenchConfig.quick().rounds).all()
    # nothing of ours runs in the plain fits; every callback variant spends some of its fit inside its callbacks
    assert (by.loc[['plain', 'plain (A/A repeat)'], 'share'] == 0).all()
    assert (by.loc[OURS + [fits.READ_FLOOR] + WANDB, 'share'] > 0).all() and (by['share'] < 1).all()
    # MomentumLogger is set against W&B's gradient histograms at the same frequency
    assert by.loc[['+MomentumLogger', '+MomentumLogger -> W&B'], 'vs_wandb_grads'].notna().all() or \
        by.loc['+W&B gradients, log_freq=1', 'ratio'] <= 1
    assert by.loc[['plain', '+BNDrift'] + WANDB[:4], 'vs_wandb_grads'].isna().all()


@pytest.mark.slow
def test_optimizer_rows(quick):
    op = quick[0]['optimizer']
    assert len(op) == 3 * 2 * 2                         # families x models x (fastai, torch)
    assert set(op['versus']) == {'fastai native', 'torch foreach'}
    assert op['n_tensors'].max() >= 60                  # the deep model
    assert (op['ours_us'] > 0).all() and (op['other_us'] > 0).all()
    pd.testing.assert_series_equal(op['speedup'], 1 / op['ratio'], check_names=False)


@pytest.mark.slow
def test_memory_rows(quick):
    mem = quick[0]['memory'].set_index('variant')
    assert mem.loc['plain', 'log_rows'] == 0
    for v in ('+MomentumLogger', '+DropoutSchedule', '+BNDrift'):
        assert mem.loc[v, 'log_rows'] > 0 and mem.loc[v, 'log_bytes_per_1k_steps'] > 0, v
    # all three log what the three log alone
    assert mem.loc['+all three', 'log_rows'] == sum(mem.loc[v, 'log_rows'] for v in
                                                    ('+MomentumLogger', '+DropoutSchedule', '+BNDrift'))
    assert (mem['export_bytes'] > 0).all()


@pytest.mark.slow
def test_precise_bn_and_scaling_rows(quick):
    res = quick[0]
    assert list(res['precise_bn']['batches_from']) == ['training loader', 'preloaded batches']
    sc = res['scaling']
    assert set(sc['axis']) == {'width', 'rows'}
    assert sc[sc.axis == 'rows']['rows'].is_monotonic_increasing


@pytest.mark.slow
def test_diagnose_and_report_threads_rows(quick):
    res = quick[0]
    d = res['diagnose'].iloc[0]
    assert d['share_min'] <= d['share'] <= d['share_max'] and d['target'] == 'share <= 15%'
    assert abs(d['share'] - d['diagnose_s'] / d['fit_s']) < 1e-9       # one round: the share is that round's
    rt = res['report_threads']
    assert sorted(zip(rt['load'], rt['threads'])) == sorted({(0, 1), (0, os.cpu_count())})   # the quick run: no load
    assert (rt[rt['threads'] == 1]['ratio'] == 1).all() and (rt['train_s'] > 0).all()


@pytest.mark.slow
def test_files_written(quick):
    res, out, _ = quick
    for name, df in res.items():
        back = pd.read_csv(out / f'{name}.csv')
        assert list(back.columns) == list(df.columns) and len(back) == len(df), name
    doc = json.loads((out / 'bench.json').read_text())
    for k in ('cpu', 'cores', 'torch', 'fastai', 'date', 'load_avg_end'):
        assert doc['machine'].get(k) is not None, k
    assert doc['config']['quick'] is True and doc['notes']
    assert {k: len(v) for k, v in doc['sections'].items()} == {k: len(v) for k, v in res.items()}
    md = (out / 'bench.md').read_text()
    assert 'Measured on' in md and md.count('### ') == len(SECTIONS)


@pytest.mark.slow
def test_stdout_table(quick):
    _, _, text = quick
    for section in SECTIONS.values(): assert section.title in text
    assert 'targets met' in text and 'Noise floor' in text and common.machine_info()['cpu'] in text


def test_format_table():
    df = pd.DataFrame(dict(variant=['a', 'bb'], median_s=[1.23456, 2.], ratio=[1.0, float('nan')],
                           export_bytes=[1234567, 89], status=['ok', 'MISSED']))
    lines = format_table(df).splitlines()
    assert lines[0].split() == list(df.columns) and len(lines) == 4
    assert '1.235' in lines[2] and '1,234,567' in lines[2] and 'nan' in lines[3]


def test_status_and_pairing():
    assert common.status(1.01, 1.02) == 'ok' and common.status(1.03, 1.02) == 'MISSED'
    assert common.status(float('nan'), 1.02) == 'n/a'
    # ratios pair runs of the same round: a slow round slows both sides and cancels out
    med, lo, hi = common.paired([2., 4., 1.1], [2., 4., 1.])
    assert (med, lo, hi) == (1.0, 1.0, pytest.approx(1.1))


def test_the_command_passes_its_options_to_bench(monkeypatch):
    "`fastai-l5 bench` parses its options in cli (the one entry point) and calls `fastai_l5.bench.bench` with them."
    import fastai_l5.bench
    from fastai_l5.cli import main as cli_main
    seen = {}
    monkeypatch.setattr(fastai_l5.bench, 'bench', lambda out, only, config: seen.update(out=out, only=only, config=config))
    assert cli_main(['bench', '--quick', '--out', 'somewhere', '--only', 'overhead', 'memory', '--no-wandb']) == 0
    assert seen['out'] == 'somewhere' and seen['only'] == ['overhead', 'memory']
    assert seen['config'] == BenchConfig.quick(wandb=False)
    assert cli_main(['bench']) == 0
    assert seen == dict(out='l5_bench', only=None, config=BenchConfig())


def test_a_section_is_one_registry_entry(monkeypatch, tmp_path):
    "A new section is a `Section` in `run.SECTIONS`: it runs after those it needs, and its table is printed and written."
    seen = []
    def extra(r):
        seen.append(sorted(r.learners))
        return pd.DataFrame(dict(thing=['x'], ratio=[1.0], **common.judged(1.0, 2.0, '<= 2x')))
    monkeypatch.setattr(run, 'SECTIONS', {**run.SECTIONS, 'extra': run.Section('extra', '6. Extra', extra,
                                                                               needs=('precise_bn',))})
    assert run.select(['extra']) == ['precise_bn', 'extra']
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = bench(only=['extra'], out=tmp_path, config=BenchConfig.quick(wandb=False))
    assert list(res) == ['precise_bn', 'extra'] and seen == [['plain']]     # precise_bn's plain learner, shared
    text = buf.getvalue()
    assert text.index('3. precise_bn') < text.index('6. Extra') < text.index('targets met')
    assert pd.read_csv(tmp_path / 'extra.csv')['status'].tolist() == ['ok']


def test_unknown_section_is_a_usage_error(capsys):
    "Before any work: the section names are checked first, and the error names the known ones."
    from fastai_l5.cli import main as cli_main
    assert cli_main(['bench', '--only', 'overheads']) == 2
    err = capsys.readouterr().err
    assert "unknown bench section(s) ['overheads']" in err and 'precise_bn' in err
    assert run.select(['memory']) == ['overhead', 'memory']   # memory reads the overhead section's learners
    assert run.select(None) == list(SECTIONS)


def test_every_variant_has_an_explicit_role():
    variants = fits.variants(BenchConfig.quick(), with_wandb=True, tb_dir='unused')
    assert len({v.name for v in variants}) == len(variants)
    for v in variants:
        assert (v.role == 'ours') == (v.target is not None), v.name
        assert v.role == 'ours' or v.role in common.ROLE_COLUMNS, v.name
    assert [v.name for v in variants if v.watch_freq] == WANDB[1:4]


def test_judged():
    assert common.judged(0.004, 0.005, 'share <= 0.5%') == dict(target='share <= 0.5%', status='ok')
    assert common.judged(0.006, 0.005, 'x')['status'] == 'MISSED' and common.judged(math.nan, 0.005, 'x')['status'] == 'n/a'


class _Sleeper(Callback):
    "Spends a known time in one event method, and calls another event method from inside it."
    def after_batch(self):
        time.sleep(0.01)
        self.after_step()
    def after_step(self): time.sleep(0.002)


def test_event_clock_measures_time_inside_event_methods(dls):
    """The clock counts the time inside the callback's event methods, from outside (the class is restored after),
    and a nested event call once."""
    learn = make_learn(dls, cbs=_Sleeper(), layers=(4,), ps=0.1, embed_p=0.1)
    n_batches, own = len(dls.train), dict(vars(_Sleeper))
    wall, _, share = fits.timed_fit(learn, [_Sleeper])
    inside = share * wall
    # after_batch (10 ms + the nested after_step 2 ms) in training and validation batches, after_step in training
    n_valid = len(dls.valid)
    expected = (n_batches + n_valid) * 0.012 + n_batches * 0.002
    assert expected <= inside <= expected + 0.5 * wall, (inside, expected, wall)
    assert dict(vars(_Sleeper)) == own   # the class is as it was


def test_read_floor_reads_every_tensor_and_changes_nothing(dls, monkeypatch):
    """The reference callback only reads: a fit with it ends with the same weights as without; and it reads g, p,
    the copy of p and every optimizer-state tensor once per step."""
    def fitted(cbs):
        learn = make_learn(dls, cbs=cbs, layers=(8,), ps=0.1, embed_p=0.1)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
        return learn
    seen = []
    norm = torch._foreach_norm
    monkeypatch.setattr(torch, '_foreach_norm', lambda ts, *a: (seen.append(len(ts)), norm(ts, *a))[1])
    with_floor = fitted([fits.ReadFloor()])
    monkeypatch.undo()
    plain = fitted([])
    for a, b in zip(with_floor.model.parameters(), plain.model.parameters()): assert torch.equal(a, b)
    n_params = len([p for p in plain.model.parameters() if p.requires_grad])
    n_state = sum(isinstance(t, torch.Tensor) for st in with_floor.opt.state.values() for t in st.values())
    assert seen == [3 * n_params + n_state] * len(dls.train)
