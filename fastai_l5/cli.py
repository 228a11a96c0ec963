"""The `fastai-l5` command: `demo`, `report`, `bench` and `docs`. Bad input ends with a one-line
error on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

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
    sub = p.add_subparsers(dest='command', required=True, metavar='{demo,report,bench,docs}')
    train = argparse.ArgumentParser(add_help=False)
    train.add_argument('--epochs', type=_positive_int, default=3, help='epochs of fit_one_cycle (default 3)')
    train.add_argument('--lr', type=_positive_float, default=3e-3, help='peak learning rate (default 3e-3)')
    train.add_argument('--bs', type=_positive_int, default=1024, help='batch size (default 1024)')
    train.add_argument('--out', default='l5_report', help='folder for report.html, PNGs and CSVs (default ./l5_report)')
    demo = sub.add_parser('demo', parents=[train], help='instrumented training run on an example data set')
    demo.add_argument('--example', default='diamonds', help='diamonds (default), flights, ames or lending_club')
    demo.add_argument('--rows', type=_positive_int, default=None, help='train on a random sample of this many rows')
    rep = sub.add_parser('report', parents=[train], help='the same on your own CSV file')
    rep.add_argument('csv', help='path of a CSV file')
    rep.add_argument('--target', required=True, help='the column to predict')
    rep.add_argument('--cat', nargs='*', default=[], help='categorical columns (others are sorted by dtype)')
    rep.add_argument('--cont', nargs='*', default=[], help='continuous columns (others are sorted by dtype)')
    bench = sub.add_parser('bench', help='the benchmark table (overhead, optimizer step, precise_bn, memory)')
    bench.add_argument('--quick', action='store_true', help='a one-minute smoke run')
    bench.add_argument('--out', default='l5_bench', help='folder for the CSV and JSON results (default ./l5_bench)')
    docs = sub.add_parser('docs', help='render nbs/ to the HTML docs site (run from a checkout)')
    docs.add_argument('--out', default='_site', help='folder for the site (default ./_site)')
    return p


def _summary(learn, path, name):
    rec = learn.recorder
    names = rec.metric_names[1:len(rec.values[-1]) + 1] if rec.values else []
    final = ', '.join(f'{n}={v:.4f}' for n, v in zip(names, rec.values[-1])) if rec.values else 'no epoch finished'
    lines = [f"fastai_l5 {name}: {final}"]
    from .report import SECTIONS
    for attr, _, _ in SECTIONS:
        cb = getattr(learn, attr, None)
        if cb is not None: lines.append(f"  {attr}: {len(cb.df):,} rows logged")
    lines.append(f"report: {Path(path).resolve()}")
    return '\n'.join(lines)


def _demo(args):
    from .data import EXAMPLES, example_dls
    from .report import run_instrumented
    if args.example not in EXAMPLES:
        raise UsageError(f"unknown example {args.example!r}; choose one of {', '.join(sorted(EXAMPLES))}")
    dls = example_dls(args.example, bs=args.bs, n_rows=args.rows)
    learn, path = run_instrumented(dls, epochs=args.epochs, out=args.out, lr=args.lr,
                                   title=f'fastai_l5 demo: {args.example}')
    print(_summary(learn, path, f'demo on {args.example}'))


def _report(args):
    from .report import csv_dls, run_instrumented
    try: dls = csv_dls(args.csv, args.target, args.cat, args.cont, bs=args.bs)
    except ValueError as e: raise UsageError(str(e)) from e
    learn, path = run_instrumented(dls, epochs=args.epochs, out=args.out, lr=args.lr,
                                   title=f'fastai_l5 report: {Path(args.csv).name} → {args.target}')
    print(_summary(learn, path, f'report on {args.csv}'))


def _bench(args):
    from .bench import bench
    bench(quick=args.quick, out=args.out)


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
