"The offline docs site renders every notebook, and a headless browser shows a real page."
import subprocess, json, re
from pathlib import Path
import pytest
from conftest import chromium, CHROME_FLAGS, ROOT

@pytest.fixture(scope='module')
def site(tmp_path_factory, cli):
    out = tmp_path_factory.mktemp('site')
    r = cli('docs', '--out', out, '--no-quarto', '--json', cwd=ROOT/'vlm_nb'/'builtin_tools', timeout=900)   # any folder inside the repo
    assert r.returncode == 0, r.stderr[-2000:]
    return out, json.loads(r.stdout.strip().splitlines()[-1])

def test_every_notebook_has_a_page(site):
    out, info = site
    nbs = [p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_')]
    pages = {p.stem for p in out.glob('*.html')}
    assert {('index' if p.stem == 'index' else p.stem) for p in nbs} <= pages
    idx = (out/'index.html').read_text()
    for p in nbs:
        if p.stem != 'index': assert f'href="{p.stem}.html"' in idx

@pytest.mark.skipif(chromium() is None, reason='Debian chromium is not installed')
def test_page_in_headless_chromium(site, artifacts):
    out, _ = site
    page = out/'00_data.html'
    dom = subprocess.run([chromium(), *CHROME_FLAGS, '--user-data-dir=' + str(out/'.chrome'), '--dump-dom', page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert '<nav>' in dom and 'Data model' in dom
    assert 'record_to_sample' in dom            # API docs made it to the page
    assert re.search(r'<a href="15_cli.html"', dom)  # the navigation links the other pages
    from PIL import Image
    for name in ('00_data', '12_eval', '02a_synthetic'):   # a text page and two with figures, as a reader sees them
        shot = artifacts/f'docs_{name}.png'
        subprocess.run([chromium(), *CHROME_FLAGS, f'--user-data-dir={out}/.chrome_{name}', '--window-size=1200,900',
                        f'--screenshot={shot}', (out/f'{name}.html').as_uri()], capture_output=True, timeout=120)
        im = Image.open(shot).convert('L'); lo, hi = im.getextrema()
        assert im.size == (1200, 900) and hi - lo > 100, name   # not a blank page

def test_executed_pages_show_figures(tmp_path):
    "With execute=True the cells run first, so a page shows what they display: text and matplotlib figures."
    import nbformat
    from vlm_nb.cli import render_docs
    src = tmp_path/'nbs'; src.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell('# Figures\n\n> a page with a plot'),
        nbformat.v4.new_code_cell('import matplotlib\nmatplotlib.use("Agg")\nimport matplotlib.pyplot as plt\n'
                                  'fig, ax = plt.subplots(); ax.plot([1, 3, 2]); fig'),
        nbformat.v4.new_code_cell('#| slow\nraise RuntimeError("slow cells are skipped, as in the tests")'),
        nbformat.v4.new_code_cell('6 * 7')])
    nbformat.write(nb, src/'01_fig.ipynb')
    page = (render_docs(tmp_path/'site', nbs=src, use_quarto=False, execute=True).parent/'01_fig.html').read_text()
    assert '<img' in page and 'data:image/png;base64' in page and '42' in page and page.count('RuntimeError') == 1   # the slow cell's source, not its error
    plain = (render_docs(tmp_path/'site2', nbs=src, use_quarto=False).parent/'01_fig.html').read_text()
    assert 'data:image/png' not in plain            # without execute: code and prose only

NBS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_'))
# cheap notebooks that print the same thing with or without ../shared: re-executed to catch outputs the code no longer makes
CHEAP = ['00_data', '01a_crop_tool', '02a_synthetic']

@pytest.mark.parametrize('nb', NBS, ids=lambda p: p.stem)
def test_no_output_outlived_its_cell(nb):
    "Every cell that carries outputs was executed as it reads now (its source hash matches): no stale output on a page."
    from vlm_nb.cli import stale_cells
    assert stale_cells(nb) == [], f'cells edited after their outputs were written; run: vlm-nb docs --refresh nbs/{nb.name}'

@pytest.mark.parametrize('name', CHEAP)
def test_committed_outputs_are_what_the_code_prints(name):
    from vlm_nb.cli import check_outputs
    nb = ROOT/'nbs'/f'{name}.ipynb'
    assert any(c.get('outputs') for c in json.loads(nb.read_text())['cells']), f'committed without outputs; run: vlm-nb docs --refresh nbs/{nb.name}'
    assert check_outputs(nb) == [], f'outputs changed; run: vlm-nb docs --refresh nbs/{nb.name}'

def site_counts(out: Path) -> dict:
    "Per page: example-cell outputs (show_doc API entries, which are markdown outputs, not counted) and figures."
    res = {}
    for p in sorted(out.glob('*.html')):
        h = p.read_text()
        res[p.stem] = (len([c for c in re.findall(r'class="([^"]*output_subarea[^"]*)"', h) if 'output_markdown' not in c]),
                       len(re.findall(r'<img[^>]*src="data:image/png', h)))
    return res

def test_pages_show_outputs_and_figures(site):
    "From the committed outputs alone (no execution): >= 80 % of the pages show outputs, >= 6 show figures, >= 12 figures."
    out, _ = site
    n = site_counts(out)
    with_out = [k for k, (o, _) in n.items() if o]
    assert len(with_out) >= 0.8 * len(n), f'pages without outputs: {sorted(set(n) - set(with_out))}; run: vlm-nb docs --refresh'
    assert sum(f > 0 for _, f in n.values()) >= 6 and sum(f for _, f in n.values()) >= 12, n
