"README.md is committed by hand (no Quarto here); it must say what nbs/index.ipynb says, and name the test command."
import json, re
from conftest import ROOT

def _norm(s): return re.sub(r'\s+', ' ', s).strip()

def test_readme_matches_index():
    nb = json.loads((ROOT/'nbs'/'index.ipynb').read_text())
    md = '\n\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
    assert _norm(md) == _norm((ROOT/'README.md').read_text())

def test_readme_has_exactly_two_newcomer_commands():
    text = (ROOT/'README.md').read_text()
    block = text.split('## Two commands for a newcomer')[1].split('```bash')[1].split('```')[0]
    cmds = [l for l in block.splitlines() if l.strip() and not l.strip().startswith('#')]
    assert len(cmds) == 2 and 'pip install torch==2.13.0' in cmds[0] and cmds[1].strip() == 'bash .ci/run'
