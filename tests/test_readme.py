"The README's code example runs as written (with a stand-in for the user's `new_df`)."
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / 'README.md'


def test_readme_example_runs():
    code = re.search(r'```python\n(.*?)```', README.read_text(), flags=re.S).group(1)
    ns = {}
    exec("from fastai_l5.data import example_df\n"
         "new_df = example_df('diamonds')[0].sample(2000, random_state=1)\n", ns)
    exec(compile(code, str(README), 'exec'), ns)
    learn = ns['learn']
    assert len(learn.momentum_logger.df) and len(learn.dropout_schedule.df) and learn.bn_drift.precise_df.epoch.nunique() == 3
    assert {'carat', 'depth'} <= set(ns['bn_shift'](learn, ns['new_df']).feature)
