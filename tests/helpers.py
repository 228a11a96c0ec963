"Small pieces several test modules share."
from fastai.callback.core import Callback, CancelStepException


class SkipEvery(Callback):
    """Cancels every `n`-th optimizer step in `before_step` at MixedPrecision's order (10), as an
    overflow under mixed precision or `GradientAccumulation` between its steps would."""
    order = 10
    def __init__(self, n=2): self.n, self.i = n, 0
    def before_step(self):
        self.i += 1
        if self.i % self.n == 0: raise CancelStepException()
