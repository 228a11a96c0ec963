"""Declared logs (API §10) and callbacks found by type: every telemetry callback's `logs` cover every column of its
frames, the loggers route by them, and a renamed subclass of each callback is found by `diagnose`, the loggers
(read back from a real TensorBoard event file) and the report."""
import pytest
from fastai.callback.core import Callback

from fastai_l5.all import *
from fastai_l5.core import INDEX_MEANINGS
from fastai_l5.report import write_report
from helpers import make_learn

DLS = dict(n_rows=500, bs=64)

# the tag prefix, x column and measured columns of each log, as API.md §2-4 and §9 name them
API_LOGS = {
    MomentumLogger: [('momentum', 'step', ['epoch', 'layer'],
                      ['grad_norm', 'mom_norm', 'cos_mom_grad', 'sign_flip', 'update_norm', 'param_norm',
                       'update_ratio', 'beta', 'sqr_avg_rms'])],
    DropoutSchedule: [('dropout', 'step', ['epoch', 'pct', 'layer'], ['p'])],
    BNDrift: [('bn', 'step', ['epoch', 'layer'], ['mean_shift', 'var_shift', 'mean_drift']),
              ('bn_precise', 'epoch', ['layer'], ['mean_gap', 'var_gap', 'valid_loss', 'valid_loss_precise'])],
    PreciseBNCallback: [('bn_precise', 'epoch', ['layer'], ['mean_gap', 'var_gap'])],
}


class Momenta(MomentumLogger): pass
class Dropper(DropoutSchedule): pass
class Drift(BNDrift): pass
class Precise(PreciseBNCallback): pass


def renamed_callbacks():
    return [Momenta(every=2), Dropper(0.2), Drift(precise_every=1, precise_batches=2), Precise(n_batches=2)]


@pytest.mark.parametrize('cls', list(API_LOGS), ids=lambda c: c.__name__)
def test_declared_logs_are_the_api_ones_with_a_meaning_each(cls):
    got = [(log.name, log.x, list(log.index), list(log.columns)) for log in cls.logs]
    assert got == API_LOGS[cls]
    for log in cls.logs:
        assert all(isinstance(v, str) and len(v) > 10 for v in log.columns.values()), log.name
        assert all(c in INDEX_MEANINGS for c in [log.x, *log.index])
    table = log_table(cls)
    for log in cls.logs:
        for c in log.all_columns: assert f'| `{c}` |' in table and log.meaning(c) in table.replace('\\|', '|')
    assert '<table' in log_table(cls, fmt='html') and len(log_table(cls, fmt='frame')) == sum(len(l.all_columns) for l in cls.logs)
    with pytest.raises(ValueError, match='Invalid fmt'): log_table(cls, fmt='pdf')


def test_log_table_of_a_class_without_logs():
    with pytest.raises(ValueError, match='declares no logs'): log_table(object)


def test_the_new_cosine_is_documented_where_it_is_declared():
    meaning = MomentumLogger.logs[0].columns['cos_mom_grad']
    assert 'm_{t−1}' in meaning and 'before' in meaning


@pytest.fixture(scope='module')
def renamed(dls, tmp_path_factory):
    "One short fit with a renamed subclass of every callback, and TensorBoard attached."
    from fastai.callback.tensorboard import TensorBoardCallback
    pytest.importorskip('tensorboard')
    tb_dir = tmp_path_factory.mktemp('tb')
    cbs = renamed_callbacks()
    learn = make_learn(dls, cbs=cbs + [TensorBoardCallback(log_dir=str(tb_dir), trace_model=False, log_preds=False)],
                       layers=(8, 4), ps=0.1)
    with learn.no_bar(): learn.fit(2, 1e-2)
    return learn, cbs, tb_dir


def test_frames_have_the_declared_columns(renamed):
    learn, cbs, _ = renamed
    for cb in cbs:
        for log in cb.logs:
            df = getattr(cb, log.attr)
            assert list(df.columns) == log.all_columns and len(df), (type(cb).__name__, log.name)


def test_find_cb_finds_a_subclass(renamed):
    learn, cbs, _ = renamed
    for base, cb in zip(API_LOGS, cbs): assert find_cb(learn, base) is cb
    assert find_cb(learn, type('Other', (Callback,), {})) is None


def test_diagnose_finds_renamed_callbacks(renamed):
    learn, _, _ = renamed
    findings = diagnose(learn)
    missing = findings[findings.kind == 'missing_callback']
    assert not len(missing), missing.evidence.tolist()


def test_tensorboard_gets_renamed_callbacks_by_their_declared_logs(renamed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    learn, cbs, tb_dir = renamed
    acc = EventAccumulator(str(tb_dir), size_guidance={'scalars': 0})
    acc.Reload()
    tags = set(acc.Tags()['scalars'])
    expected = set()
    for cb in cbs:
        for log in cb.logs:
            df = getattr(cb, log.attr)
            expected |= {f'{log.name}/{c}/{layer}' for c in log.tagged for layer in df.layer.unique()}
    assert expected and expected <= tags
    # only the declared columns go: no `valid_loss` per layer, no index column
    ours = {t for t in tags if t.split('/')[0] in ('momentum', 'dropout', 'bn', 'bn_precise')}
    assert ours == expected
    momenta = cbs[0].df
    layer = momenta.layer.iloc[0]
    events = acc.Scalars(f'momentum/grad_norm/{layer}')
    rows = momenta[momenta.layer == layer]
    assert [e.step for e in events] == rows.step.tolist()
    assert [e.value for e in events] == pytest.approx(rows.grad_norm.tolist(), rel=1e-6)


def test_report_shows_renamed_callbacks(renamed, tmp_path):
    learn, _, _ = renamed
    page = write_report(learn, tmp_path / 'r').read_text()
    for heading in ('Momentum (MomentumLogger)', 'Dropout (DropoutSchedule)', 'Batch norm (BNDrift)'):
        assert heading in page
    for name in ('momentum_logger.csv', 'dropout_schedule.csv', 'bn_drift.csv', 'bn_drift_precise_df.csv'):
        assert (tmp_path / 'r' / name).exists()


def test_the_report_legend_reads_the_declared_logs():
    "Every measured column's legend in the report is its declaration's meaning and docs page, written once."
    from fastai_l5.report import LEGEND
    for cls in (MomentumLogger, DropoutSchedule, BNDrift, PreciseBNCallback):
        for log in cls.logs:
            for c, meaning in log.columns.items():
                if c == 'valid_loss': continue        # the report's general entry: the Training table's column too
                text, page = LEGEND[c]
                assert text.startswith(meaning) and page == log.doc, (cls.__name__, c)
    assert 'epoch mean' in LEGEND['cos_mom_grad'][0] and 'epoch mean' not in LEGEND['grad_norm'][0]
