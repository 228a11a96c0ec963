"""The docs site: `build_docs` renders every notebook of nbs/, and every page opens cleanly in headless
Chromium (Debian's `chromium` + `chromium-driver`): it loads, has the nav, shows every image, logs
no console error, loads nothing from the network, and every link and anchor resolves."""
import os
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from fastai_l5.docs import DocsError, build_docs, docs_pages, find_nbs, math_to_mathml

NBS = Path(__file__).resolve().parent.parent / 'nbs'
CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
CHROMIUM_FLAGS = ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--window-size=1280,900']


# --- a headless browser, and what it checks on a page ------------------------------------------------
@pytest.fixture(scope='module')
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        why = "headless Chromium checks the docs: apt-get update && apt-get install -y chromium chromium-driver"
        if os.environ.get('CI'): pytest.fail(why)     # CI installs it, so there its absence is a failure
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix='l5-chromium-')
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f'--user-data-dir={profile}']: opts.add_argument(flag)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


_PAGE_STATE = """
const imgs = Array.from(document.images);
return {ready: document.readyState, title: document.title, nav: !!document.querySelector('nav.l5-nav'),
        main: !!document.querySelector('main.l5-main'),
        broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 80)),
        n_imgs: imgs.length,
        remote: Array.from(document.querySelectorAll('script[src], link[href], img[src], iframe[src]'))
                     .map(e => e.src || e.href).filter(u => /^(https?:)?\\/\\//.test(u))};
"""


def page_problems(driver, path):
    "Everything wrong with the page at `path` as the browser sees it (empty when it is fine)."
    driver.get_log('browser')                                     # start from an empty console
    driver.get(Path(path).resolve().as_uri())
    state = driver.execute_script(_PAGE_STATE)
    problems = []
    if state['ready'] != 'complete' or not state['nav'] or not state['main']:
        problems.append(f"{path.name} did not load as a docs page (state {state['ready']}, title {state['title']!r})")
    problems += [f"{path.name}: image not shown: {src}" for src in state['broken']]
    problems += [f"{path.name}: loads from the network: {u}" for u in state['remote']]
    problems += [f"{path.name}: console {e['level']}: {e['message']}" for e in driver.get_log('browser')
                 if e['level'] in ('SEVERE', 'ERROR')]
    return problems, state


class _Links(HTMLParser):
    "Every `href`/`src` and every `id` of a page."
    def __init__(self):
        super().__init__()
        self.refs, self.ids, self.nav_refs, self._in_nav = [], set(), [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if 'id' in a: self.ids.add(a['id'])
        if tag == 'nav' and 'l5-nav' in (a.get('class') or ''): self._in_nav += 1
        for k in ('href', 'src'):
            if a.get(k): self.refs.append(a[k])
            if k == 'href' and a.get(k) and self._in_nav: self.nav_refs.append(a[k])

    def handle_endtag(self, tag):
        if tag == 'nav' and self._in_nav: self._in_nav -= 1


def parse_page(path):
    p = _Links()
    p.feed(Path(path).read_text(encoding='utf-8'))
    return p


def link_problems(site):
    "Local links whose file or anchor is missing, in every page of `site`."
    site, problems = Path(site), []
    pages = {p: parse_page(p) for p in site.glob('*.html')}
    for page, parsed in pages.items():
        for ref in parsed.refs:
            u = urlsplit(ref)
            if u.scheme or u.netloc: continue     # data: URIs; external links are not followed offline
            target = (page.parent/unquote(u.path)).resolve() if u.path else page
            if not target.exists(): problems.append(f"{page.name}: link to missing {ref}"); continue
            if u.fragment and target.suffix == '.html':
                ids = (pages.get(target) or parse_page(target)).ids
                if unquote(u.fragment) not in ids and u.fragment not in ids:
                    problems.append(f"{page.name}: link to missing anchor {ref}")
    return problems


# --- the real site ---------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def site(tmp_path_factory, executed_notebooks):
    """The docs site built from nbs/, rendered from the session's executed copies (conftest.py), so each
    notebook runs once per test session; a notebook whose cells raised fails here, naming it."""
    folder, errors = executed_notebooks
    if errors: pytest.fail('notebooks with cell errors: ' + ', '.join(sorted(errors)))
    return build_docs(nbs=folder, out=tmp_path_factory.mktemp('site'), execute=False)


def test_site_has_a_page_per_notebook(site):
    pages = docs_pages(NBS)
    assert [p.slug for p in pages][0] == 'index'
    assert sorted(f.name for f in site.glob('*.html')) == sorted(p.href for p in pages)
    for p in pages:
        nav = parse_page(site/p.href).nav_refs
        assert nav == [q.href for q in pages], f"{p.href}: nav {nav}"


def test_every_page_opens_clean_in_chromium(site, browser):
    problems, n_imgs = [], 0
    for page in sorted(site.glob('*.html')):
        found, state = page_problems(browser, page)
        problems += found
        n_imgs += state['n_imgs']
    assert not problems, '\n'.join(problems)
    assert n_imgs > 0, "no plot on any page: the figures did not reach the site"


def test_every_link_resolves(site):
    problems = link_problems(site)
    assert not problems, '\n'.join(problems)


def test_api_cells_render_as_html(site):
    "show_doc cells arrive as rendered markdown: a heading with an anchor and a highlighted signature."
    html = '\n'.join(p.read_text(encoding='utf-8') for p in site.glob('*.html'))
    assert 'data-mime-type="text/markdown"' in html
    assert '<h3 id=' in html and 'class="highlight"' in html
    assert '```' not in html.replace('&#96;', '')


# --- the builder and the checks, on small notebooks -----------------------------------------------------
def _write(folder, name, *cells):
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=list(cells)), folder/f'{name}.ipynb')


def _small_site(tmp_path):
    nbs = tmp_path/'nbs'
    _write(nbs, 'index', new_markdown_cell('# Home\n\nSee [the other page](01_other.ipynb#part-two) and '
                                           '$S_t = \\beta S_{t-1} + g_t$.\n\n## Part one'),
           new_code_cell("from IPython import get_ipython\nfrom IPython.core.pylabtools import select_figure_formats\n"
                         "select_figure_formats(get_ipython(), {'png'})\nfrom matplotlib.figure import Figure\n"
                         "fig = Figure(figsize=(2, 2)); fig.subplots().plot([0, 1, 4]); fig"))
    _write(nbs, '01_other', new_markdown_cell('# Other\n\n## Part two\n\nBack [home](index.ipynb).'),
           new_code_cell('1 + 1'))
    _write(nbs, 'api_thing', new_markdown_cell('# API: thing'),
           new_code_cell('from nbdev.showdoc import show_doc\nfrom fastai_l5.docs import find_nbs\nshow_doc(find_nbs)'))
    return nbs


def test_small_site_renders_and_checks_pass(tmp_path, browser):
    nbs = _small_site(tmp_path)
    site = build_docs(nbs=nbs, out=tmp_path/'site', executed=tmp_path/'executed')
    assert [p.slug for p in docs_pages(nbs)] == ['index', '01_other', 'api_thing']
    index = (site/'index.html').read_text(encoding='utf-8')
    assert 'href="01_other.html#part-two"' in index and '<math' in index and 'data:image/png;base64' in index
    assert 'API reference' in index and 'rel="next"' in index and 'alt="Plot: Part one"' in index
    assert not link_problems(site)
    for page in site.glob('*.html'): assert page_problems(browser, page)[0] == []
    # the executed copies keep their LaTeX, and render again without running (execute=False)
    copies = sorted(p.name for p in (tmp_path/'executed').glob('*.ipynb'))
    assert copies == sorted(p.path.name for p in docs_pages(nbs))
    assert '$S_t' in nbformat.read(tmp_path/'executed'/'index.ipynb', as_version=4).cells[0].source
    again = build_docs(nbs=tmp_path/'executed', out=tmp_path/'site2', execute=False)
    assert (again/'index.html').read_text(encoding='utf-8') == index


def test_checks_catch_broken_pages(tmp_path, browser):
    "The browser and link checks can fail: a missing image, a console error, a dead link and anchor."
    nbs = _small_site(tmp_path)
    site = build_docs(nbs=nbs, out=tmp_path/'site')
    page = site/'01_other.html'
    page.write_text(page.read_text(encoding='utf-8').replace(
        '</main>', '<img src="missing.png"><script>console.error("boom")</script>'
                   '<a href="nowhere.html">x</a><a href="index.html#no-such-part">y</a></main>'), encoding='utf-8')
    problems, _ = page_problems(browser, page)
    assert any('image not shown' in p for p in problems), problems
    assert any('boom' in p for p in problems), problems
    links = link_problems(site)
    assert any('nowhere.html' in p for p in links) and any('no-such-part' in p for p in links), links
    (tmp_path/'blank.html').write_text('<html><body>not ours</body></html>')
    assert any('did not load' in p for p in page_problems(browser, tmp_path/'blank.html')[0])


def test_cell_error_fails_the_build(tmp_path):
    nbs = tmp_path/'nbs'
    _write(nbs, 'index', new_markdown_cell('# Home'), new_code_cell('raise ValueError("bad cell")'))
    with pytest.raises(DocsError, match=r'index\.ipynb.*(\n|.)*bad cell'): build_docs(nbs=nbs, out=tmp_path/'site')
    assert not (tmp_path/'site').exists(), "a failed build writes nothing"


def test_unexecuted_or_errored_copies_are_refused(tmp_path):
    nbs = tmp_path/'nbs'
    _write(nbs, 'index', new_markdown_cell('# Home'), new_code_cell('1 + 1'))
    with pytest.raises(DocsError, match='has not been executed'): build_docs(nbs=nbs, out=tmp_path/'site', execute=False)
    nb = nbformat.read(nbs/'index.ipynb', as_version=4)
    nb.cells[1].execution_count = 1
    nb.cells[1].outputs = [nbformat.v4.new_output('error', ename='ZeroDivisionError', evalue='division by zero', traceback=[])]
    nbformat.write(nb, nbs/'index.ipynb')
    with pytest.raises(DocsError, match='ZeroDivisionError'): build_docs(nbs=nbs, out=tmp_path/'site', execute=False)


def test_figure_shown_as_text_fails(tmp_path):
    nbs = tmp_path/'nbs'
    _write(nbs, 'index', new_markdown_cell('# Home'),
           new_code_cell('from matplotlib.figure import Figure\nfig = Figure(); fig.subplots().plot([1, 2]); fig'))
    with pytest.raises(DocsError, match='Figure was shown as text'): build_docs(nbs=nbs, out=tmp_path/'site')


def test_bad_folders_get_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match='no notebooks folder.*checkout'): find_nbs('no_such_nbs')
    nbs = tmp_path/'nbs'
    _write(nbs, 'index', new_markdown_cell('# Home'))
    assert find_nbs('nbs') == nbs.resolve()
    mine = tmp_path/'mine'
    mine.mkdir()
    (mine/'thesis.txt').write_text('precious')
    _write(nbs, 'slow', new_code_cell('import time; time.sleep(600)'))          # refused before this runs
    with pytest.raises(FileExistsError, match='not empty'): build_docs(nbs=nbs, out=mine)
    (nbs/'slow.ipynb').unlink()
    assert (mine/'thesis.txt').read_text() == 'precious'
    site = build_docs(nbs=nbs, out=tmp_path/'site')
    assert build_docs(nbs=nbs, out=site) == site                  # its own site is rebuilt


def test_math_becomes_mathml_outside_code():
    md = 'EWMA $S_t = \\beta S_{t-1}$, code `$HOME` stays, and\n\n$$\\sum_k w_k = 1$$\n\n```\nx = "$a$"\n```'
    out = math_to_mathml(md)
    assert out.count('<math') == 2 and 'display="block"' in out
    assert '`$HOME`' in out and 'x = "$a$"' in out
    assert math_to_mathml('costs $5 and $6 each') == 'costs $5 and $6 each'
