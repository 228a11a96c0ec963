"""fastai_l5: see what momentum, dropout and batch norm do inside fastai tabular models.

What importing changes outside this package, each in one place and only where it is needed:
- here, in a Jupyter kernel whose IPython has no image format for matplotlib `Figure`s yet: PNG, so the
  pyplot-free `Figure`s our `.plot()`s return are drawn (IPython prints them as text otherwise). A format the
  user or `%matplotlib inline` already chose is left alone; outside Jupyter nothing happens.
- `fastai_l5.dropout`: `Learner.fit` gets a wrapper that gives dropout modules their own p back when a fit
  raises (fastai runs no callback event then); it calls fastai's `fit` unchanged.
- `fastai_l5.distributed`, only where `accelerate` is installed (fastai's distributed module needs it):
  `DistributedDL._broadcast` broadcasts on the host under gloo/MPI (fastai's CUDA-only code otherwise), and
  `Learner.to_distributed` fails early on `sync_bn=True` over CPU processes.
- new methods, added and never replacing one: `Learner.diagnose` (`fastai_l5.diagnose`), `Learner.precise_bn`
  (`fastai_l5.precise`).
Inside the package, `fastai_l5.loggers` adds its `attach_sinks` to `core.LOGGER_HOOKS` when imported (every
telemetry module imports it), so the callbacks reach TensorBoard/W&B without `core` importing `loggers`.
`fastai_l5.all` imports all of these."""
__version__ = '0.1.0'

_IMAGE_FORMATS = ('image/png', 'image/svg+xml', 'image/jpeg', 'application/pdf')


def _show_figures_inline():
    "In a Jupyter kernel with no image formatter for matplotlib `Figure`s, register the PNG one (see the module docstring)."
    try:
        from IPython import get_ipython
        from IPython.core.pylabtools import select_figure_formats
        from matplotlib.figure import Figure
    except ImportError: return
    ip = get_ipython()
    if ip is None or not hasattr(ip, 'kernel'): return
    formatters = ip.display_formatter.formatters
    if any(f in formatters and _handles(formatters[f], Figure) for f in _IMAGE_FORMATS): return
    select_figure_formats(ip, {'png'})


def _handles(formatter, cls):
    try: formatter.lookup_by_type(cls)
    except KeyError: return False
    return True


_show_figures_inline()
