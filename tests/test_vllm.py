"""Real vLLM serves every family's vlm_nb checkpoint with the training token ids and the local engine's greedy tool loop,
and generates GRPO rollouts (ids and mask as the local engine's, weights synced after every step).

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

from vlm_nb.vllm_backend import (vllm_python, vllm_missing_reason, check_family_served, serve_command, grpo_server,
                                 check_rollout_ids, grpo_vllm_run, VLLMRollouts)
from vlm_nb.models import find_shared, make_tiny, FAMILIES, load_model, record_tool_layout

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

def test_grpo_on_vllm_rollouts(tmp_path):
    """GRPO on vLLM rollouts: a greedy rollout's ids and trained-token mask equal the local engine's (tool result masked alike); 2 steps
    with the LoRA adapter pushed and checked after each (weights_synced) and tool calls executed; the check catches a stale server."""
    why = _skip_reason()
    if why: pytest.skip(why)
    import torch
    from vlm_nb.engine import ToolEngine
    from vlm_nb.grpo import GRPOConfig, synthetic_tasks
    from vlm_nb.sft import apply_lora
    from vlm_nb.tools import ToolRegistry
    from vlm_nb.builtin_tools.crop_tool import CropTool
    from vlm_nb.builtin_tools.identify_tool import IdentifyTool
    ck = make_tiny('qwen2_5_vl', tmp_path/'base', size='vllm'); record_tool_layout(ck, 'turn')
    model, ad = load_model(ck)
    tasks, gal = synthetic_tasks(2, 0)
    reg = ToolRegistry([CropTool(), IdentifyTool(gal)])
    cfg = GRPOConfig(scripted='call', scripted_jitter=0.3, max_new_tokens=8)
    with grpo_server(ck, log=tmp_path/'server.log') as srv:
        r = check_rollout_ids(srv.url, srv.name, ToolEngine(model, ad, tools=reg), tasks[0], cfg)
        assert r['ids_equal'] and r['mask_equal'] and r['roles_equal'], {k: v for k, v in r.items() if k not in ('local', 'vllm')}
        assert r['executed'] == 1 and r['masked_tool_tokens'] > 0 and r['context_mismatch'] == []
        s = grpo_vllm_run(tmp_path/'grpo', steps=2, url=srv.url, checkpoint=ck)
        assert s['steps'] == 2 and s['weights_synced'] and s['syncs'] == 3, s
        assert s['tool_calls_executed'] >= 2 and s['rollout_backend'] == 'vllm' and s['vllm_tokens'] > 0, s
        log = [json.loads(l) for l in (tmp_path/'grpo'/'run'/'log.jsonl').read_text().splitlines()]
        assert [x['weights_synced'] for x in log] == [True, True]
        # the check after a sync is not vacuous: weights changed here but not pushed are caught, and a push repairs it
        pm = apply_lora(model, 'qwen2_5_vl', cfg.lora)
        vr = VLLMRollouts(GRPOConfig(model=str(ck), output_dir=str(tmp_path/'stale'), rollout_backend='vllm', vllm_url=srv.url),
                          pm, ad, reg, ck)
        assert vr.syncs[0]['weights_synced']
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if 'lora_B' in n: p.normal_(0, 0.5)
        assert not vr.check()['equal']
        assert vr.sync(1)['weights_synced'] and vr.name == 'policy-1'
        vr.close()
