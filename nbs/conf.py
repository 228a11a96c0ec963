"""Sphinx configuration of the docs site: the notebooks of this folder, executed by myst-nb, plus an API
reference generated from the docstrings of every public name of `fastai_l5.all`.

Build it with `fastai-l5 docs` (progress per notebook, clear errors, a cache of executed notebooks) or
by hand with `sphinx-build -b html nbs _site`. The site works from disk with no network: furo ships its
assets, Sphinx's search runs from `searchindex.js`, and math becomes MathML (docutils' own converter)."""
import functools
import re
import sys
import time
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from docutils.transforms import Transform
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # a checkout's fastai_l5 before any installed
import fastai_l5  # noqa: E402

project = 'fastai_l5'
release = fastai_l5.__version__
extensions = ['myst_nb', 'sphinx.ext.autodoc']
root_doc = 'index'
exclude_patterns = ['_*', '.*', '**/.ipynb_checkpoints']
html_theme = 'furo'
html_title = 'fastai_l5'
html_math_renderer = 'mathml'
html_copy_source = False           # the notebooks' JSON is not part of the site
html_show_sourcelink = False
html_show_copyright = False
# Intersphinx is left out: no installed package ships an objects.inv for fastai, PyTorch or pandas,
# and the build may not download one.

myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence']
myst_heading_anchors = 3
nb_execution_mode = 'cache'        # `fastai-l5 docs` sets nb_execution_cache_path
nb_execution_raise_on_error = True # a cell error fails the build
nb_execution_show_tb = True
nb_execution_timeout = 900
nb_merge_streams = True
nb_ipywidgets_js = {}              # no widget scripts from a CDN

autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
suppress_warnings = ['mystnb.unknown_mime_type']


# --- the API reference: every public name of fastai_l5.all, grouped by the module that defines it -------
def public_names():
    "The names `from fastai_l5.all import *` brings in, in the order of fastai_l5/all.py's imports."
    ns = {}
    exec('from fastai_l5.all import *', ns)
    return [n for n in ns if not n.startswith('_')]


def names_by_module():
    "`{module: [name, ...]}` for the public names, each under the fastai_l5 module whose `__all__` holds it."
    import fastai_l5.all  # noqa: F401  (imports every module that all.py re-exports)
    modules = [m for name, m in sorted(sys.modules.items()) if name.startswith('fastai_l5.') and hasattr(m, '__all__')]
    groups = {}
    for n in public_names():
        home = next((m for m in modules if n in m.__all__), None)
        if home is None: raise ValueError(f"fastai_l5.all exports {n!r}, but no fastai_l5 module lists it in __all__")
        groups.setdefault(home.__name__, []).append(n)
    return groups


def _autodoc(module, name):
    obj = getattr(sys.modules[module], name)
    kind = 'autoclass' if isinstance(obj, type) else 'autofunction' if callable(obj) else 'autodata'
    opts = ['   :members:'] if kind == 'autoclass' else ['   :annotation:'] if kind == 'autodata' else []
    return [f'.. {kind}:: {module}.{name}', *opts, '']


class ApiReference(SphinxDirective):
    "`.. l5-api-reference::`: a section per module, an autodoc entry (one anchor) per public name."
    def run(self):
        lines = []
        for module, names in names_by_module().items():
            lines += [module, '-' * len(module), '', f'.. automodule:: {module}', '   :no-index:', '']
            for n in names: lines += _autodoc(module, n)
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source='fastai_l5.all'), node)
        return node.children


@functools.lru_cache(maxsize=None)
def _homes():
    "`{public name: its module}`."
    return {n: m for m, names in names_by_module().items() for n in names}


def _code_span(inner):
    "A docstring's `code` span: a link to the reference when it names a public name (`adam()` too), else code."
    home = _homes().get(inner.removesuffix('()'))
    return f":py:obj:`{inner} <{home}.{inner.removesuffix('()')}>`" if home else f'``{inner}``'


def _plain_docstring(app, what, name, obj, options, lines):
    """Our docstrings are plain text with `code` spans, not reStructuredText: keep |x|, a*b and name_ literal,
    and turn the spans into code or links. A variable (`EXAMPLES`) shows no docstring rather than its type's."""
    if what == 'data' and lines and (type(obj).__doc__ or '').strip().startswith(lines[0].strip()): lines.clear()
    for i, line in enumerate(lines):
        parts = re.split(r'`([^`\s][^`]*?)`', line)           # odd items: the insides of `code` spans
        lines[i] = ''.join(_code_span(p) if k % 2 else re.sub(r'([|*\\`]|_(?=\W|$))', r'\\\1', p)
                           for k, p in enumerate(parts))


# --- math as MathML, so no script is needed to show it ----------------------------------------------------
_TEX_ALIASES = {r'\dots': r'\ldots'}     # LaTeX commands docutils' converter lacks -> ones it knows


def _mathml(self, node, block):
    from docutils.utils.math import MathError, latex2mathml
    tex = re.sub(r'\\[a-zA-Z]+', lambda m: _TEX_ALIASES.get(m.group(0), m.group(0)), node.astext())
    try: self.body.append(latex2mathml.tex2mathml(tex, as_block=block))
    except MathError as e:
        logging.getLogger(__name__).warning(f"math not converted to MathML: {e}: {node.astext()}", location=node)
        self.body.append(f'<code>{self.encode(node.astext())}</code>')
    raise nodes.SkipNode


def _inline_math(self, node): _mathml(self, node, block=False)
def _block_math(self, node): _mathml(self, node, block=True)


class DropNestedRules(Transform):
    """nbdev's `show_doc` output starts with a horizontal rule (`---`), which docutils allows only between
    sections, not inside a cell's output: drop those rules (the entry's own heading separates it)."""
    default_priority = 829                      # before docutils' check of transitions (830)

    def apply(self):
        for rule in list(self.document.findall(nodes.transition)):
            if not isinstance(rule.parent, (nodes.document, nodes.section)): rule.parent.remove(rule)


# --- one line of progress per page ------------------------------------------------------------------------
def _before_read(app, env, docnames):
    app.l5_todo, app.l5_started = sorted(docnames), {}


def _started(app, docname, source):
    app.l5_started[docname] = time.time()
    done = len(app.l5_started)
    print(f"docs: [{done}/{len(app.l5_todo)}] {docname} ...", end='', flush=True)


def _finished(app, doctree):
    docname = app.env.docname
    how = ''
    if str(app.env.doc2path(docname)).endswith('.ipynb'):
        from myst_nb.sphinx_ import NbMetadataCollector
        data = NbMetadataCollector.get_exec_data(app.env, docname) or {}
        how = ', executed' if data.get('mtime', 0) >= app.l5_started[docname] - 1 else ', from the cache'
    print(f" {time.time() - app.l5_started[docname]:.1f} s{how}", flush=True)


def setup(app):
    app.add_html_math_renderer('mathml', (_inline_math, None), (_block_math, None))
    app.add_directive('l5-api-reference', ApiReference)
    app.add_transform(DropNestedRules)
    app.connect('autodoc-process-docstring', _plain_docstring)
    app.connect('env-get-outdated', lambda app, env, added, changed, removed: ['api'])  # docstrings may have changed
    app.connect('env-before-read-docs', _before_read)
    app.connect('source-read', _started)
    app.connect('doctree-read', _finished)
