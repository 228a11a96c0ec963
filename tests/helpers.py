"Small pieces several test modules share: a seeded learner builder and a step-skipping callback."
import inspect

from fastai.callback.core import Callback, CancelStepException
from fastai.optimizer import Adam
from fastai.tabular.learner import tabular_config, tabular_learner
from fastai.torch_core import set_seed
from fastcore.foundation import L
from fastcore.xtras import is_listy

CONFIG_ARGS = set(inspect.signature(tabular_config).parameters)


def make_learn(dls, opt_func=Adam, cbs=(), *, layers=(16, 8), ps=None, embed_p=0., seed=0, **kwargs):
    """A `tabular_learner` on `dls` built after `set_seed(seed)`, so the same arguments give the same model: hidden
    `layers`, dropout `ps` (one per hidden layer, or one p for all; None: fastai's default, none) and `embed_p` on
    the embeddings, `cbs` a callback or a list of them. `kwargs` naming a `tabular_config` argument (e.g.
    `use_bn=False`) go to the model's config, the rest to `tabular_learner` (e.g. `splitter`, `wd`)."""
    set_seed(seed)
    config = {k: kwargs.pop(k) for k in list(kwargs) if k in CONFIG_ARGS}
    if ps is not None: config['ps'] = list(ps) if is_listy(ps) else ps
    return tabular_learner(dls, layers=list(layers), config=tabular_config(embed_p=embed_p, **config),
                           opt_func=opt_func, cbs=list(L(cbs)), **kwargs)


class SkipEvery(Callback):
    """Cancels every `n`-th optimizer step in `before_step` at MixedPrecision's order (10), as an
    overflow under mixed precision or `GradientAccumulation` between its steps would."""
    order = 10
    def __init__(self, n=2): self.n, self.i = n, 0
    def before_step(self):
        self.i += 1
        if self.i % self.n == 0: raise CancelStepException()
