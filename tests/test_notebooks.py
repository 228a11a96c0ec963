"Every notebook in nbs/ is documentation that must run: each is executed top to bottom (once per session, see conftest.py)."
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parent.parent / 'nbs'
NOTEBOOKS = sorted(p.name for p in NBS.glob('*.ipynb'))


def test_there_are_notebooks():
    assert {'index.ipynb', '01_optim.ipynb', '02_momentum.ipynb', '03_dropout.ipynb', '04_batchnorm.ipynb',
            '05_lesson5_checked.ipynb'} <= set(NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs_clean(name, executed_notebooks):
    folder, errors = executed_notebooks
    assert name not in errors, errors.get(name)
    assert (folder / name).is_file()
