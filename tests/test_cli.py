"The `fastai-l5` command: the demo's report, the CSV report, and clean errors on bad input."
import re
import subprocess
import sys
from html.parser import HTMLParser

import pandas as pd
import pytest



def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, '-m', 'fastai_l5.cli', *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


class Links(HTMLParser):
    def __init__(self): super().__init__(); self.srcs, self.hrefs = [], []
    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == 'img': self.srcs.append(attrs['src'])
        if tag == 'a': self.hrefs.append(attrs['href'])


def check_report(out):
    page = out / 'report.html'
    assert page.is_file()
    links = Links(); links.feed(page.read_text())
    for src in links.srcs:
        assert (out / src).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', f"{src} is not a PNG"
    for href in links.hrefs:
        assert len(pd.read_csv(out / href)) > 0, f"{href} is empty"
    return links


def test_demo_writes_a_report_with_every_section(tmp_path):
    res = run_cli('demo', '--rows', 3000, '--epochs', 2, '--bs', 256, '--out', tmp_path / 'rep')
    assert res.returncode == 0, res.stderr
    links = check_report(tmp_path / 'rep')
    assert {'training.png', 'momentum_logger.png', 'dropout_schedule.png', 'bn_drift.png'} <= set(links.srcs)
    assert {'epochs.csv', 'momentum_logger.csv', 'dropout_schedule.csv', 'bn_drift.csv',
            'bn_drift_precise_df.csv', 'opt_state.csv'} <= set(links.hrefs)
    assert 'report:' in res.stdout and 'momentum_logger:' in res.stdout
    epochs = pd.read_csv(tmp_path / 'rep' / 'epochs.csv')
    assert len(epochs) == 2 and epochs['valid_loss'].notna().all()


def test_report_on_a_users_csv(tmp_path):
    df = pd.DataFrame({'size': range(300), 'colour': ['red', 'blue', 'green'] * 100,
                       'price': [i * 2.0 + (i % 7) for i in range(300)]})
    df.to_csv(tmp_path / 'shop.csv', index=False)
    res = run_cli('report', tmp_path / 'shop.csv', '--target', 'price', '--epochs', 1, '--bs', 64,
                  '--out', tmp_path / 'rep')
    assert res.returncode == 0, res.stderr
    check_report(tmp_path / 'rep')


@pytest.mark.parametrize('args,message', [
    (['report', 'nowhere.csv', '--target', 'y'], r'no such file: nowhere\.csv'),
    (['report', '.', '--target', 'y'], r'is a directory; give the path of a CSV file'),
    (['report', 'data.csv', '--target', 'nope'], r"unknown column\(s\) \['nope'\].*'a', 'b'"),
    (['report', 'data.csv', '--target', 'a', '--cat', 'zz'], r"unknown column\(s\) \['zz'\]"),
    (['report', 'empty.csv', '--target', 'a'], r'has no data rows'),
    (['report', 'blank.csv', '--target', 'a'], r'could not read blank\.csv as CSV'),
    (['report', 'tiny.csv', '--target', 'a'], r'at least 10 are needed'),
    (['demo', '--example', 'iris'], r"unknown example 'iris'; choose one of ames, diamonds"),
    (['demo', '--epochs', '0'], r'argument --epochs: 0 must be at least 1'),
    (['demo', '--lr', 'fast'], r"argument --lr: 'fast' is not a number"),
    (['report', 'data.csv'], r'the following arguments are required: --target'),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    pd.DataFrame({'a': range(20), 'b': ['x', 'y'] * 10}).to_csv(tmp_path / 'data.csv', index=False)
    pd.DataFrame({'a': [], 'b': []}).to_csv(tmp_path / 'empty.csv', index=False)
    (tmp_path / 'blank.csv').write_text('')
    pd.DataFrame({'a': range(3)}).to_csv(tmp_path / 'tiny.csv', index=False)
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2
    assert 'Traceback' not in res.stderr
    assert re.search(message, res.stderr), res.stderr
    assert len(res.stderr.strip().splitlines()[-1]) > 10
