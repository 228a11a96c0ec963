"fastai_l5: see what momentum, dropout and batch norm do inside fastai tabular models."
__version__ = '0.1.0'


def _show_figures_inline():
    "In Jupyter, draw the pyplot-free `Figure`s our `.plot()`s return as PNG (IPython shows them as text otherwise)."
    try:
        from IPython import get_ipython
        from IPython.core.pylabtools import select_figure_formats
    except ImportError: return
    ip = get_ipython()
    if ip is not None and hasattr(ip, 'kernel'): select_figure_formats(ip, {'png'})


_show_figures_inline()
