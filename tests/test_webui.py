"""The web UI end to end: a tiny InternVL3.5 forced to crop, served on 127.0.0.1, driven in headless Chromium.

Uses Debian's chromium through Playwright's Python API (never `playwright install`); skipped only when no chromium
binary or no playwright/gradio is installed. Every request the page makes outside 127.0.0.1 is recorded and aborted,
so the test also proves the page works offline."""
import io, json, os, re, shutil, socket, subprocess, sys, time, urllib.error, urllib.request, uuid
from pathlib import Path
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ['GRADIO_ANALYTICS_ENABLED'] = 'False'
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT/'tests'/'_artifacts'
CHROMIUM = next((p for p in ('/usr/bin/chromium', shutil.which('chromium') or '', shutil.which('chromium-browser') or '')
                 if p and os.path.exists(p)), None)
FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage']
SCRIPT = ('<think>\nThe red box is on the left. <tool_call>Crop [40, 60, 120, 200]</tool_call>'
          'The crop shows it.\n</think>\n<answer>a red box</answer>')

pytestmark = pytest.mark.timeout(300)

from conftest import free_port as _free_port

def _photo():
    from PIL import Image
    im = Image.new('RGB', (320, 240), (30, 90, 160)); im.paste((220, 40, 40), (40, 60, 120, 200)); return im

def _listening_addrs(port):
    "Local addresses listening on `port` (from /proc/net/tcp and tcp6)."
    out = []
    for f, v6 in (('/proc/net/tcp', False), ('/proc/net/tcp6', True)):
        if not os.path.exists(f): continue
        for line in open(f).read().splitlines()[1:]:
            parts = line.split()
            addr, p = parts[1].split(':'); st = parts[3]
            if st != '0A' or int(p, 16) != port: continue
            if v6: out.append('::' if set(addr) == {'0'} else addr)
            else: out.append(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return out

@pytest.fixture(scope='module')
def tiny_engine(tmp_path_factory):
    from vlm_nb.models import make_tiny, load_model
    from vlm_nb.engine import ToolEngine, ForcedContinuation
    m, ad = load_model(make_tiny('internvl3_5', tmp_path_factory.mktemp('tiny')/'internvl'), max_tiles=1)
    return ToolEngine(m, ad, tools='crop,identify'), [ForcedContinuation(ad.tokenizer, SCRIPT, then='eos')]

@pytest.fixture(scope='module')
def server(tiny_engine, tmp_path_factory):
    pytest.importorskip('gradio', reason='the web UI needs gradio')
    from vlm_nb.webui import build_app, launch_app
    from vlm_nb.engine import Trajectory
    eng, procs = tiny_engine
    im = _photo()
    t = Trajectory('Where is the red box?', [im], finish_reason='eos', n_new_tokens=20, n_tool_calls=1)
    t.add('text', '<think>\nLet me look. '); t.add('tool_call', '<tool_call>Crop [40, 60, 120, 200]</tool_call>', name='Crop', bbox=[40, 60, 120, 200])
    t.add('tool_result', '', im.crop((40, 60, 120, 200)), kind='image', box=[40, 60, 120, 200], message=None, n_tokens=258)
    t.add('text', '\n</think>\n<answer>on the left</answer>')
    saved = t.save(tmp_path_factory.mktemp('replay')/'traj')
    app = build_app(eng, replays=[saved], logits_processors=procs, max_new_tokens=96,
                    files_dir=tmp_path_factory.mktemp('files'))
    port = _free_port()
    launch_app(app, port=port, max_file_size='1mb', block=False)     # host left at its default
    try: yield app, port
    finally: app.close()

def test_default_bind_is_loopback(server):
    app, port = server
    assert app.server_name == '127.0.0.1'
    assert _listening_addrs(port) == ['127.0.0.1']

def _upload(port, name, data):
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            'Content-Type: application/octet-stream\r\n\r\n').encode() + data + f'\r\n--{b}--\r\n'.encode()
    req = urllib.request.Request(f'http://127.0.0.1:{port}/gradio_api/upload', data=body, method='POST',
                                 headers={'Content-Type': f'multipart/form-data; boundary={b}'})
    try:
        with urllib.request.urlopen(req, timeout=30) as r: return r.status, r.read().decode()
    except urllib.error.HTTPError as e: return e.code, e.read().decode()

def test_oversized_upload_refused(server):
    _, port = server
    ok, _ = _upload(port, 'small.png', b'x' * 1000)
    assert ok == 200
    status, text = _upload(port, 'huge.png', os.urandom(2 * 1024 * 1024))      # over the 1 MB limit
    assert status == 413, (status, text[:200])

def test_pixel_bomb_refused(tiny_engine, tmp_path):
    "An image small in bytes but over the pixel limit is refused before the model runs, with a readable error."
    gr = pytest.importorskip('gradio')
    from PIL import Image
    from vlm_nb.webui import build_app
    big = tmp_path/'big.png'; Image.new('L', (9000, 8000)).save(big)
    assert big.stat().st_size < 1024 * 1024
    app = build_app(tiny_engine[0], max_pixels=10_000_000)
    ask = next(f.fn for f in app.fns.values() if f.name == 'ask')
    with pytest.raises(gr.Error, match='pixel limit'): list(ask(str(big), 'hi', False, True, 32))

def test_cli_serves_on_loopback(tmp_path):
    "`webui_main` (replay-only, no model) binds 127.0.0.1 by default and serves a page titled vlm_nb."
    pytest.importorskip('gradio')
    from vlm_nb.engine import Trajectory
    t = Trajectory('What is red?', [_photo()], finish_reason='eos'); t.add('text', '<answer>red</answer>')
    folder = t.save(tmp_path/'traj'); port = _free_port()
    code = f'import sys; from vlm_nb.webui import webui_main; sys.exit(webui_main(sys.argv[1:]))'
    proc = subprocess.Popen([sys.executable, '-c', code, '--replay', str(folder), '--port', str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, 'GRADIO_ANALYTICS_ENABLED': 'False'})
    try:
        deadline, page = time.time() + 90, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=2) as r: page = r.read().decode(); break
            except OSError: time.sleep(0.5)
        assert page is not None, f'server did not start (rc={proc.poll()})'
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/config', timeout=10) as r: cfg = json.loads(r.read())
        assert 'vlm_nb' in cfg['title']              # gradio sets <title> from the config in the browser
        assert _listening_addrs(port) == ['127.0.0.1']
    finally:
        proc.terminate()
        try: out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired: proc.kill(); out, _ = proc.communicate(timeout=10)
    assert f'http://127.0.0.1:{port}' in out

def test_browser_ask_with_crop(server, tmp_path):
    if CHROMIUM is None: pytest.skip('no chromium binary (/usr/bin/chromium) for the browser test')
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright (python) is not installed')
    _, port = server
    url = f'http://127.0.0.1:{port}/'
    photo = tmp_path/'photo.png'; _photo().save(photo)
    external = []
    def guard(route):
        u = route.request.url
        if re.match(r'^(https?|wss?)://(127\.0\.0\.1|localhost)(:\d+)?/', u) or u.startswith(('data:', 'blob:')): route.continue_()
        else: external.append(u); route.abort()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={'width': 1400, 'height': 1150})
            page.route('**/*', guard)
            page.goto(url, wait_until='load', timeout=60_000)
            page.wait_for_selector('#send', timeout=60_000)
            assert 'vlm_nb' in page.title()
            page.locator('#image input[type=file]').set_input_files(str(photo))
            page.wait_for_selector('#image img', timeout=30_000)
            page.locator('#prompt textarea').fill('What is red?')
            page.locator('#send').click()
            page.wait_for_function("document.querySelector('#summary') && /finish: eos/.test(document.querySelector('#summary').innerText)",
                                   timeout=180_000)
            chat = page.locator('#chat')
            text = chat.inner_text()
            assert 'Tool call 1: Crop [40, 60, 120, 200] → image 80×140' in text
            assert 'a red box' in text
            # the crop: a visible <img> in the chat whose pixels are the 80×140 region
            page.wait_for_function("[...document.querySelectorAll('#chat img')].some(i => i.complete && i.naturalWidth == 80 && i.naturalHeight == 140 && i.getBoundingClientRect().height > 40)",
                                   timeout=30_000)
            summary = page.locator('#summary').inner_text()
            assert '1 tool call(s)' in summary and 'answer: a red box' in summary
            page.screenshot(path=str(ARTIFACTS/'webui.png'), full_page=True)
            # the Replay tab shows the preloaded trajectory with its call and crop
            page.get_by_role('tab', name='Replay').click()
            page.wait_for_function("document.querySelector('#replay-chat') && /Tool call 1: Crop/.test(document.querySelector('#replay-chat').innerText)",
                                   timeout=30_000)
            page.wait_for_function("[...document.querySelectorAll('#replay-chat img')].some(i => i.complete && i.naturalWidth == 80 && i.naturalHeight == 140 && i.getBoundingClientRect().height > 40)",
                                   timeout=30_000)
            assert 'answer: on the left' in page.locator('#replay-summary').inner_text()
            page.screenshot(path=str(ARTIFACTS/'webui_replay.png'), full_page=True)
        finally: browser.close()
    assert external == [], f'the page tried to reach the network: {external}'
