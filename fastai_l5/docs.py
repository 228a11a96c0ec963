"""The docs site: every notebook in `nbs/` executed and rendered to static HTML, with navigation
between pages, plots inline, nbdev `show_doc` cells rendered from their markdown, and LaTeX turned
into MathML so the site needs nothing from the network."""
from __future__ import annotations

import copy
import html
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ['build_docs', 'find_nbs', 'docs_pages', 'execute_notebook', 'DocsError']

_SITE_MARKER = '.fastai_l5_site'
_ASSETS = {'.png', '.jpg', '.jpeg', '.gif', '.svg', '.webp', '.csv'}


class DocsError(RuntimeError):
    "A notebook of the docs could not be executed or rendered."


@dataclass
class Page:
    "One notebook of the site: where it is, the HTML file it becomes, its title and nav section."
    path: Path
    slug: str
    title: str
    section: str

    @property
    def href(self): return f'{self.slug}.html'


def _repo_root(): return Path(__file__).resolve().parent.parent


def find_nbs(nbs='nbs') -> Path:
    """The notebooks folder `nbs`: as given if absolute, else relative to the current directory, then
    to the checkout this package was installed from (`pip install -e .`)."""
    nbs = Path(nbs)
    candidates = [nbs] if nbs.is_absolute() else [Path.cwd()/nbs, _repo_root()/nbs]
    for c in candidates:
        if c.is_dir() and any(c.glob('*.ipynb')): return c.resolve()
    looked = ', '.join(str(c) for c in candidates)
    raise FileNotFoundError(f"no notebooks folder {str(nbs)!r} with .ipynb files (looked in {looked}); the docs are "
                            "built from a checkout of fastai_l5: run `fastai-l5 docs` from the repository root")


def _title(nb, fallback):
    for cell in nb.cells:
        if cell.cell_type != 'markdown': continue
        m = re.search(r'^#\s+(.+?)\s*$', cell.source, flags=re.M)
        if m: return re.sub(r'`([^`]*)`|\*\*?([^*]+)\*\*?', lambda g: g.group(1) if g.group(1) is not None else g.group(2), m.group(1)).strip()
    return fallback


def docs_pages(nbs='nbs'):
    """The site's pages in nav order: `index` first, then the other notebooks by name (the guide), then
    the `api_*` notebooks (the API reference). Files starting with `_` or `.` are left out."""
    import nbformat
    nbs_dir = find_nbs(nbs)
    paths = [p for p in sorted(nbs_dir.glob('*.ipynb')) if not p.name.startswith(('_', '.'))]
    paths.sort(key=lambda p: (p.stem != 'index', p.stem.startswith('api_'), p.stem))
    pages = []
    for p in paths:
        nb = nbformat.read(p, as_version=4)
        pages.append(Page(p, p.stem, _title(nb, p.stem), 'API reference' if p.stem.startswith('api_') else 'Guide'))
    return pages


def execute_notebook(path, timeout=600, threads=1):
    """Run every cell of the notebook at `path` in a fresh kernel, with the notebook's folder as the
    working directory; return the executed `NotebookNode`. A cell that raises raises `DocsError`
    naming the notebook, with the cell's traceback. The kernel gets `threads` intra-op threads unless
    `OMP_NUM_THREADS` is set: the lesson's small tabular batches gain nothing from more, and on a busy
    machine extra threads that wait on each other slow a notebook down many times over."""
    import os
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3',
                            resources={'metadata': {'path': str(path.parent)}},
                            extra_arguments=['--IPKernelApp.log_level=ERROR'])   # not its TCP-transport notice
    env = {**os.environ}
    env.setdefault('OMP_NUM_THREADS', str(threads))
    try: client.execute(env=env)
    except (CellExecutionError, CellTimeoutError) as e:
        raise DocsError(f"{path.name}: a cell failed while building the docs\n{e}") from None
    return nb


def _check_outputs(nb, path):
    "A plot that reached the page as text would leave a hole in the docs: fail on it."
    for i, c in enumerate(nb.cells):
        for o in c.get('outputs', []):
            data = o.get('data', {})
            if set(data) == {'text/plain'} and data['text/plain'].startswith('<Figure size'):
                raise DocsError(f"{path.name}, cell {i}: a matplotlib Figure was shown as text, not as a plot. "
                                "Jupyter draws a pyplot-free Figure once IPython's PNG formatter is on: "
                                "`IPython.core.pylabtools.select_figure_formats(get_ipython(), {'png'})` "
                                "(or `%matplotlib inline`) before the cell")


def _check_executed(nb, path):
    "With `execute=False` the notebook must already hold its outputs, and no errors."
    code = [c for c in nb.cells if c.cell_type == 'code' and c.source.strip()]
    for c in code:
        for o in c.get('outputs', []):
            if o.output_type == 'error':
                raise DocsError(f"{path.name}: a cell holds an error output ({o.ename}: {o.evalue})")
    if code and all(c.get('execution_count') is None for c in code):
        raise DocsError(f"{path.name} has not been executed: build with execute=True, or point `nbs` at executed copies")


# --- LaTeX to MathML -------------------------------------------------------------------------------
_CODE = re.compile(r'(```.*?```|~~~.*?~~~|`[^`\n]*`)', flags=re.S)
_DISPLAY = re.compile(r'\$\$(.+?)\$\$', flags=re.S)
_INLINE = re.compile(r'(?<![\\$\w])\$(?=\S)([^$\n]+?)(?<=\S)\$(?![\w$])')


def _mathml(latex, display, where):
    from latex2mathml.converter import convert
    try: return convert(latex.strip(), display='block' if display else 'inline').replace('\n', '')
    except Exception as e: raise DocsError(f"{where}: cannot render the math ${latex}$ ({e})") from None


def math_to_mathml(md, where='markdown'):
    "`md` with `$$…$$` and `$…$` (outside code) replaced by MathML, which browsers render without scripts."
    parts = _CODE.split(md)
    for i in range(0, len(parts), 2):
        s = _DISPLAY.sub(lambda m: '\n\n' + _mathml(m.group(1), True, where) + '\n\n', parts[i])
        parts[i] = _INLINE.sub(lambda m: _mathml(m.group(1), False, where), s)
    return ''.join(parts)


# --- rendering -------------------------------------------------------------------------------------
_TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}
<link rel="icon" href="data:,">
<style type="text/css">{{ resources.l5.css }}</style>
{%- endblock extra_css -%}
{%- block body_header -%}
<body class="l5-site" data-jp-theme-light="true" data-jp-theme-name="JupyterLab Light">
<header class="l5-top"><a href="index.html">fastai_l5</a><span>momentum, dropout and batch norm, made visible</span></header>
<div class="l5-layout">
<nav class="l5-nav" aria-label="Pages">{{ resources.l5.nav }}</nav>
<main class="l5-main jp-Notebook">
{%- endblock body_header -%}
{% block body_footer %}
{{ resources.l5.pager }}
</main>
<aside class="l5-toc" aria-label="On this page"></aside>
</div>
</body>
{% endblock body_footer %}
"""

_CSS = """
body.l5-site { margin: 0; font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; color: #1f2328; background: #fff; }
.l5-top { position: sticky; top: 0; z-index: 10; display: flex; gap: 1em; align-items: baseline; padding: .7em 1.5em;
  background: #1f3a5f; color: #dfe7f1; font-size: .95em; }
.l5-top a { color: #fff; font-weight: 700; font-size: 1.15em; text-decoration: none; }
.l5-layout { display: grid; grid-template-columns: 14em minmax(0, 1fr) 12em; gap: 1.5em; max-width: 100em; margin: 0 auto; }
.l5-nav, .l5-toc { position: sticky; top: 3.2em; align-self: start; max-height: calc(100vh - 4em); overflow-y: auto;
  padding: 1em .5em; font-size: .9em; }
.l5-nav h4, .l5-toc h4 { margin: 1em 0 .3em; color: #57606a; text-transform: uppercase; font-size: .75em; letter-spacing: .05em; }
.l5-nav ul, .l5-toc ul { list-style: none; margin: 0; padding: 0; }
.l5-nav li a, .l5-toc li a { display: block; padding: .25em .6em; border-radius: 4px; color: #24292f; text-decoration: none; }
.l5-nav li a:hover, .l5-toc li a:hover { background: #eef2f7; }
.l5-nav li a[aria-current="page"] { background: #1f3a5f; color: #fff; }
.l5-toc li.l5-h3 a { padding-left: 1.6em; }
.l5-toc li.l5-api a { font-family: var(--jp-code-font-family); font-size: .9em; overflow-wrap: anywhere; }
.l5-main { min-width: 0; padding: 1em 0 3em; overflow: visible; }
.l5-main .jp-Cell { padding: 4px 0; }
.l5-main .jp-InputArea, .l5-main .jp-InputArea-editor { overflow-x: auto; }
.l5-main .jp-InputArea-editor pre { overflow: visible; }
.l5-main .jp-RenderedMarkdown { font-size: 15px; line-height: 1.6; }
.l5-main .jp-RenderedHTMLCommon h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
.l5-main .jp-OutputArea-output.jp-RenderedMarkdown h3 { font-family: var(--jp-code-font-family); }
.l5-main .jp-RenderedMarkdown pre, .l5-main .jp-RenderedMarkdown code { font-family: var(--jp-code-font-family); font-size: 13px; }
.l5-main .jp-RenderedMarkdown .highlight pre { background: #f6f8fa; padding: .6em .8em; border-radius: 6px; line-height: 1.45; }
.l5-main .jp-OutputArea-output img { max-width: 100%; height: auto; }
.l5-main math[display="block"] { margin: .6em 0; font-size: 1.1em; }
.l5-main a.anchor-link { display: inline; visibility: hidden; margin-left: .3em; text-decoration: none; }
.l5-main :is(h1, h2, h3, h4):hover a.anchor-link { visibility: visible; }
.l5-pager { display: flex; justify-content: space-between; gap: 1em; margin-top: 3em; padding-top: 1em; border-top: 1px solid #d0d7de; }
.l5-pager a { display: block; padding: .6em 1em; border: 1px solid #d0d7de; border-radius: 6px; text-decoration: none; color: #1f3a5f; }
.l5-pager a:hover { background: #eef2f7; }
.l5-pager .l5-next { margin-left: auto; text-align: right; }
.l5-pager small { display: block; color: #57606a; }
@media (max-width: 70em) { .l5-layout { grid-template-columns: 13em minmax(0, 1fr); } .l5-toc { display: none; } }
@media (max-width: 45em) { .l5-layout { display: block; padding: 0 1em; } .l5-nav { position: static; max-height: none; } }
"""


def _nav(pages, current):
    out, section = [], None
    for p in pages:
        if p.section != section:
            if section is not None: out.append('</ul>')
            section = p.section
            out.append(f'<h4>{html.escape(section)}</h4><ul>')
        cur = ' aria-current="page"' if p is current else ''
        out.append(f'<li><a href="{p.href}"{cur}>{html.escape(p.title)}</a></li>')
    out.append('</ul>')
    return '\n'.join(out)


def _pager(pages, i):
    links = []
    if i > 0:
        p = pages[i-1]
        links.append(f'<a class="l5-prev" href="{p.href}" rel="prev"><small>Previous</small>{html.escape(p.title)}</a>')
    if i < len(pages)-1:
        p = pages[i+1]
        links.append(f'<a class="l5-next" href="{p.href}" rel="next"><small>Next</small>{html.escape(p.title)}</a>')
    return f'<nav class="l5-pager" aria-label="Previous and next page">{"".join(links)}</nav>'


def _slug(text):
    "GitHub-style anchor: lower case, words joined by '-', so `[x](page.ipynb#part-two)` works as authors expect."
    return re.sub(r'[^\w]+', '-', text.strip().lower()).strip('-') or 'section'


def _postprocess(body, title):
    """Heading ids as slugs (anchor links follow), `.ipynb` links to `.html`, alt text on plots, and the
    on-this-page list from the h2/h3 headings."""
    from bs4 import BeautifulSoup
    soup = BeautifulSoup(body, 'html.parser')
    main, seen, toc, section = soup.find('main'), set(), [], title
    for el in main.find_all(['h1', 'h2', 'h3', 'h4', 'img']):
        if el.name == 'img':
            if el.get('alt', '').startswith('No description'): el['alt'] = f'Plot: {section}'
            continue
        anchor = el.find('a', class_='anchor-link')
        text = ''.join(c.get_text() for c in el.contents if c is not anchor).strip()
        section = text or section
        if not el.get('id'): continue
        slug, n = _slug(text), 1
        while slug in seen: n += 1; slug = f'{_slug(text)}-{n}'
        seen.add(slug)
        el['id'] = slug
        if anchor is not None: anchor['href'] = f'#{slug}'
        api = el.find_parent(class_='jp-OutputArea-output') is not None      # a show_doc heading
        if el.name in ('h2', 'h3'): toc.append((el.name + (' l5-api' if api else ''), slug, text))
    for a in soup.find_all('a', href=True):
        a['href'] = re.sub(r'^(?![a-z][a-z0-9+.-]*:)([^#]*?)\.ipynb(?=#|$)', r'\1.html', a['href'])
    aside = soup.find('aside', class_='l5-toc')
    if toc:
        items = ''.join(f'<li class="l5-{lvl}"><a href="#{slug}">{html.escape(text)}</a></li>' for lvl, slug, text in toc)
        aside.append(BeautifulSoup(f'<h4>On this page</h4><ul>{items}</ul>', 'html.parser'))
    return str(soup)


def _prepare(nb, page):
    "Math to MathML in markdown cells and markdown outputs; the page title for `<title>`."
    for i, cell in enumerate(nb.cells):
        where = f'{page.path.name}, cell {i}'
        if cell.cell_type == 'markdown': cell.source = math_to_mathml(cell.source, where)
        for o in cell.get('outputs', []):
            md = o.get('data', {}).get('text/markdown')
            if md is not None: o.data['text/markdown'] = math_to_mathml(md, where)
    nb.metadata['title'] = f'{page.title} — fastai_l5'
    return nb


def _exporter():
    import logging
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    quiet = logging.getLogger('fastai_l5.docs.nbconvert')
    quiet.setLevel(logging.ERROR)                       # plots get their alt text in _postprocess
    return HTMLExporter(log=quiet, template_name='lab', template_file='l5_page.html.j2',
                        extra_loaders=[DictLoader({'l5_page.html.j2': _TEMPLATE})],
                        exclude_input_prompt=True, exclude_output_prompt=True)


def _render(exporter, nb, pages, i):
    page = pages[i]
    resources = {'l5': {'css': _CSS, 'nav': _nav(pages, page), 'pager': _pager(pages, i)}}
    body, _ = exporter.from_notebook_node(_prepare(copy.deepcopy(nb), page), resources=resources)
    return _postprocess(body, page.title)


def _check_out(out):
    "Refuse, before any notebook runs, an `out` that is a file or a folder of someone else's files."
    out = Path(out)
    if out.exists():
        if not out.is_dir(): raise NotADirectoryError(f"--out {out} is a file; give a folder for the docs site")
        if any(out.iterdir()) and not (out/_SITE_MARKER).exists():
            raise FileExistsError(f"{out} is not empty and holds no docs site built by fastai_l5: "
                                  "give an empty or new folder, so nothing of yours is overwritten")
    return out


def _prepare_out(out):
    out = _check_out(out)
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    (out/_SITE_MARKER).write_text('built by fastai_l5.docs.build_docs; rebuilt from scratch each time\n')
    return out


def _copy_assets(nbs_dir, out):
    "Images and data next to the notebooks, so relative links in their markdown keep working."
    for f in nbs_dir.rglob('*'):
        rel = f.relative_to(nbs_dir)
        if any(part.startswith(('.', '_')) for part in rel.parts): continue
        if f.is_file() and f.suffix.lower() in _ASSETS:
            (out/rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out/rel)


def build_docs(nbs='nbs', out='_site', execute=True, timeout=600, executed=None) -> Path:
    """Render every notebook in `nbs` (see `find_nbs`) to a static HTML site in `out`, one page per
    notebook (`index.ipynb` becomes `index.html`), with a nav bar, previous/next links and an
    on-this-page list, and return the site's folder.

    `execute=True` runs each notebook in a fresh kernel first (cwd = `nbs`); any cell error raises
    `DocsError` and nothing is written. `execute=False` renders the notebooks as stored, so a folder of
    already-executed copies can be rendered without running them again; a stored error output or a
    notebook never executed raises `DocsError`. `out` is rebuilt from scratch; a non-empty folder that
    is not a site built here is refused. With `executed` (a folder), the executed notebooks are also
    saved there, so tests can inspect them, or a later build can render them with `execute=False`."""
    import nbformat
    pages = docs_pages(nbs)
    nbs_dir = pages[0].path.parent
    _check_out(out)
    if execute: nbs_run = [execute_notebook(p.path, timeout=timeout) for p in pages]
    else:
        nbs_run = [nbformat.read(p.path, as_version=4) for p in pages]
        for nb, p in zip(nbs_run, pages): _check_executed(nb, p.path)
    for nb, p in zip(nbs_run, pages): _check_outputs(nb, p.path)
    exporter = _exporter()
    rendered = [_render(exporter, nb, pages, i) for i, nb in enumerate(nbs_run)]
    out = _prepare_out(out)
    for page, body in zip(pages, rendered): (out/page.href).write_text(body, encoding='utf-8')
    if executed is not None:
        Path(executed).mkdir(parents=True, exist_ok=True)
        for nb, page in zip(nbs_run, pages): nbformat.write(nb, Path(executed)/page.path.name)
    _copy_assets(nbs_dir, out)
    return out.resolve()
