"House rules the docs build depends on: imports only in import cells, every notebook opens with a title."
import ast, json, re
from pathlib import Path
import pytest
from conftest import ROOT

NBS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_'))

def _cells(p): return json.loads(p.read_text())['cells']

def mixed_import_cells(p):
    "Non-exported code cells that import AND do other work: nbdev's docs build runs import cells and warns about these."
    bad, cells = [], _cells(p)
    for i, c in enumerate(cells):   # every cell, the hidden setup cells at the top too: nbdev warns about those as well
        src = ''.join(c['source'])
        if c['cell_type'] != 'code' or 'nbdev_export()' in src or re.search(r'^#\|\s*(export|exports|exporti|exec_doc|eval:\s*false)', src, re.M): continue
        try: trees = ast.parse('\n'.join(l for l in src.splitlines() if not l.lstrip().startswith(('%', '!'))))
        except SyntaxError: continue
        nodes = list(ast.walk(trees))
        if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes) and any(isinstance(n, (ast.Expr, ast.Assign)) for n in nodes):
            bad.append((i, src.splitlines()[0][:60]))
    return bad

@pytest.mark.parametrize('nb', NBS, ids=lambda p: p.stem)
def test_imports_only_in_import_cells(nb):
    assert mixed_import_cells(nb) == []

@pytest.mark.parametrize('nb', [p for p in NBS if p.stem != 'index'], ids=lambda p: p.stem)
def test_notebook_opens_with_title_purpose_and_default_exp(nb):
    cells = _cells(nb)
    first = ''.join(cells[0]['source'])
    assert re.match(r'# \S', first) and '\n> ' in first, 'first cell: "# Title" and "> purpose"'
    assert any(re.search(r'^#\|\s*default_exp ', ''.join(c['source']), re.M) for c in cells[:3])
