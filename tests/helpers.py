"Small pieces several test modules share: a seeded learner builder and a step-skipping callback."
from fastai.callback.core import Callback, CancelStepException
from fastai.optimizer import Adam
from fastai.tabular.learner import tabular_config, tabular_learner
from fastai.torch_core import set_seed
from fastcore.foundation import L


def make_learn(dls, opt_func=Adam, cbs=(), *, layers=(16, 8), ps=None, embed_p=0., seed=0, **kwargs):
    """A `tabular_learner` on `dls` built after `set_seed(seed)`, so the same arguments give the same model: hidden
    `layers`, dropout `ps` (one per hidden layer; None: fastai's default, none) and `embed_p` on the embeddings,
    `cbs` a callback or a list of them, `kwargs` passed on (e.g. `splitter`)."""
    set_seed(seed)
    config = tabular_config(ps=list(ps), embed_p=embed_p) if ps is not None else tabular_config(embed_p=embed_p)
    return tabular_learner(dls, layers=list(layers), config=config, opt_func=opt_func, cbs=list(L(cbs)), **kwargs)


class SkipEvery(Callback):
    """Cancels every `n`-th optimizer step in `before_step` at MixedPrecision's order (10), as an
    overflow under mixed precision or `GradientAccumulation` between its steps would."""
    order = 10
    def __init__(self, n=2): self.n, self.i = n, 0
    def before_step(self):
        self.i += 1
        if self.i % self.n == 0: raise CancelStepException()
