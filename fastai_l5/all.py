"`from fastai_l5.all import *`: every public name of fastai_l5, fastai-style, shadowing no fastai name."
from .core import *
from .data import *
from .recipe import *
from .optim import *
from .momentum import *
from .dropout import *
from .precise import *
from .batchnorm import *
from .distributed import *
from .diagnose import *
from .shift import *
from .audit import *
from .wide import *
from .loggers import *
