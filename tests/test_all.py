"`from fastai_l5.all import *` exposes every public name of ../shared/API.md and shadows no fastai name."
import fastai.callback.all
import fastai.distributed
import fastai.optimizer
import fastai.tabular.all

import fastai_l5.all

API_NAMES = {'sgd_momentum', 'rmsprop', 'adam', 'opt_state', 'ewma_weights', 'effective_window', 'debias_factor',
             'MomentumLogger', 'DropoutSchedule', 'early_dropout', 'late_dropout', 'curriculum_dropout', 'fastai_ps',
             'BNDrift', 'precise_bn', 'bn_shift', 'PreciseBNCallback', 'example_dls', 'example_df', 'diagnose'}


def star_names(module):
    ns = {}
    exec(f'from {module.__name__} import *', ns)
    return {n for n in ns if not n.startswith('_')}


def test_every_api_name_is_exported():
    assert API_NAMES <= star_names(fastai_l5.all)


def test_no_fastai_name_is_shadowed():
    fastai_names = set().union(*(star_names(m) | set(dir(m)) for m in
                                 (fastai.tabular.all, fastai.callback.all, fastai.distributed, fastai.optimizer)))
    assert not star_names(fastai_l5.all) & fastai_names


def test_learner_methods_are_patched():
    from fastai.learner import Learner
    assert callable(Learner.precise_bn)
