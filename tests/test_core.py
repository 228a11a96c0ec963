"Tests of the shared pieces in fastai_l5.core."
import numpy as np
import pandas as pd
import pytest
import torch
from fastai.tabular.all import tabular_learner
from fastai.callback.core import Callback
from matplotlib.figure import Figure

from fastai_l5.core import Log, LogTable, StepCallback, check_in_range, layer_params, plot_per_layer, rank0_log, unwrap_model
from helpers import SkipEvery


DLS = dict(n_rows=1000, bs=128)


def test_logtable_blocks_scalars_and_tensors():
    t, seen = LogTable(['step', 'layer', 'v']), []
    t.sink = seen.append
    t.append(step=1, layer=['a', 'b'], v=torch.tensor([1., 2.]))
    t.append(step=2, layer=['a', 'b'], v=np.array([3., float('nan')]))
    assert t.nbytes() == 0 and not seen  # queued, not yet on the host
    block = t.flush()
    assert seen == [block] and set(block) == {'step', 'layer', 'v'}  # the sink gets each host block
    assert block['step'].tolist() == [1, 1, 2, 2] and isinstance(block['v'], np.ndarray)
    t.append(step=3, layer='a', v=5.)
    assert len(t) == 5 and t.flush() is not None and t.flush() is None
    df = t.df
    assert list(df.columns) == ['step', 'layer', 'v']
    assert df.step.tolist() == [1, 1, 2, 2, 3] and df.layer.tolist() == ['a', 'b', 'a', 'b', 'a']
    assert np.isnan(df.v[3]) and df.v[4] == 5.
    with pytest.raises(KeyError, match='missing columns'): t.append(step=1)


def test_logtable_streams_to_csv(tmp_path):
    path = tmp_path / 'log.csv'
    t = LogTable(['step', 'x'], path=path, keep=False)
    for i in range(3): t.append(step=i, x=torch.tensor([i * 1.])); t.flush()
    assert t.nbytes() == 0  # nothing kept in memory
    on_disk = pd.read_csv(path)
    assert on_disk.step.tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(t.df, on_disk)
    with pytest.raises(ValueError, match='keep=False needs a `path`'): LogTable(['x'], keep=False)


def test_rank0_log_streams_on_rank0_only(tmp_path, monkeypatch):
    import fastai_l5.core as core
    path = tmp_path / 'log.csv'
    assert rank0_log(['x'], path=path, keep=False).path == path and path.exists()
    path.unlink()
    monkeypatch.setattr(core, 'rank_distrib', lambda: 1)
    other = rank0_log(['x'], path=path, keep=False)
    assert other.path is None and other.keep and not path.exists()  # never touches rank 0's file
    with pytest.raises(ValueError, match='keep=False needs a `path`'): rank0_log(['x'], keep=False)


def test_unwrap_model_looks_through_data_parallel(dls):
    model = tabular_learner(dls, layers=[8]).model
    wrapped = torch.nn.DataParallel(model)
    assert unwrap_model(wrapped) is model and unwrap_model(model) is model
    assert [l for l, _, _ in layer_params(wrapped)] == [l for l, _, _ in layer_params(model)]


def test_check_in_range_names_argument():
    assert check_in_range('mom', 0.5) == 0.5
    with pytest.raises(ValueError, match=r"Invalid mom: 1.0 \(must be in \[0, 1\)\)"): check_in_range('mom', 1.0, 0., 1.)
    with pytest.raises(ValueError, match='eps'): check_in_range('eps', 0., 0., float('inf'), lo_open=True)
    with pytest.raises(ValueError, match='nan'): check_in_range('p', float('nan'))


class StepRecorder(StepCallback):
    epoch_columns = {'n_steps_seen': 'seen'}
    def before_fit(self):
        super().before_fit()
        if not hasattr(self, 'steps'): self.steps = []
    def after_step(self):
        if self.count_step(): self.steps.append(self.n_step)
    def seen(self): return len(self.steps)


def test_step_counting_skips_cancelled_steps_and_spans_fits(dls):
    rec = StepRecorder()
    learn = tabular_learner(dls, layers=[8], cbs=[rec, SkipEvery(2)])
    n_batches = len(dls.train)
    learn.fit(1, 1e-3)
    real = (n_batches + 1) // 2
    assert rec.n_step == real and rec.steps == list(range(1, real + 1))
    learn.validate()
    learn.fit(1, 1e-3)
    assert rec.n_step == 2 * real
    assert 'n_steps_seen' in learn.recorder.metric_names
    assert learn.recorder.values[-1][-1] == 2 * real
    assert not any(getattr(m, 'name', '') == 'n_steps_seen' for m in learn.metrics)
    assert len(learn.validate()) == 1  # validate returns the loss alone: no extra columns


def test_layer_params_and_plot(dls):
    learn = tabular_learner(dls, layers=[8])
    layers = {l for l, _, _ in layer_params(learn.model)}
    assert {'embeds.0', 'bn_cont', 'layers.0.0', 'layers.0.2', 'layers.1.0'} <= layers
    df = pd.DataFrame(dict(step=[1, 2, 1, 2], layer=['a', 'a', 'b', 'b'], s=[1., 2., 3., 4.]))
    fig = plot_per_layer(df, 's')
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 2
    with pytest.raises(ValueError, match='unknown stats'): plot_per_layer(df, 'nope')
    with pytest.raises(ValueError, match='unknown layers'): plot_per_layer(df, 's', layers=['zz'])
    with pytest.raises(ValueError, match='nothing logged'): plot_per_layer(df.iloc[:0], 's')


class LossLog(StepCallback):
    "A minimal pipeline user: stages the training loss (a tensor, left on its device) of every real step."
    logs, flush_every = (Log('loss', 'step', ('epoch',), {'loss': 'the training loss of the step'}),), 3
    epoch_columns = {'mean_loss': 'epoch_loss'}
    def __init__(self, path=None, keep=True): super().__init__(); self.open_log(path, keep)
    def after_step(self):
        if self.count_step() and self.logs_here: self.stage((self.n_step, self.learn.epoch, self.learn.loss.detach()))
    def rows(self, entries):
        steps, epochs, losses = zip(*entries)
        return dict(step=list(steps), epoch=list(epochs), loss=torch.stack(losses))
    def epoch_loss(self): return self.epoch_mean('loss')


class LossRecorder(Callback):
    order = 45
    def before_fit(self): self.losses = getattr(self, 'losses', [])
    def after_step(self): self.losses.append(self.learn.loss.item())


def test_pipeline_stages_flushes_and_feeds_the_sink(dls, tmp_path):
    path = tmp_path / 'loss.csv'
    log, rec, blocks = LossLog(path=path), LossRecorder(), []
    log.attach_loggers = lambda: setattr(log.table, 'sink', blocks.append)  # what a TensorBoard/W&B fan-out plugs into
    learn = tabular_learner(dls, layers=[8], cbs=[log, rec])
    n = len(dls.train)
    learn.fit(2, 1e-3)
    df = log.df
    assert df.step.tolist() == list(range(1, 2 * n + 1)) and df.epoch.tolist() == [0] * n + [1] * n
    np.testing.assert_allclose(df.loss, rec.losses, rtol=1e-6)
    # one policy: blocks of `flush_every` steps, and whatever is left at the end of each training phase
    sizes = [len(b['step']) for b in blocks]
    assert sum(sizes) == 2 * n and max(sizes) == 3 and sizes[:n // 3] == [3] * (n // 3)
    assert pd.read_csv(path).step.tolist() == df.step.tolist()  # streamed as it went
    # the progress table's column is the epoch mean of the logged column
    names = learn.recorder.metric_names[1:-1]
    for epoch, values in enumerate(learn.recorder.values):
        assert dict(zip(names, values))['mean_loss'] == pytest.approx(df[df.epoch == epoch].loss.mean(), rel=1e-6)


def test_pipeline_unpickles_a_fresh_log_and_logs_on_rank0_only(dls, tmp_path, monkeypatch):
    import pickle
    import fastai_l5.core as core
    path = tmp_path / 'loss.csv'
    log = LossLog(path=path, keep=False)
    learn = tabular_learner(dls, layers=[8], cbs=[log])
    learn.fit(1, 1e-3)
    on_disk = pd.read_csv(path)
    copy = pickle.loads(pickle.dumps(log))
    assert copy.n_step == log.n_step > 0 and len(copy.df) == 0 and copy.table.path is None
    assert pd.read_csv(path).equals(on_disk)  # the copy left the file alone
    monkeypatch.setattr(core, 'rank_distrib', lambda: 1)
    other = LossLog()
    tabular_learner(dls, layers=[8], cbs=[other]).fit(1, 1e-3)
    assert other.n_step == len(dls.train) and len(other.df) == 0


def test_import_shows_figures_in_jupyter_without_overriding_a_chosen_format():
    "Importing fastai_l5 in a kernel registers PNG for `Figure`s only where no image format handles them yet."
    import fastai_l5
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.core.pylabtools import select_figure_formats
    ip = InteractiveShell.instance()
    fmt = ip.display_formatter.formatters
    try:
        ip.kernel = object()  # what makes it a Jupyter kernel to us
        fastai_l5._show_figures_inline()
        assert fmt['image/png'].lookup_by_type(Figure) is not None
        select_figure_formats(ip, {'svg'})  # the user's own choice...
        fastai_l5._show_figures_inline()
        with pytest.raises(KeyError): fmt['image/png'].lookup_by_type(Figure)  # ...is kept
    finally:
        del ip.kernel
        InteractiveShell.clear_instance()
