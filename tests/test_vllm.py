"""Real vLLM serves every family's vlm_nb checkpoint with the training token ids and the local engine's greedy tool loop.

Needs the vLLM environment (`bash scripts/vllm_cpu_env.sh` on a CPU machine, or `$VLM_NB_VLLM_VENV` pointing at a venv
with vLLM) and the real Qwen3 vocabulary (../shared: vLLM's Ovis2.5 hard-codes its ids); without either the tests skip
and say why. Marked `vllm` (`pytest -m vllm` runs only these; `-m "not vllm"` leaves them out). One server at a time,
each started for one family (about 1-3 minutes on 2 CPU cores); `VLM_NB_VLLM_FAMILIES=qwen2_5_vl,ovis2_5` limits them."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from vlm_nb.vllm_backend import vllm_python, vllm_missing_reason, check_family_served, serve_command
from vlm_nb.models import find_shared, make_tiny, FAMILIES

pytestmark = pytest.mark.vllm
FAMS = [f for f in os.environ.get('VLM_NB_VLLM_FAMILIES', ','.join(FAMILIES)).split(',') if f]

def _skip_reason():
    if vllm_python() is None: return vllm_missing_reason()
    if find_shared() is None: return 'the vLLM checks run on the real Qwen3 vocabulary (../shared absent or hidden)'
    return ''

@pytest.fixture(scope='module')
def served(tmp_path_factory):
    why = _skip_reason()
    if why: print(f'SKIP reason: {why}'); pytest.skip(why)
    d, cache = tmp_path_factory.mktemp('vllm'), {}
    def get(family):
        if family not in cache: cache[family] = check_family_served(family, d, log=d/f'{family}.log')
        return cache[family]
    return get

@pytest.mark.parametrize('family', FAMS)
def test_family_served_with_training_ids_and_local_greedy(served, family):
    "vLLM serves the checkpoint; its prompt ids at every model turn of a tool conversation equal the training sequence; the greedy tool loop matches the local engine."
    r = served(family)
    assert r['served'], r.get('error')
    assert r['prompt_ids_equal'], json.dumps(r.get('prompt_checks'))
    assert r['greedy_equal'], json.dumps(r.get('greedy'))

def test_serve_command_line(tmp_path):
    "`vlm-nb serve --engine vllm --print` prints the command for a checkpoint (Ovis2.5: with its remote configuration)."
    if vllm_python() is None: pytest.skip(vllm_missing_reason())
    ck = make_tiny('ovis2_5', tmp_path/'o')
    r = subprocess.run([sys.executable, '-m', 'vlm_nb.cli', 'serve', '--engine', 'vllm', '--model', str(ck), '--print'],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert r.returncode == 0, r.stderr
    assert '--trust-remote-code' in r.stdout and str(ck) in r.stdout and '--enable-prefix-caching' in r.stdout
    assert r.stdout.split()[:3] == serve_command(ck)[:3]
