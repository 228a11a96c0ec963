"The README's Python code runs as pasted: every ```python block, in order, in one fresh namespace, no stand-ins."
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / 'README.md'


def python_blocks(): return re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)


@pytest.mark.slow
def test_readme_python_runs_as_pasted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the code writes files where it runs
    ns = {}
    for code in python_blocks(): exec(compile(code, str(README), 'exec'), ns)
    learn = ns['learn']
    assert len(learn.momentum_logger.df) and len(learn.dropout_schedule.df) and learn.bn_drift.precise_df.epoch.nunique() == 3
    assert (tmp_path / 'momentum.png').read_bytes()[:4] == b'\x89PNG'
    assert {'carat', 'depth'} <= set(ns['bn_shift'](learn, ns['new_df']).feature)


def test_readme_comments_match_the_code():
    code = '\n'.join(python_blocks())
    assert 'fastai_ps(0.2, 2)),   # fastai\'s rule: p/2, then p (0.1, 0.2)' in code
    from fastai_l5.all import fastai_ps
    assert fastai_ps(0.2, 2) == [0.1, 0.2]
    assert not re.search(r'DropoutSchedule\(.*# p/2 then p', code)
