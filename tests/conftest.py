"""Shared fixtures: the example loaders each test module trains on, and the notebooks in nbs/, executed once per
test session for both the notebook tests and the docs site."""
from pathlib import Path

import pytest

from fastai_l5._docs import execute_notebooks
from fastai_l5.data import example_dls

NBS = Path(__file__).resolve().parent.parent / 'nbs'


@pytest.fixture(scope='module')
def dls(request):
    """Diamonds loaders sized by the test module's `DLS = dict(n_rows=..., bs=...)` (default 3000 rows, bs 256:
    9 training batches), built once per module."""
    size = {'n_rows': 3000, 'bs': 256, **getattr(request.module, 'DLS', {})}
    return example_dls('diamonds', **size)


@pytest.fixture(scope='session')
def executed_notebooks(tmp_path_factory):
    """Every notebook of nbs/ run top to bottom, as many at a time as the machine has cores (at most 4; one torch
    thread each: `fastai_l5._docs.execute_notebooks`). Returns the folder of executed copies and `{notebook name:
    error text}` for those whose cells raised. The executed copies are also stored in the jupyter-cache at
    `folder/'.docs_cache'/'jupyter'`, so a docs build given `cache=folder/'.docs_cache'` runs none again."""
    folder = tmp_path_factory.mktemp('executed')
    errors, _ = execute_notebooks(sorted(NBS.glob('*.ipynb')), folder/'.docs_cache'/'jupyter', copies=folder)
    return folder, errors
