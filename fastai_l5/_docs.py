"""The tool behind `fastai-l5 docs` (not part of the API): runs Sphinx on the checkout's `nbs/`, whose
`conf.py` holds the site's configuration, and turns what can go wrong into one clear message."""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path


class DocsError(RuntimeError):
    "The site could not be built: a notebook cell raised, or Sphinx stopped."


def find_nbs(nbs='nbs') -> Path:
    """The notebooks folder `nbs` (with Sphinx's `conf.py`): as given if absolute, else relative to the current
    directory, then to the checkout this package was installed from (`pip install -e .`)."""
    nbs = Path(nbs)
    candidates = [nbs] if nbs.is_absolute() else [Path.cwd()/nbs, Path(__file__).resolve().parent.parent/nbs]
    for c in candidates:
        if (c/'conf.py').is_file(): return c.resolve()
    raise FileNotFoundError(f"no docs sources {str(nbs)!r} with a conf.py (looked in {', '.join(map(str, candidates))}); "
                            "the docs are built from a checkout of fastai_l5: run `fastai-l5 docs` from its root")


def _check_out(out: Path):
    "Refuse to write into a folder that holds anything but a site Sphinx built (it would mix or overwrite files)."
    if out.exists() and not out.is_dir(): raise NotADirectoryError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out/'.buildinfo').exists():
        raise FileExistsError(f"--out {out} is not empty and is not a docs site built before: "
                              "choose a new or empty folder")


def _cell_error(e: BaseException):
    "The notebook and the cell's error, when a myst-nb execution failure is in the chain of `e`."
    from myst_nb.core.execute.base import ExecutionError
    while e is not None:
        if isinstance(e, ExecutionError):
            cell = re.sub(r'\x1b\[[0-9;]*m', '', str(e.__cause__ or ''))     # the traceback without its colours
            return f"{Path(str(e)).name}: a cell raised while executing the notebook\n{cell}".rstrip()
        e = e.__cause__ or e.__context__
    return None


@contextmanager
def _kernel_chatter_to(path: Path):
    "Send what the notebook kernels print on stderr (their startup notices) to `path`, not the terminal."
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, 'w') as f:
        os.dup2(f.fileno(), 2)
        try: yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _default_cache(src: Path) -> Path:
    """`.docs_cache/code-<hash>` beside `src`, the hash taken over fastai_l5's source: cached notebook outputs
    are only reused while the code they ran is unchanged (older caches are removed)."""
    code = hashlib.sha1()
    for f in sorted(Path(__file__).resolve().parent.rglob('*.py')): code.update(f.read_bytes())
    root = src.parent/'.docs_cache'
    for old in root.glob('code-*'):
        if old.name != f'code-{code.hexdigest()[:12]}': shutil.rmtree(old, ignore_errors=True)
    return root/f'code-{code.hexdigest()[:12]}'


def build_site(nbs='nbs', out='_site', cache=None, warnings=None) -> Path:
    """Build the HTML site from `nbs` into `out` and return `out`. Notebooks are executed through a
    jupyter-cache at `cache` (default `.docs_cache/code-<hash of fastai_l5's source>` beside `nbs`): a
    notebook is run again only when its code or fastai_l5's has changed. Prints one line per page read, then
    Sphinx's warnings to `warnings` (default stderr); raises `DocsError` when a cell raises."""
    from sphinx.application import Sphinx
    from sphinx.errors import SphinxError
    src, out = find_nbs(nbs), Path(out).resolve()
    _check_out(out)
    cache = Path(cache) if cache else _default_cache(src)
    os.environ.setdefault('OMP_NUM_THREADS', '1')   # tiny tabular batches: threads only wait on each other
    os.environ.setdefault('MPLBACKEND', 'Agg')
    log = io.StringIO()
    try:
        with _kernel_chatter_to(cache/'kernels.log'):
            app = Sphinx(src, src, out, cache/'doctrees', 'html', status=None, warning=log,
                         confoverrides={'nb_execution_cache_path': str(cache/'jupyter')})
            app.build()
    except Exception as e:
        msg = _cell_error(e)
        if msg: raise DocsError(msg) from None
        if isinstance(e, SphinxError): raise DocsError(f"Sphinx stopped: {e}\n{log.getvalue()}".rstrip()) from None
        raise
    if app.statuscode: raise DocsError(f"Sphinx reported errors:\n{log.getvalue()}")
    (warnings or sys.stderr).write(log.getvalue())
    return out
