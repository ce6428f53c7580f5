import contextlib, os, sys, shutil, subprocess, socket, time
from pathlib import Path
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false'); os.environ.setdefault('MPLBACKEND', 'Agg')
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT/'tests'/'_artifacts'

def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes more than a minute')
    config.addinivalue_line('markers', 'cuda: needs a GPU')
    config.addinivalue_line('markers', 'vllm: needs the vLLM environment (scripts/vllm_cpu_env.sh); starts vLLM servers')

@pytest.fixture(scope='session')
def root(): return ROOT

@pytest.fixture(scope='session')
def artifacts():
    ARTIFACTS.mkdir(parents=True, exist_ok=True); return ARTIFACTS

def vlm_nb_cmd():
    "The `vlm-nb` console script when installed, else `python -m vlm_nb.cli`."
    exe = shutil.which('vlm-nb')
    return [exe] if exe else [sys.executable, '-m', 'vlm_nb.cli']

def run_cli(*args, input=None, timeout=600, cwd=None, env=None):
    "Run `vlm-nb ARGS` in a subprocess and return the CompletedProcess."
    return subprocess.run(vlm_nb_cmd() + [str(a) for a in args], input=input, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})

@pytest.fixture(scope='session')
def cli(): return run_cli

def free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def server_healthy(port):
    "True once a local OpenAI-compatible server answers /health."
    import urllib.request
    try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2) as r: return r.status == 200
    except Exception: return False

@contextlib.contextmanager
def transformers_serve(model_dir, log_path, launcher:bool=False, env:dict|None=None, timeout:float=150, must_start:bool=False):
    "Run `transformers serve MODEL_DIR` on a free local port until the block ends; yields the port. Skips the test when it does not start (fails with `must_start`)."
    if launcher: cmd = [sys.executable, str(ROOT/'tests'/'_serve_launcher.py'), 'serve']   # the Qwen-VL processor without torchvision
    else:
        exe = shutil.which('transformers')
        if exe is None: pytest.skip('the `transformers` CLI is not installed')
        cmd = [exe, 'serve']
    port = free_port()
    with open(log_path, 'w') as fh:
        proc = subprocess.Popen(cmd + [str(model_dir), '--host', '127.0.0.1', '--port', str(port), '--device', 'cpu'], stdout=fh,
                                stderr=subprocess.STDOUT, env={**os.environ, 'HF_HUB_OFFLINE': '1', **(env or {})}, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while not server_healthy(port):
            if proc.poll() is not None or time.time() > deadline:
                msg = f'transformers serve did not start (rc={proc.poll()}): {Path(log_path).read_text()[-800:]}'
                if must_start: pytest.fail(msg)
                pytest.skip(msg)
            time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        try: proc.wait(timeout=15)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait(timeout=15)

def chromium():
    return shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')

CHROME_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                '--disable-background-networking', '--disable-component-update', '--disable-sync',
                '--disable-dev-shm-usage']
