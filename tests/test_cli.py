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
