"""`vlm-nb tools list` / `vlm-nb tools parse` end to end, in a subprocess as a user runs them.

Uses the `vlm-nb` console script when installed, else `python -m vlm_nb.cli` when it knows the `tools` commands,
else calls `vlm_nb.tools.tools_*_main` directly (while the CLI dispatcher is not wired yet)."""
import json, os, shutil, subprocess, sys, textwrap
from functools import lru_cache
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAINS = {'list': 'tools_list_main', 'parse': 'tools_parse_main'}


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep))
    env.pop('VLM_NB_TOOLS_PATH', None)
    env.update(extra)
    return env


def _knows_tools(prefix):
    try: r = subprocess.run([*prefix, 'tools', 'list', '--help'], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    except OSError: return False
    return r.returncode == 0 and 'vlm-nb tools list' in r.stdout


@lru_cache(None)
def _launcher():
    "The command prefix that runs `vlm-nb`: the console script, else the module, else the main functions directly."
    exe = shutil.which('vlm-nb')
    if exe and _knows_tools([exe]): return ('script', [exe])
    if _knows_tools([sys.executable, '-m', 'vlm_nb.cli']): return ('module', [sys.executable, '-m', 'vlm_nb.cli'])
    return ('direct', None)     # the dispatcher does not know `tools` yet: call the subcommand functions


def vlm_nb(*args, stdin=None, env=None):
    "Run `vlm-nb tools <args>`; returns the CompletedProcess (bytes stdin allowed)."
    kind, prefix = _launcher()
    if kind == 'direct':
        code = f"import sys; from vlm_nb.tools import {MAINS[args[0]]} as m; sys.exit(m(sys.argv[1:]))"
        cmd = [sys.executable, '-c', code, *args[1:]]
    else: cmd = [*prefix, 'tools', *args]
    data = stdin.encode() if isinstance(stdin, str) else stdin
    r = subprocess.run(cmd, cwd=ROOT, env=env or _env(), input=data, capture_output=True, timeout=120)
    r.out, r.err = r.stdout.decode(), r.stderr.decode()
    return r


def test_list_json_has_builtin_tools_with_schemas():
    r = vlm_nb('list', '--json')
    assert r.returncode == 0, r.err
    tools = json.loads(r.out)
    assert [t['name'] for t in tools][:2] == ['Crop', 'Identify']
    crop = tools[0]
    assert crop['parameters']['required'] == ['bbox'] and crop['parameters']['properties']['bbox']['type'] == 'array'
    assert 'Crop a region' in crop['description']


def test_list_plain_text():
    r = vlm_nb('list')
    assert r.returncode == 0 and r.out.splitlines()[0].startswith('Crop ')


TOOL_FILE = textwrap.dedent('''
    from vlm_nb.tools import ToolBase
    class BlurTool(ToolBase):
        "Blur a region of the image."
        name = 'Blur'
        def run(self, img, bbox: list # region [x1, y1, x2, y2] to blur
               ): return img.crop([int(v) for v in bbox])
    ''')


def test_dropping_a_tool_file_needs_no_config(tmp_path):
    (tmp_path/'blur_tool.py').write_text(TOOL_FILE)
    r = vlm_nb('list', '--json', '--tools-dir', str(tmp_path))
    assert r.returncode == 0, r.err
    assert [t['name'] for t in json.loads(r.out)] == ['Crop', 'Identify', 'Blur']
    # the same through the environment variable, and the new name is then a known tool for parsing
    env = _env(VLM_NB_TOOLS_PATH=str(tmp_path))
    assert 'Blur' in [t['name'] for t in json.loads(vlm_nb('list', '--json', env=env).out)]
    r = vlm_nb('parse', '--json', stdin='<tool_call>Blur [1, 2, 3, 4]</tool_call>', env=env)
    assert json.loads(r.out)[0]['error'] is None


def test_broken_tool_file_is_reported_not_silent(tmp_path):
    (tmp_path/'bad_tool.py').write_text('import no_such_module_xyz\n')
    r = vlm_nb('list', '--json', '--tools-dir', str(tmp_path))
    assert r.returncode == 0
    assert 'bad_tool.py' in r.err and 'no_such_module_xyz' in r.err
    assert [t['name'] for t in json.loads(r.out)] == ['Crop', 'Identify']


def test_missing_tools_dir_is_a_one_line_error():
    r = vlm_nb('list', '--tools-dir', '/no/such/folder')
    assert r.returncode != 0
    assert r.err.strip().startswith('error:') and len(r.err.strip().splitlines()) == 1


def test_parse_reports_calls_in_order_with_spans_and_errors():
    text = ('<think>look <tool_call>Crop [10, 20.5, 300, 400]</tool_call><image> and '
            '<tool_call>{"name": "Identify", "arguments": {"bbox_2d": [1, 2, 30, 40]}}</tool_call>'
            '<tool_response>Ana</tool_response> {Crop person 1} <tool_call>Crop [1,,2,3]</tool_call></think>')
    r = vlm_nb('parse', '--json', stdin=text)
    assert r.returncode == 0, r.err
    calls = json.loads(r.out)
    assert [(c['name'], c['bbox'], c['error']) for c in calls] == [
        ('Crop', [10, 20.5, 300, 400], None), ('Identify', [1, 2, 30, 40], None),
        ('Crop', None, 'legacy call without a box'), ('Crop', None, 'empty number in the box (stray comma?)')]
    for c in calls: assert set(c) >= {'name', 'bbox', 'start', 'end', 'error'}
    assert text[calls[0]['start']:calls[0]['end']] == '<tool_call>Crop [10, 20.5, 300, 400]</tool_call>'


def test_parse_default_output_is_json_too():
    r = vlm_nb('parse', stdin='no calls here')
    assert r.returncode == 0 and json.loads(r.out) == []


def test_parse_rejects_non_utf8_and_bad_options():
    r = vlm_nb('parse', stdin=b'\xff\xfe<tool_call>')
    assert r.returncode != 0 and r.err.startswith('error:') and 'UTF-8' in r.err
    r = vlm_nb('parse', '--frobnicate', stdin='')
    assert r.returncode == 2 and r.err.strip().startswith('error:') and len(r.err.strip().splitlines()) == 1


def test_help_names_the_command():
    r = vlm_nb('parse', '--help')
    assert r.returncode == 0 and 'vlm-nb tools parse' in r.out and '--json' in r.out


def test_parse_adversarial_input_is_fast():
    r = vlm_nb('parse', '--json', stdin='<tool_call>' * 100_000 + '{Crop ' * 100_000)
    assert r.returncode == 0 and json.loads(r.out) == []
