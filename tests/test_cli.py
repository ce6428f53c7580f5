"The `vlm-nb` entry point: help, errors, and that every listed command answers --help."
import json, pytest
from vlm_nb.cli import COMMANDS

def test_help_lists_commands(cli):
    r = cli('--help'); assert r.returncode == 0
    assert 'data validate' in r.stdout and 'docs' in r.stdout

def test_unknown_command_is_one_line_error(cli):
    r = cli('frobnicate'); assert r.returncode == 2
    assert r.stderr.strip().count('\n') == 0 and r.stderr.startswith('error:')

@pytest.mark.parametrize('words', sorted(COMMANDS))
def test_every_command_has_help(cli, words):
    r = cli(*words, '--help'); assert r.returncode == 0, r.stderr
    assert 'usage: vlm-nb ' + ' '.join(words) in r.stdout

@pytest.mark.parametrize('group', sorted({k[0] for k in COMMANDS if len(k) == 2}))
def test_group_without_subcommand_is_an_error_with_usage(cli, group):
    r = cli(group); assert r.returncode == 2
    assert r.stderr.startswith('error:') and f'{group} ' in r.stderr and r.stdout == ''
    r = cli(group, '--help'); assert r.returncode == 0 and f'{group} ' in r.stdout

def test_docs_check_catches_a_stale_output(cli, tmp_path):
    "`vlm-nb docs --refresh NB` writes outputs; `--check NB` passes, then fails once a cell's output no longer matches."
    import nbformat
    from conftest import ROOT
    nbp = ROOT/'nbs'/f'_test_docs_check_{tmp_path.name}.ipynb'   # in nbs/ so nbdev finds the project; '_' keeps it out of the docs
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell('# T\n\n> t'), nbformat.v4.new_code_cell('print(6 * 7)')])
    nbformat.write(nb, nbp)
    try:
        assert cli('docs', '--refresh', nbp).returncode == 0
        c = json.loads(nbp.read_text())['cells'][1]
        assert c['outputs'][0]['text'] == ['42\n'] and c['metadata']['vlm_nb_src'] and c['execution_count'] is None
        assert cli('docs', '--check', nbp).returncode == 0
        d = json.loads(nbp.read_text()); d['cells'][1]['outputs'][0]['text'] = ['41\n']; nbp.write_text(json.dumps(d))
        r = cli('docs', '--check', nbp); assert r.returncode == 1 and 'output changed' in r.stdout
        d['cells'][1]['source'] = 'print(6 * 8)'; nbp.write_text(json.dumps(d))
        r = cli('docs', '--check', nbp); assert r.returncode == 1 and 'edited after its outputs were written' in r.stdout
    finally: nbp.unlink(missing_ok=True)

def test_bench_rollouts_size(cli, tmp_path):
    "`vlm-nb bench rollouts --size tiny --quick --json` times the narrow model and says so; an unknown size is a one-line error."
    r = cli('bench', 'rollouts', '--size', 'tiny', '--quick', '--json', env={'TMPDIR': str(tmp_path)}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert (res['size'], res['hidden'], res['n'], res['identical'], res['vocab']) == ('tiny', 32, 4, True, 151_678)
    assert 'higher is better' in res['speedup_means']
    r = cli('bench', 'rollouts', '--size', 'huge')
    assert r.returncode == 2 and 'huge' in r.stderr
