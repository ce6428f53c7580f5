"README's Usage block is executable truth: its commands run verbatim, in order, in an empty folder, and all exit 0."
import json, os, shutil, subprocess, sys
import pytest
from conftest import ROOT

def usage_commands(text:str)->list:
    "The command lines of the ```bash block under '## Usage' (comments and blank lines dropped)."
    block = text.split('## Usage', 1)[1].split('```bash', 1)[1].split('```', 1)[0]
    return [l for l in block.splitlines() if l.strip() and not l.lstrip().startswith('#')]

def test_usage_block_is_parsed():
    cmds = usage_commands((ROOT/'README.md').read_text())
    assert cmds[0].startswith('vlm-nb --help') and any(c.startswith('vlm-nb train sft config.yaml') for c in cmds)
    # whatever a command needs, an earlier command makes: the configs and the trained models
    first = lambda s: next(i for i, c in enumerate(cmds) if s in c)
    assert first('> config.yaml') < first('train sft config.yaml') < first('--model run') < first('--model grpo_run')
    assert first('> grpo.yaml') < first('train grpo grpo.yaml') < first('--model grpo_run')

@pytest.mark.slow
def test_usage_commands_run_verbatim(tmp_path):
    cmds = usage_commands((ROOT/'README.md').read_text())
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'MPLBACKEND': 'Agg',
           'TOKENIZERS_PARALLELISM': 'false', 'GRADIO_ANALYTICS_ENABLED': 'False'}
    env.pop('VLM_NB_TOOLS_PATH', None)
    # `vlm-nb` as installed by the README; a checkout without the console script runs the same module
    prelude = '' if shutil.which('vlm-nb') else f'vlm-nb() {{ "{sys.executable}" -m vlm_nb.cli "$@"; }}\n'
    for cmd in cmds:
        r = subprocess.run(['bash', '-o', 'pipefail', '-c', 'umask 022\n' + prelude + cmd], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, f"README command failed (exit {r.returncode}): {cmd}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
    meta = json.loads((tmp_path/'run'/'final'/'vlm_nb.json').read_text())
    assert meta['mode'] == 'lora' and meta['base_model'] == str((tmp_path/'tiny').resolve()) and meta['system_prompt']
    assert json.loads((tmp_path/'grpo_run'/'final'/'vlm_nb.json').read_text())['base_model'] == str((tmp_path/'run'/'final').resolve())
    assert (tmp_path/'_site'/'index.html').exists() and (tmp_path/'eval').is_dir() and (tmp_path/'masks.html').exists()
    # everything written is readable by colleagues, as a plain open would make it under umask 022
    private = [str(f.relative_to(tmp_path)) for f in tmp_path.rglob('*') if f.is_file() and f.stat().st_mode & 0o777 == 0o600]
    assert not private, private[:10]
    # and git ignores what the README makes users create in a checkout
    made = sorted(p.name + ('/' if p.is_dir() else '') for p in tmp_path.iterdir()) + ['demo_run/']
    r = subprocess.run(['git', 'check-ignore', '--no-index', *made], cwd=ROOT, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(made), set(made) - set(r.stdout.split())
