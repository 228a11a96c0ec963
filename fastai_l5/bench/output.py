"""How a bench run is shown and kept: every section as an aligned text table on stdout, and as CSV, JSON (with the
machine) and a markdown summary on disk. Each section's title and note come from its `Section` in the registry."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = ['format_table', 'write_results', 'print_results']


def _fmt(col, v):
    "A cell as text: bytes with thousands separators, times and ratios rounded for reading."
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v): return 'nan'
        if 'bytes' in col: return f'{v:,.0f}'
        if col.startswith('share'): return f'{v:.2%}'
        if 'ratio' in col or col.endswith('_s'): return f'{v:.3f}'
        if col.endswith('_us') or col == 'speedup': return f'{v:.2f}' if v < 100 else f'{v:.1f}'
        return f'{v:.4g}'
    if isinstance(v, (int, np.integer)) and ('bytes' in col or col in ('numel', 'params', 'rows')): return f'{v:,}'
    return str(v)


def format_table(df):
    "A `DataFrame` as aligned plain text, numbers rounded for reading."
    cells = [[_fmt(c, v) for c, v in zip(df.columns, row)] for row in df.itertuples(index=False)]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(df.columns)]
    lines = ['  '.join(c.ljust(w) for c, w in zip(df.columns, widths))]
    lines.append('  '.join('-' * w for w in widths))
    lines += ['  '.join(v.rjust(w) if _is_num(v) else v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return '\n'.join(lines)


def _is_num(s):
    try: float(s.replace(',', '')); return True
    except ValueError: return False


def _markdown(df):
    cells = [[_fmt(c, v) for c, v in zip(df.columns, row)] for row in df.itertuples(index=False)]
    return '\n'.join(['| ' + ' | '.join(df.columns) + ' |', '|' + '---|' * len(df.columns)]
                     + ['| ' + ' | '.join(r) + ' |' for r in cells])


def _machine_line(m):
    return (f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
            f"fastai {m['fastai']}, fastai_l5 {m['fastai_l5']}{' @' + m['git_commit'] if m['git_commit'] else ''}, "
            f"{m['date']}, load avg {m['load_avg_start']} -> {m['load_avg_end']}")


def _notes(section, df): return [section.note(df)] if section.note else []


def write_results(results, sections, machine, config, out):
    """Write every section of `results` (name -> DataFrame; `sections`: name -> its `Section`) as CSV, all of it as
    JSON (with the machine) and as a markdown summary."""
    out = Path(out); out.mkdir(parents=True, exist_ok=True)
    for name, df in results.items(): df.to_csv(out / f'{name}.csv', index=False)
    doc = dict(machine=machine, config=config, notes=[n for k, df in results.items() for n in _notes(sections[k], df)],
               sections={k: json.loads(df.to_json(orient='records')) for k, df in results.items()})
    (out / 'bench.json').write_text(json.dumps(doc, indent=1))
    md = [f"Measured on {_machine_line(machine)}{' (quick smoke run)' if config['quick'] else ''}.", '']
    for name, df in results.items():
        md += [f'### {sections[name].title}', '', _markdown(df), '']
        md += [n for note in _notes(sections[name], df) for n in (note, '')]
    (out / 'bench.md').write_text('\n'.join(md))


def print_results(results, sections, machine, config):
    "Print every section's table under its title, its note, and how many targets were met."
    print(f"fastai-l5 bench{' --quick' if config['quick'] else ''}: {_machine_line(machine)}")
    for name, df in results.items():
        print(f"\n{sections[name].title}\n{format_table(df)}")
        for note in _notes(sections[name], df): print(note)
    missed = sum(int((df['status'] == 'MISSED').sum()) for df in results.values())
    checked = sum(int(df['status'].isin(['ok', 'MISSED']).sum()) for df in results.values())
    print(f"\n{checked - missed} of {checked} targets met"
          + (" (quick run: tiny sizes, the ratios are not meaningful)" if config['quick'] else ''))
