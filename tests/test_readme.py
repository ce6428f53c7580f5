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

def test_demo_install_is_light_and_test_extras_separate():
    "The newcomer's first command installs no extras; JupyterLab and Playwright come only with `.[dev]`."
    import ast, configparser
    cmd = (ROOT/'README.md').read_text().split('## Two commands for a newcomer')[1].split('```bash')[1].split('```')[0]
    assert 'pip install -e . ' in cmd and '[dev' not in cmd.split('\n# 2.')[0]
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT/'settings.ini')
    base, dev = cfg['DEFAULT']['requirements'].split(), cfg['DEFAULT']['dev_requirements'].split()
    assert not {'jupyter', 'playwright', 'nbdev==2.4.14', 'gradio'} & set(base) and {'jupyter', 'playwright'} <= set(dev)
    serve = next(n for n in ast.walk(ast.parse((ROOT/'setup.py').read_text())) if isinstance(n, ast.Dict) and
                 any(isinstance(k, ast.Constant) and k.value == 'serve' for k in n.keys))
    assert 'playwright' not in ast.unparse(serve)
