"""The tool behind `fastai-l5 docs` (not part of the API): runs Sphinx on the checkout's `nbs/`, whose
`conf.py` holds the site's configuration, and turns what can go wrong into one clear message."""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
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


def execute_notebook(path, timeout=900):
    """Run every cell of the notebook at `path` in a fresh kernel (cwd = its folder, one intra-op torch thread
    unless `OMP_NUM_THREADS` is set); return the executed notebook. A cell that raises raises `nbclient`'s
    `CellExecutionError`, which names the cell and holds its traceback."""
    import nbformat
    from nbclient import NotebookClient
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}},
                            extra_arguments=['--IPKernelApp.log_level=ERROR'],
                            record_timing=False)   # no timing in cell metadata: jupyter-cache hashes it
    client.execute(env={**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1')})
    return nb


def _execute_one(path):
    "In a worker process: `(executed notebook or None, error text or None, seconds)` for the notebook at `path`."
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    start = time.perf_counter()
    try: return execute_notebook(path), None, time.perf_counter() - start
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:   # a cell raised, ran too long, or killed the kernel
        return None, re.sub(r'\x1b\[[0-9;]*m', '', str(e)), time.perf_counter() - start


def execute_notebooks(paths, cache, jobs=None, copies=None, progress=None):
    """Execute those of the notebooks `paths` that the jupyter-cache folder `cache` does not hold yet, `jobs` at a
    time (default: one per CPU core, at most 4; each kernel uses one torch thread), and store each executed notebook
    there, so that Sphinx (myst-nb's 'cache' mode) runs none of them again. Also writes the executed copies into
    the folder `copies` if given. Returns `({notebook name: error text}, {notebook name: seconds})` for the
    notebooks executed here; `progress(line)` is called as each ends."""
    import nbformat
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn
    store = get_cache(str(cache))
    todo = []
    for path in map(Path, paths):
        try: store.match_cache_notebook(nbformat.read(path, as_version=4))
        except KeyError: todo.append(path)
    errors, seconds = {}, {}
    if not todo: return errors, seconds
    jobs = max(1, min(jobs or min(os.cpu_count() or 1, 4), len(todo)))
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context('spawn')) as pool:
        running = {pool.submit(_execute_one, str(p)): p for p in todo}
        for done in as_completed(running):
            path = running[done]
            nb, error, seconds[path.name] = done.result()
            if progress: progress(f"{path.name}: {'failed' if error else 'executed'} in {seconds[path.name]:.1f} s")
            if error: errors[path.name] = error; continue
            if copies: nbformat.write(nb, Path(copies)/path.name)
            store.cache_notebook_bundle(CacheBundleIn(nb, str(path), data={'execution_seconds': seconds[path.name]}),
                                        check_validity=False, overwrite=True)
    return errors, seconds


def site_notebooks(src: Path):
    "The notebooks of the docs folder `src` that the site renders (conf.py leaves out names starting with _ or .)."
    return sorted(p for p in Path(src).glob('*.ipynb') if not p.name.startswith(('_', '.')))


def build_site(nbs='nbs', out='_site', cache=None, warnings=None, jobs=None) -> Path:
    """Build the HTML site from `nbs` into `out` and return `out`. Notebooks are executed through a
    jupyter-cache at `cache` (default `.docs_cache/code-<hash of fastai_l5's source>` beside `nbs`): a
    notebook is run again only when its code or fastai_l5's has changed; those that must run are run first,
    `jobs` at a time (see `execute_notebooks`), then Sphinx renders the pages from the cache. Prints one line
    per notebook executed and per page read, then Sphinx's warnings to `warnings` (default stderr); raises
    `DocsError` when a cell raises."""
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
            errors, _ = execute_notebooks(site_notebooks(src), cache/'jupyter', jobs=jobs,
                                          progress=lambda line: print(f"docs: {line}", flush=True))
            if errors:
                name = sorted(errors)[0]
                raise DocsError(f"{name}: a cell raised while executing the notebook\n{errors[name]}".rstrip())
            app = Sphinx(src, src, out, cache/'doctrees', 'html', status=None, warning=log,
                         confoverrides={'nb_execution_cache_path': str(cache/'jupyter')})
            app.build()
    except DocsError: raise
    except Exception as e:
        msg = _cell_error(e)
        if msg: raise DocsError(msg) from None
        if isinstance(e, SphinxError): raise DocsError(f"Sphinx stopped: {e}\n{log.getvalue()}".rstrip()) from None
        raise
    if app.statuscode: raise DocsError(f"Sphinx reported errors:\n{log.getvalue()}")
    (warnings or sys.stderr).write(log.getvalue())
    return out
