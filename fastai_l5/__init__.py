"fastai_l5: see what momentum, dropout and batch norm do inside fastai tabular models."
__version__ = '0.1.0'
