"""The docs site (Sphinx + myst-nb, configured in nbs/conf.py): built from the session's executed notebooks, it
has a page per notebook in order, an API reference with an anchor per public name, and every page opens from
disk in headless Chromium (Debian's `chromium` + `chromium-driver`) with no console error and no request
outside file://; search finds API names and math is drawn."""
import contextlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from fastai_l5._docs import build_site, execute_notebooks
from fastai_l5.cli import main

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
SCREENSHOT = ROOT/'tests'/'screenshots'/'docs_index.png'
CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
CHROMIUM_FLAGS = ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                  '--disable-background-networking', '--disable-component-update', '--disable-sync',
                  '--window-size=1280,900']


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
return {ready: document.readyState, title: document.title, main: !!document.querySelector('article[role=main]'),
        broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 80)),
        n_imgs: imgs.length,
        requests: performance.getEntriesByType('resource').map(e => e.name)
                  .concat(Array.from(document.querySelectorAll('script[src], link[href], img[src], iframe[src]'))
                               .map(e => e.src || e.href)).filter(u => !u.startsWith('file://')),
        traceback: !!document.querySelector('.output.traceback, .ansi-red-fg') ||
                   document.body.innerText.includes('Traceback (most recent call last)')};
"""


def page_problems(driver, path):
    "Everything wrong with the page at `path` as the browser sees it (empty when it is fine), and its state."
    driver.get_log('browser')                                     # start from an empty console
    driver.get(Path(path).resolve().as_uri())
    state = driver.execute_script(_PAGE_STATE)
    problems = []
    if state['ready'] != 'complete' or not state['main']:
        problems.append(f"{path.name} did not load as a docs page (state {state['ready']}, title {state['title']!r})")
    problems += [f"{path.name}: image not shown: {src}" for src in state['broken']]
    problems += [f"{path.name}: request outside file://: {u}" for u in state['requests']]
    problems += [f"{path.name}: shows a traceback"] * state['traceback']
    problems += [f"{path.name}: console {e['level']}: {e['message']}" for e in driver.get_log('browser')
                 if e['level'] in ('SEVERE', 'ERROR')]
    return problems, state


# --- the real site, from the notebooks the session executed once (conftest.py) -------------------------
@pytest.fixture(scope='module')
def site(tmp_path_factory, executed_notebooks):
    """The site built from nbs/ with the session's jupyter-cache: no notebook runs again. Returns the site
    folder, the progress it printed and Sphinx's warnings."""
    folder, errors = executed_notebooks
    if errors: pytest.fail('notebooks with cell errors: ' + ', '.join(sorted(errors)))
    progress, warnings = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(progress):
        out = build_site(NBS, tmp_path_factory.mktemp('site'), cache=folder/'.docs_cache', warnings=warnings)
    return out, progress.getvalue(), warnings.getvalue()


def guide_order():
    return ['index'] + sorted(p.stem for p in NBS.glob('0*_*.ipynb')) + ['api'] + sorted(p.stem for p in NBS.glob('api_*.ipynb'))


@pytest.mark.slow
def test_pages_in_order_with_a_progress_line_each_and_nothing_executed_twice(site):
    out, progress, warnings = site
    assert not warnings, warnings
    pages = guide_order()
    assert {p.stem for p in out.glob('*.html')} == set(pages) | {'genindex', 'search'}
    nav = re.findall(r'class="reference internal" href="([\w.]+)\.html"', (out/'index.html').read_text(encoding='utf-8'))
    assert [p for p in dict.fromkeys(nav) if p in pages] == pages[1:], nav   # sidebar: guide, then the reference
    lines = progress.splitlines()
    assert len(lines) == len(pages) and all(any(f'] {p} ...' in l for l in lines) for p in pages), progress
    assert sum(l.endswith('from the cache') for l in lines) == len(pages) - 1, progress      # all but api.rst
    assert 'executed' not in progress


def public_names():
    ns = {}
    exec('from fastai_l5.all import *', ns)
    return {n: ns[n] for n in ns if not n.startswith('_')}


@pytest.mark.slow
def test_api_reference_has_an_entry_per_public_name(site):
    html = (site[0]/'api.html').read_text(encoding='utf-8')
    ids = set(re.findall(r'<dt class="sig sig-object py" id="([\w.]+)"', html))
    for name, obj in public_names().items():
        assert any(i.startswith('fastai_l5.') and i.endswith(f'.{name}') and i.count('.') == 2 for i in ids), name
    assert len([i for i in ids if i.count('.') == 2]) == len(public_names())
    assert 'build_site' not in html and '_docs' not in html                 # the builder is a tool, not API
    sig = re.search(r'id="fastai_l5.precise.precise_bn".*?</dt>', html, flags=re.S).group(0)
    assert 'n_batches' in sig
    index = (site[0]/'index.html').read_text(encoding='utf-8')
    assert 'href="api.html#fastai_l5.precise.precise_bn"' in index       # the guide links into the reference


@pytest.mark.slow
def test_every_page_opens_clean_in_chromium(site, browser):
    problems, n_imgs = [], 0
    for page in sorted(site[0].glob('*.html')):
        found, state = page_problems(browser, page)
        problems += found
        n_imgs += state['n_imgs']
    assert not problems, '\n'.join(problems)
    assert n_imgs > 10, "hardly any plot on the pages: the figures did not reach the site"


@pytest.mark.slow
def test_search_lists_the_api_entry(site, browser):
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get((site[0]/'search.html').as_uri() + '?q=precise_bn')
    find = "return Array.from(document.querySelectorAll('#search-results li a')).map(a => a.getAttribute('href'))"
    hits = WebDriverWait(browser, 30).until(lambda d: d.execute_script(find))
    assert any(h.startswith('api.html#fastai_l5.precise.precise_bn') for h in hits), hits


@pytest.mark.slow
def test_math_is_drawn_and_the_index_screenshot_saved(site, browser):
    browser.get((site[0]/'index.html').as_uri())
    browser.execute_script('localStorage.clear(); sessionStorage.clear()')   # no search terms highlighted
    browser.get((site[0]/'index.html').as_uri())
    math = browser.execute_script("""return Array.from(document.querySelectorAll('math')).map(m => {
        const r = m.getBoundingClientRect(); return [r.width, r.height, m.textContent]; });""")
    assert math and all(w > 0 and h > 0 for w, h, _ in math), math
    assert any(''.join(t.split()) == 'p/2' for _, _, t in math)             # $p/2$ reached the page as math
    assert '$p/2$' not in browser.execute_script('return document.body.innerText')
    SCREENSHOT.parent.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT)) and SCREENSHOT.stat().st_size > 10_000


@pytest.mark.slow
def test_the_checks_catch_a_broken_page(site, browser, tmp_path):
    "The browser checks can fail: a missing image, a console error, a remote script, a traceback."
    page = tmp_path/'broken.html'
    page.write_text((site[0]/'index.html').read_text(encoding='utf-8').replace('</article>',
                    '<img src="missing.png"><script>console.error("boom")</script>'
                    '<script src="https://cdn.example.org/x.js"></script><pre>Traceback (most recent call last)</pre>'
                    '</article>'), encoding='utf-8')
    problems = '\n'.join(page_problems(browser, page)[0])
    for expected in ('image not shown', 'boom', 'https://cdn.example.org/x.js', 'traceback'): assert expected in problems
    (tmp_path/'blank.html').write_text('<html><body>not ours</body></html>')
    assert 'did not load' in '\n'.join(page_problems(browser, tmp_path/'blank.html')[0])


# --- the command, on a small notebooks folder -------------------------------------------------------------
def small_nbs(tmp_path, *cells):
    nbs = tmp_path/'nbs'
    nbs.mkdir()
    shutil.copy(NBS/'conf.py', nbs)
    nbformat.write(new_notebook(cells=[new_markdown_cell('# Home'), *cells],
                                metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}}),
                   nbs/'index.ipynb')
    return nbs


@pytest.mark.slow
def test_a_cell_error_fails_the_build_with_exit_1(tmp_path, monkeypatch, capsys):
    small_nbs(tmp_path, new_code_cell('raise ValueError("bad cell")'))
    monkeypatch.chdir(tmp_path)
    assert main(['docs', '--out', 'site']) == 1
    err = capsys.readouterr().err
    assert 'fastai-l5 docs: failed: index.ipynb: a cell raised' in err and 'ValueError: bad cell' in err, err
    assert not (tmp_path/'site'/'index.html').exists()


def test_refuses_a_folder_that_is_not_a_site(tmp_path, monkeypatch, capsys):
    small_nbs(tmp_path, new_code_cell('1 + 1'))
    monkeypatch.chdir(tmp_path)
    mine = tmp_path/'mine'
    mine.mkdir()
    (mine/'thesis.txt').write_text('precious')
    assert main(['docs', '--out', 'mine']) == 2
    assert 'not empty' in capsys.readouterr().err and (mine/'thesis.txt').read_text() == 'precious'
    with pytest.raises(FileNotFoundError, match='no docs sources.*run `fastai-l5 docs` from its root'):
        build_site('no_such_nbs', tmp_path/'site')


@pytest.mark.slow
def test_notebooks_run_side_by_side_into_the_cache_once(tmp_path):
    "Two notebooks at a time: each is stored in the cache (or its error returned), and a second call runs none."
    nbs = tmp_path/'nbs'
    nbs.mkdir()
    kernel = {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}}
    nbformat.write(new_notebook(cells=[new_code_cell('import os; os.environ["OMP_NUM_THREADS"]')], metadata=kernel), nbs/'a.ipynb')
    nbformat.write(new_notebook(cells=[new_code_cell('1/0')], metadata=kernel), nbs/'b.ipynb')
    paths, lines = sorted(nbs.glob('*.ipynb')), []
    errors, seconds = execute_notebooks(paths, tmp_path/'cache', jobs=2, copies=tmp_path, progress=lines.append)
    assert set(errors) == {'b.ipynb'} and 'ZeroDivisionError' in errors['b.ipynb']
    assert set(seconds) == {'a.ipynb', 'b.ipynb'} and sorted(l.split(':')[0] for l in lines) == ['a.ipynb', 'b.ipynb']
    out = nbformat.read(tmp_path/'a.ipynb', as_version=4).cells[0].outputs
    assert out[0]['data']['text/plain'] == repr(os.environ.get('OMP_NUM_THREADS', '1'))   # one torch thread unless set
    errors, seconds = execute_notebooks(paths[:1], tmp_path/'cache', progress=lines.append)
    assert errors == {} and seconds == {} and len(lines) == 2      # a.ipynb came from the cache
