"""The `fastai-l5` command: `demo`, `report`, `bench` and `docs`. Bad input ends with a one-line
error on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from . import __version__

__all__ = ['main']


class UsageError(Exception):
    "Bad input from the command line: printed as one line, exit status 2."


class BuildError(Exception):
    "The work itself failed (a notebook cell raised while building the docs): printed, exit status 1."


def _positive_int(text):
    try: value = int(text)
    except ValueError: raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    if value < 1: raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _positive_float(text):
    try: value = float(text)
    except ValueError: raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not value > 0: raise argparse.ArgumentTypeError(f"{value} must be above 0")
    return value


def _parser():
    p = argparse.ArgumentParser(prog='fastai-l5', description="See what momentum, dropout and batch norm do "
                                "inside fastai tabular models.")
    p.add_argument('--version', action='version', version=f'fastai-l5 {__version__}')
    sub = p.add_subparsers(dest='command', required=True, metavar='{demo,report,bench,docs}')
    train = argparse.ArgumentParser(add_help=False)
    train.add_argument('--epochs', type=_positive_int, default=None,
                       help='epochs of fit_one_cycle (default: enough for about 300 optimizer steps, 3 to 40)')
    train.add_argument('--lr', type=_positive_float, default=None, help="peak learning rate (default: fastai's lr_find)")
    train.add_argument('--bs', type=_positive_int, default=None,
                       help='batch size (default: about 32 batches an epoch, 16 to 1024)')
    train.add_argument('--out', default='l5_report', help='folder for report.html, PNGs and CSVs (default ./l5_report)')
    demo = sub.add_parser('demo', parents=[train], help='instrumented training run on an example data set')
    demo.add_argument('--example', default='diamonds', help='diamonds (default), flights, ames or lending_club')
    demo.add_argument('--rows', type=_positive_int, default=None, help='train on a random sample of this many rows')
    rep = sub.add_parser('report', parents=[train], help='the same on your own CSV file')
    rep.add_argument('csv', help='path of a CSV file')
    rep.add_argument('--target', required=True, help='the column to predict')
    rep.add_argument('--cat', nargs='*', default=[], help='categorical columns (others are sorted by dtype)')
    rep.add_argument('--cont', nargs='*', default=[], help='continuous columns (others are sorted by dtype)')
    rep.add_argument('--drop', nargs='*', default=[], help='columns to leave out')
    rep.add_argument('--log-target', action='store_true', help='train on log(target) (default: when positive and skewed)')
    rep.add_argument('--sep', default=None, help="the CSV's field separator (default: detected among , ; tab |)")
    rep.add_argument('--class-weights', action='store_true',
                     help='classification: weigh the loss by inverse class frequency, n/(K·n_class), to find rare classes')
    for cmd in (demo, rep):
        cmd.add_argument('--threads', type=_positive_int, default=None,
                         help="torch intra-op threads (default: 1 below 100,000 training rows, else min(4, CPUs))")
    bench = sub.add_parser('bench', help='the benchmark table (overhead, optimizer step, precise_bn, memory, scaling)')
    bench.add_argument('--quick', action='store_true', help='a one-minute smoke run')
    bench.add_argument('--only', nargs='+', metavar='SECTION',
                       help='run only these sections: overhead, optimizer, precise_bn, memory, scaling, diagnose, report_threads')
    bench.add_argument('--no-wandb', action='store_true', help='leave out the W&B and TensorBoard rows of the overhead section')
    bench.add_argument('--out', default='l5_bench', help='folder for the CSV and JSON results (default ./l5_bench)')
    docs = sub.add_parser('docs', help='render nbs/ to the HTML docs site (run from a checkout)')
    docs.add_argument('--out', default='_site', help='folder for the site (default ./_site)')
    return p


def _summary(learn, path, name):
    lines = [f"fastai_l5 {name}: what was trained"] + [f"  {k}: {v}" for k, v in learn.l5_trained]
    from .core import find_cb
    from .report import SECTIONS
    for cls, attr, _, _ in SECTIONS:
        cb = find_cb(learn, cls)
        if cb is not None: lines.append(f"  {attr}: {len(cb.df):,} rows logged")
    import pandas as pd
    from .diagnose import findings_lines
    findings = pd.read_csv(Path(path).parent / 'findings.csv', keep_default_na=False)
    lines += findings_lines(findings) if len(findings) else ['Findings:', '  (none could be made: see report.html)']
    lines.append(f"report: {Path(path).resolve()}")
    return '\n'.join(lines)


def _train(args, df, title, name, **recipe_kwargs):
    "Prepare `df` with the default recipe (bad input: `UsageError`), train, write the report, print the summary."
    from .recipe import tabular_recipe
    from .report import train_report
    try: recipe = tabular_recipe(df, bs=args.bs, epochs=args.epochs, **recipe_kwargs)
    except ValueError as e: raise UsageError(str(e)) from e
    if getattr(args, 'class_weights', False) and recipe.is_regression:
        raise UsageError(f"--class-weights needs a classification target; {args.target!r} is a regression")
    learn, path = train_report(recipe, out=args.out, lr=args.lr, title=title, threads=args.threads,
                               class_weights=getattr(args, 'class_weights', False))
    print(_summary(learn, path, name))


def _demo(args):
    from .data import EXAMPLES, example_df
    if args.example not in EXAMPLES:
        raise UsageError(f"unknown example {args.example!r}; choose one of {', '.join(sorted(EXAMPLES))}")
    df, spec = example_df(args.example, n_rows=args.rows)
    inputs = spec['cat_names'] + spec['cont_names'] + [spec['y_names']]
    _train(args, df, f'fastai_l5 demo: {args.example}', f'demo on {args.example}', target=spec['y_names'],
           cat_names=spec['cat_names'], cont_names=spec['cont_names'], drop=[c for c in df.columns if c not in inputs])


def _report(args):
    from .recipe import read_table
    sep = {'tab': '\t', '\\t': '\t'}.get(args.sep, args.sep)
    try: df = read_table(args.csv, sep=sep)
    except ValueError as e: raise UsageError(str(e)) from e
    _train(args, df, f'fastai_l5 report: {Path(args.csv).name} → {args.target}', f'report on {args.csv}',
           target=args.target, cat_names=args.cat, cont_names=args.cont, drop=args.drop,
           log_target=True if args.log_target else None)


def _bench(args):
    from .bench import BenchConfig, bench
    cfg = (BenchConfig.quick if args.quick else BenchConfig)(wandb=not args.no_wandb)
    try: bench(out=args.out, only=args.only, config=cfg)
    except ValueError as e:
        if 'bench section' in str(e): raise UsageError(str(e)) from e
        raise


def _docs(args):
    from ._docs import DocsError, build_site
    try: path = build_site(out=args.out)
    except (FileNotFoundError, FileExistsError, NotADirectoryError) as e: raise UsageError(str(e)) from e
    except DocsError as e: raise BuildError(str(e)) from e
    print(f"docs: {Path(path).resolve()/'index.html'}")


COMMANDS = {'demo': _demo, 'report': _report, 'bench': _bench, 'docs': _docs}


def main(argv=None):
    "Entry point of the `fastai-l5` console script."
    args = _parser().parse_args(argv)
    os.environ.setdefault('MPLBACKEND', 'Agg')
    warnings.filterwarnings('ignore', category=UserWarning, module='fastai')
    try: COMMANDS[args.command](args)
    except UsageError as e:
        print(f"fastai-l5 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BuildError as e:
        print(f"fastai-l5 {args.command}: failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__': sys.exit(main())
