"""Shared fixtures: the example loaders each test module trains on, and the notebooks in nbs/, executed once per
test session for both the notebook tests and the docs site."""
import os
import time
from pathlib import Path

import nbformat
import pytest

from fastai_l5.data import example_dls

NBS = Path(__file__).resolve().parent.parent / 'nbs'


def execute_notebook(path, timeout=900):
    """Run every cell of the notebook at `path` in a fresh kernel (cwd = its folder, one intra-op thread
    unless `OMP_NUM_THREADS` is set); return the executed notebook. A cell that raises raises
    `nbclient`'s `CellExecutionError`, which names the cell and holds its traceback."""
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}},
                            extra_arguments=['--IPKernelApp.log_level=ERROR'],
                            record_timing=False)   # no timing in cell metadata: jupyter-cache hashes it
    client.execute(env={**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1')})
    return nb


@pytest.fixture(scope='module')
def dls(request):
    """Diamonds loaders sized by the test module's `DLS = dict(n_rows=..., bs=...)` (default 3000 rows, bs 256:
    9 training batches), built once per module."""
    size = {'n_rows': 3000, 'bs': 256, **getattr(request.module, 'DLS', {})}
    return example_dls('diamonds', **size)


@pytest.fixture(scope='session')
def executed_notebooks(tmp_path_factory):
    """Every notebook of nbs/ run top to bottom. Returns the folder of executed copies and `{notebook name:
    error text}` for those whose cells raised. The executed copies are also stored in the jupyter-cache
    at `folder/'.docs_cache'/'jupyter'`, so a docs build given `cache=folder/'.docs_cache'` runs none again."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    from nbclient.exceptions import CellExecutionError, CellTimeoutError
    folder, errors = tmp_path_factory.mktemp('executed'), {}
    cache = get_cache(folder/'.docs_cache'/'jupyter')
    for path in sorted(NBS.glob('*.ipynb')):
        start = time.perf_counter()
        try: nb = execute_notebook(path)
        except (CellExecutionError, CellTimeoutError) as e: errors[path.name] = str(e); continue
        nbformat.write(nb, folder/path.name)
        cache.cache_notebook_bundle(CacheBundleIn(nb, str(path), data={'execution_seconds': time.perf_counter() - start}),
                                    check_validity=False, overwrite=True)
    return folder, errors
