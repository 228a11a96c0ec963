"The `fastai-l5` command: the demo's report, the CSV report, and clean errors on bad input."
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from fastai_l5 import __version__
from fastai_l5.cli import main
from fastai_l5.report import LEGEND

NBS = Path(__file__).resolve().parent.parent / 'nbs'


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, '-m', 'fastai_l5.cli', *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


class Links(HTMLParser):
    "Images, links, table headers and legend terms of a report page."
    def __init__(self): super().__init__(); self.srcs, self.hrefs, self.headers, self.terms, self._in = [], [], set(), set(), None
    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == 'img': self.srcs.append(attrs['src'])
        if tag == 'a': self.hrefs.append(attrs['href'])
        if tag in ('th', 'dt'): self._in = tag
    def handle_endtag(self, tag): self._in = None
    def handle_data(self, data):
        if self._in == 'th': self.headers.add(data.strip())
        if self._in == 'dt': self.terms.add(data.strip())


def check_report(out):
    page = out / 'report.html'
    assert page.is_file()
    links = Links(); links.feed(page.read_text())
    for src in links.srcs:
        assert (out / src).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', f"{src} is not a PNG"
    for href in links.hrefs:
        if href.endswith('.csv'): assert len(pd.read_csv(out / href)) > 0, f"{href} is empty"
        else:  # a docs page: one of the notebooks, as the docs site names them
            assert href.startswith('../_site/') and (NBS / Path(href).name).with_suffix('.ipynb').is_file(), href
    columns = links.headers - {'task', 'rows', 'categorical', 'continuous', 'dropped', 'target scale', 'batches',
                               'optimizer', 'lr', 'y_range', 'result', 'note', 'threads', 'loss', 'classes', 'linear skip',
                               'confusion'}  # the "What was trained" rows
    assert columns and columns <= links.terms, f"columns without a legend: {columns - links.terms}"
    assert links.terms <= set(LEGEND)
    summary = json.loads((out / 'summary.json').read_text())
    assert set(summary) >= {'task', 'target', 'metric', 'value', 'baseline', 'target_transform', 'bs', 'epochs', 'lr',
                            'lr_source', 'linear_baseline', 'value_ci', 'threads'}
    return links, summary


@pytest.mark.slow
def test_demo_writes_a_report_with_every_section(tmp_path):
    res = run_cli('demo', '--rows', 3000, '--epochs', 2, '--bs', 256, '--out', tmp_path / 'rep')
    assert res.returncode == 0, res.stderr
    links, summary = check_report(tmp_path / 'rep')
    assert {'training.png', 'momentum_logger.png', 'dropout_schedule.png', 'bn_drift.png'} <= set(links.srcs)
    assert {'epochs.csv', 'momentum_logger.csv', 'dropout_schedule.csv', 'bn_drift.csv',
            'bn_drift_precise_df.csv', 'opt_state.csv'} <= set(links.hrefs)
    assert 'report:' in res.stdout and 'momentum_logger:' in res.stdout
    epochs = pd.read_csv(tmp_path / 'rep' / 'epochs.csv')
    assert len(epochs) == 2 and epochs['valid_loss'].notna().all()
    assert {'rmse', 'cos_mom_grad', 'sign_flip', 'dropout_p', 'valid_loss_precise'} <= set(epochs.columns)
    # the summary's value is the last epoch's metric, on the original scale (log price here)
    assert summary['value'] == pytest.approx(epochs['rmse'].iloc[-1], rel=1e-4)
    assert summary['value'] < summary['baseline'] and summary['target_transform'] == 'standardize'
    assert (summary['bs'], summary['epochs'], summary['lr_source']) == (256, 2, 'lr_find (valley)')
    # redirected output: no progress bars, one clean line per epoch, and what was trained
    assert '\r' not in res.stdout and '\r' not in res.stderr
    assert re.search(r'^ +epoch +train_loss +valid_loss +rmse', res.stdout, flags=re.M)
    assert re.search(r'^ +1 +[\d.]+ +[\d.]+ +[\d.]+ ', res.stdout, flags=re.M)
    for label in ('task', 'rows', 'categorical', 'continuous', 'dropped', 'target scale', 'batches', 'optimizer',
                  'lr', 'y_range', 'result'):
        assert re.search(rf'^  {label}: ', res.stdout, flags=re.M), label


@pytest.mark.slow
def test_report_on_a_users_csv(tmp_path):
    "A row number that leaks the target is left out and said so; --drop, --lr and --log-target are obeyed."
    df = pd.DataFrame({'row': range(300), 'size': [(i * 7) % 50 + 0.5 for i in range(300)], 'noise': 1.0,
                       'colour': ['red', 'blue', 'green'] * 100})
    df['price'] = df['row'] * 2.0 + df['size']
    df.to_csv(tmp_path / 'shop.csv', index=False)
    res = run_cli('report', tmp_path / 'shop.csv', '--target', 'price', '--epochs', 2, '--lr', 0.01, '--drop', 'noise',
                  '--log-target', '--out', tmp_path / 'rep')
    assert res.returncode == 0, res.stderr
    _, summary = check_report(tmp_path / 'rep')
    assert re.search(r'dropped: noise \(asked \(--drop\)\); row \(identifier-like: all 300 values distinct', res.stdout)
    assert re.search(r'^  continuous: size$', res.stdout, flags=re.M)
    assert (summary['lr'], summary['lr_source'], summary['target_transform'], summary['epochs']) == (0.01, 'user', 'log', 2)
    page = (tmp_path / 'rep' / 'report.html').read_text()
    assert 'What was trained' in page and 'identifier-like' in page and 'lr_find' not in page


def test_version(capsys):
    with pytest.raises(SystemExit) as exit: main(['--version'])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f'fastai-l5 {__version__}'


def run_main(args, cwd, monkeypatch, capsys):
    "`fastai_l5.cli.main(args)` in this process, from `cwd`: (exit status, stdout, stderr). argparse's own errors exit."
    monkeypatch.chdir(cwd)
    try: code = main(list(map(str, args)))
    except SystemExit as e: code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize('args,message', [
    (['report', 'nowhere.csv', '--target', 'y'], r'no such file: nowhere\.csv'),
    (['report', '.', '--target', 'y'], r'is a directory; give the path of a CSV file'),
    (['report', 'data.csv', '--target', 'nope'], r"unknown column\(s\) \['nope'\].*'a', 'b'"),
    (['report', 'data.csv', '--target', 'a', '--cat', 'zz'], r"unknown column\(s\) \['zz'\]"),
    (['report', 'data.csv', '--target', 'a', '--cont', 'a'], r"the target 'a' is also named as an input"),
    (['report', 'data.csv', '--target', 'a', '--cat', 'b', '--cont', 'b'], r"\['b'\] named both --cat and --cont"),
    (['report', 'data.csv', '--target', 'a', '--drop', 'b'], r"no input columns are left to predict 'a'"),
    (['report', 'data.csv', '--target', 'b', '--log-target'], r"--log-target needs a regression target"),
    (['report', 'empty.csv', '--target', 'a'], r'has no data rows'),
    (['report', 'header.csv', '--target', 'a'], r'header\.csv has no data rows'),
    (['report', 'blank.csv', '--target', 'a'], r'could not read blank\.csv as CSV'),
    (['report', 'tiny.csv', '--target', 'a'], r'at least 10 are needed'),
    (['report', 'data.csv', '--target', 'b', '--epochs', '0'], r'argument --epochs: 0 must be at least 1'),
    (['demo', '--example', 'iris'], r"unknown example 'iris'; choose one of ames, diamonds"),
    (['demo', '--epochs', '0'], r'argument --epochs: 0 must be at least 1'),
    (['demo', '--lr', 'fast'], r"argument --lr: 'fast' is not a number"),
    (['report', 'data.csv'], r'the following arguments are required: --target'),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    "In process (the console script itself is run once, by test_console_script_reports_bad_input): no work is done."
    pd.DataFrame({'a': range(20), 'b': ['x', 'y'] * 10}).to_csv(tmp_path / 'data.csv', index=False)
    pd.DataFrame({'a': [], 'b': []}).to_csv(tmp_path / 'empty.csv', index=False)
    (tmp_path / 'header.csv').write_text('a,b\n')
    (tmp_path / 'blank.csv').write_text('')
    pd.DataFrame({'a': range(3)}).to_csv(tmp_path / 'tiny.csv', index=False)
    code, out, err = run_main(args, tmp_path, monkeypatch, capsys)
    assert code == 2, err
    assert 'Traceback' not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f'fastai-l5 {args[0]}: error: ') and re.search(message, last), err
    assert not (tmp_path / 'l5_report').exists()   # nothing half-written


def test_console_script_reports_bad_input(tmp_path):
    "The installed `fastai-l5` script (or `python -m fastai_l5.cli` without one): one line on stderr, exit status 2."
    script = shutil.which('fastai-l5')
    cmd = [script] if script else [sys.executable, '-m', 'fastai_l5.cli']
    res = subprocess.run([*cmd, 'report', 'nowhere.csv', '--target', 'y'], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert res.returncode == 2 and res.stdout == ''
    assert res.stderr == 'fastai-l5 report: error: no such file: nowhere.csv\n', res.stderr
