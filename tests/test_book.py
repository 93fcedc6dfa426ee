"""The book in a real browser: two chapters built by `optim_lab.docs.render_book`, opened from disk in headless
Chromium, driven over the DevTools protocol, screenshotted, and checked: the page asks nothing of the network (the
book's own MathJax and its fonts come from disk), MathJax typeset every formula (no raw TeX left in the text, no TeX
errors, its fonts loaded) and every plot loaded.

Skips only where no browser can be installed: no Chromium, and not root with apt-get (`make install` installs
Debian's chromium where it can). The screenshots are kept in pytest's temporary folder (the path is printed)."""
from __future__ import annotations
import base64, json, os, re, shutil, subprocess, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Two chapters by default, to stay fast; BOOK_CHAPTERS="all" (or a list of stems) checks the others too.
CHAPTERS = os.environ.get('BOOK_CHAPTERS', '12_radam 45_fcompass').split()
if CHAPTERS == ['all']: CHAPTERS = [p.stem for p in sorted((ROOT / 'nbs').glob('[0-9]*.ipynb'))]
BOOK = ['index', *sorted({'12_radam', '45_fcompass', *CHAPTERS})]  # the pages built, in the book's order
BROWSERS = ['chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable']
# As the machine's notes advise: no first-run or background traffic, which this closed network refuses.
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--no-default-browser-check',
         '--disable-background-networking', '--disable-component-update', '--disable-sync', '--hide-scrollbars',
         '--remote-debugging-port=0', '--window-size=1280,1000']


def find_browser() -> str:
    "The Chromium to drive, or a skip when none is installed and none can be"
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found: return found
    if os.geteuid() == 0 and shutil.which('apt-get'):
        pytest.fail("Chromium is not installed, but could be (root, apt-get): run `make install`, "
                    "or `apt-get install -y chromium`")
    pytest.skip('no browser: Chromium is not installed and cannot be here (needs root and apt-get)')


class Page:
    "One tab of a headless Chromium, driven over the DevTools protocol (websocket-client, which jupyter_server brings)"
    def __init__(self, browser: str, profile: Path):
        import websocket
        self.proc = subprocess.Popen([browser, *FLAGS, f'--user-data-dir={profile}', 'about:blank'],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile / 'DevToolsActivePort', time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().split()) == 2):  # written once it listens
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close(); raise RuntimeError(f'{browser} did not start its DevTools server')
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        self.ws = websocket.create_connection(self._page_url(port), suppress_origin=True, timeout=120)
        self.id, self.requests = 0, []
        self.call('Page.enable')
        self.call('Network.enable')
        self.call('Emulation.setDeviceMetricsOverride', width=1280, height=1000, deviceScaleFactor=1, mobile=False)

    @staticmethod
    def _page_url(port: str) -> str:
        "The DevTools websocket of the tab Chromium opened"
        from urllib.request import urlopen
        tabs = json.load(urlopen(f'http://127.0.0.1:{port}/json/list', timeout=30))
        return next(t['webSocketDebuggerUrl'] for t in tabs if t['type'] == 'page')

    def call(self, method: str, wait_event: str | None = None, **params) -> dict:
        "Send one command; return its result (after the event `wait_event`, when given)"
        self.id += 1
        self.ws.send(json.dumps({'id': self.id, 'method': method, 'params': params}))
        result, seen = None, wait_event is None
        while result is None or not seen:
            msg = json.loads(self.ws.recv())
            if msg.get('id') == self.id:
                if 'error' in msg: raise RuntimeError(f'{method}: {msg["error"]}')
                result = msg['result']
            elif msg.get('method') == 'Network.requestWillBeSent': self.requests.append(msg['params']['request']['url'])
            elif msg.get('method') == wait_event: seen = True
        return result

    def open(self, url: str):
        "Load `url`; `requests` will hold every URL the page asks for"
        self.requests = []
        self.call('Page.navigate', wait_event='Page.loadEventFired', url=url)

    def evaluate(self, script: str):
        "The value of a JavaScript expression (a promise is awaited)"
        out = self.call('Runtime.evaluate', expression=script, awaitPromise=True, returnByValue=True)
        if 'exceptionDetails' in out: raise RuntimeError(out['exceptionDetails'])
        return out['result'].get('value')

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self.call('Page.captureScreenshot', format='png')['data'])
        path.write_bytes(data)
        return data

    def close(self):
        if hasattr(self, 'ws'): self.ws.close()
        self.proc.terminate()
        try: self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired: self.proc.kill()


# Everything the checks need, read in the page once MathJax, the fonts and the images are done.
INSPECT = """(async () => {
  if (window.MathJax && MathJax.startup) await MathJax.startup.promise;
  await document.fonts.ready;
  await Promise.all([...document.images].map(i => i.complete ? 0 : new Promise(r => { i.onload = i.onerror = r; })));
  const prose = document.body.cloneNode(true);
  prose.querySelectorAll('mjx-container, pre, code, script, style').forEach(e => e.remove());
  return {
    typeset: document.querySelectorAll('mjx-container').length,
    errors: [...document.querySelectorAll('mjx-merror')].map(e => e.getAttribute('data-mjx-error') || e.textContent),
    prose: prose.textContent,
    images: [...document.images].map(i => i.naturalWidth),
    fonts: [...document.fonts].filter(f => f.family.startsWith('MJX')).map(f => f.family + ': ' + f.status),
    links: [...document.querySelectorAll('nav.book-toc a')].map(a => a.getAttribute('href')),
  };
})()"""

# TeX that MathJax should have replaced: display delimiters, environments, \( \[ and any control word.
RAW_TEX = re.compile(r'\$\$|\\begin\{|\\end\{|\\[()\[\]]|\\[A-Za-z]{2,}')


def raw_tex(prose: str) -> list[str]:
    "The raw TeX left in a page's text (outside code), each with some context"
    return [prose[max(m.start() - 30, 0):m.end() + 30] for m in RAW_TEX.finditer(prose)]


def remote(urls: list[str]) -> list[str]:
    "The URLs that are neither files nor inline data"
    return [u for u in urls if not u.startswith(('file:', 'data:'))]


def png_outputs(stem: str) -> int:
    "How many PNG plots the notebook's shown outputs hold: the page must load as many"
    import nbformat
    from optim_lab.docs import apply_directives
    nb = apply_directives(nbformat.read(ROOT / 'nbs' / f'{stem}.ipynb', as_version=4))
    return sum('image/png' in o.get('data', {}) for c in nb.cells if c.cell_type == 'code' for o in c.outputs)


def tex_spans(stem: str) -> int:
    "A lower bound on the formulas in the notebook's markdown: its `$` signs (outside code) over four"
    import nbformat
    nb = nbformat.read(ROOT / 'nbs' / f'{stem}.ipynb', as_version=4)
    return sum(re.sub(r'`[^`]*`', '', c.source).count('$') for c in nb.cells if c.cell_type == 'markdown') // 4


def assert_picture(data: bytes):
    "A PNG screenshot that shows something (not one flat colour)"
    import io, matplotlib.image
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    pixels = matplotlib.image.imread(io.BytesIO(data), format='png')
    assert pixels.shape[:2] == (1000, 1280) and pixels.std() > 0.05, (pixels.shape, pixels.std())


@pytest.fixture(scope='module')
def page(tmp_path_factory):
    browser = find_browser()
    tab = Page(browser, tmp_path_factory.mktemp('chromium-profile'))
    yield tab
    tab.close()


@pytest.fixture(scope='module')
def book(tmp_path_factory):
    from optim_lab.docs import render_book
    return render_book(ROOT, tmp_path_factory.mktemp('book'), only=BOOK)


def test_the_checks_can_fail(page, book):
    "On a page with an undefined macro, TeX MathJax was told to skip, a missing and a remote image, the checks fail"
    control = book / 'control.html'
    from optim_lab.docs import MATHJAX_CONFIG
    control.write_text(f'<html><head><script>window.MathJax = {json.dumps(MATHJAX_CONFIG)};</script>'
                       '<script defer src="mathjax/tex-chtml-full.js"></script></head><body>'
                       '<p>$$\\frac{a}{b}$$ and $\\nosuchmacro{x}$</p>'
                       '<p class="mathjax_ignore">$$\\sum_i x_i$$ \\begin{align}y\\end{align}</p>'
                       '<img src="missing.png"><img src="http://127.0.0.1:9/remote.png"></body></html>')
    page.open(control.as_uri())
    seen = page.evaluate(INSPECT)
    assert seen['typeset'] == 2 and len(seen['errors']) == 1, seen
    assert len(raw_tex(seen['prose'])) == 5, raw_tex(seen['prose'])  # $$ twice, \sum, \begin{, \end{
    assert seen['images'] == [0, 0]
    assert set(remote(page.requests)) == {'http://127.0.0.1:9/remote.png'}  # (loopback: refused at once)


@pytest.mark.parametrize('stem', CHAPTERS)
def test_chapter_in_the_browser(page, book, stem):
    page.open((book / f'{stem}.html').as_uri())
    seen = page.evaluate(INSPECT)
    shots = [page.screenshot(book / f'{stem}.png')]
    page.evaluate('document.images.length && document.images[0].scrollIntoView()')
    shots.append(page.screenshot(book / f'{stem}-plot.png'))
    print(f'screenshots of {stem}: {book}/{stem}.png, {stem}-plot.png')
    assert page.requests and not remote(page.requests), f'the page asks the network for {remote(page.requests)}'
    assert any(u.endswith('mathjax/tex-chtml-full.js') for u in page.requests), page.requests
    assert seen['typeset'] >= tex_spans(stem), f'MathJax typeset {seen["typeset"]} formulas of {tex_spans(stem)}+'
    assert not seen['errors'], f'TeX errors: {seen["errors"]}'
    assert not raw_tex(seen['prose']), f'raw TeX left in the page: {raw_tex(seen["prose"])}'
    if seen['typeset']:  # MathJax's fonts came from the book's folder and loaded
        assert any('mathjax/output/chtml/fonts/' in u for u in page.requests), page.requests
        assert seen['fonts'] and not [f for f in seen['fonts'] if f.endswith('error')], seen['fonts']
    assert len(seen['images']) == png_outputs(stem), (seen['images'], png_outputs(stem))
    assert all(w > 0 for w in seen['images']), f'plots that did not load: {seen["images"]}'
    for shot in shots: assert_picture(shot)


def test_front_page_links_the_chapters_in_order(page, book):
    page.open((book / 'index.html').as_uri())
    seen = page.evaluate(INSPECT)
    page.screenshot(book / 'index.png')
    assert seen['links'] == [f'{stem}.html' for stem in BOOK], seen['links']
    assert not seen['errors'] and not raw_tex(seen['prose']), (seen['errors'], raw_tex(seen['prose']))
    titles = dict(zip(BOOK, page.evaluate("[...document.querySelectorAll('nav.book-toc a')].map(a => a.textContent)")))
    assert [titles[s] for s in ['index', '12_radam', '45_fcompass']] == ['optim_lab', 'RAdam', 'FCompass'], titles
