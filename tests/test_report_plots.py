"""`.plot()` in a script: a figure pyplot knows (so `plt.show()` shows it), `fig.savefig` writes it, and `ax=`
draws one panel into the caller's own axes."""
import matplotlib
import matplotlib.pyplot as plt
import pytest

from fastai_l5.all import DropoutSchedule, MomentumLogger, early_dropout
from helpers import make_learn

DLS = dict(n_rows=600, bs=64)


@pytest.fixture(scope='module')
def learn(dls):
    matplotlib.use('Agg')
    learn = make_learn(dls, cbs=[MomentumLogger(), DropoutSchedule(early_dropout(0.2))])
    learn.fit_one_cycle(1, 1e-2)
    return learn


def test_plots_are_pyplot_figures_outside_notebooks(learn, tmp_path):
    for fig in (learn.momentum_logger.plot(), learn.dropout_schedule.plot()):
        assert plt.fignum_exists(fig.number)  # plt.show() would show it
        fig.savefig(tmp_path / 'p.png')
        assert (tmp_path / 'p.png').read_bytes()[:4] == b'\x89PNG'
        plt.close(fig)
        assert not plt.fignum_exists(fig.number)


def test_ax_draws_one_panel_into_the_callers_axes(learn):
    fig, (left, right) = plt.subplots(1, 2)
    assert learn.momentum_logger.plot(stats='cos_mom_grad', ax=left) is fig
    assert learn.dropout_schedule.plot(ax=right, x='pct') is fig
    n_layers = learn.momentum_logger.df.layer.nunique()
    assert len(left.lines) == n_layers and left.get_title() == 'cos_mom_grad'
    assert len(right.lines) == learn.dropout_schedule.df.layer.nunique() and right.get_xlabel() == 'pct'
    with pytest.raises(ValueError, match='ax= draws one panel: pass one stat, not 6'):
        learn.momentum_logger.plot(ax=left)
    plt.close(fig)
