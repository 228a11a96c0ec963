"""Shared fixtures: the example loaders each test module trains on, and the notebooks in nbs/, executed once per
test session for both the notebook tests and the docs site."""
from pathlib import Path

import nbformat
import pytest

from fastai_l5.data import example_dls
from fastai_l5.docs import DocsError, docs_pages, execute_notebook

NBS = Path(__file__).resolve().parent.parent / 'nbs'


@pytest.fixture(scope='module')
def dls(request):
    """Diamonds loaders sized by the test module's `DLS = dict(n_rows=..., bs=...)` (default 3000 rows, bs 256:
    9 training batches), built once per module."""
    size = {'n_rows': 3000, 'bs': 256, **getattr(request.module, 'DLS', {})}
    return example_dls('diamonds', **size)


@pytest.fixture(scope='session')
def executed_notebooks(tmp_path_factory):
    """Every notebook of nbs/ run top to bottom in a fresh kernel (cwd = nbs/). Returns the folder of
    executed copies and `{notebook name: error text}` for those whose cells raised."""
    folder, errors = tmp_path_factory.mktemp('executed'), {}
    for page in docs_pages(NBS):
        try: nbformat.write(execute_notebook(page.path), folder / page.path.name)
        except DocsError as e: errors[page.path.name] = str(e)
    return folder, errors
