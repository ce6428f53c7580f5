"End-to-end test of `vlm-nb demo` (vlm_nb.demo.demo_main) on a small budget."
import json, os
from pathlib import Path
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
from vlm_nb.demo import demo_main

METRICS = ('tool_call_validity', 'crop_iou', 'answer_accuracy', 'identity_accuracy', 'self_written_tool_response_rate')

def _v(x): return 0.0 if x is None else x

@pytest.mark.slow
def test_demo_small_budget_learns(tmp_path):
    out = tmp_path/'run'
    assert demo_main(['--out', str(out), '--minutes', '4', '--grpo']) == 0
    rep = json.loads((out/'report.json').read_text())
    for side in ('before', 'after'):
        for k in METRICS: assert k in rep[side], (side, k)
        assert rep[side]['n'] > 0
    g = rep['grpo']
    assert g['steps'] >= 1 and g['tool_calls_executed'] >= 0 and 'reward_first' in g and 'reward_last' in g
    b, a = rep['before'], rep['after']
    assert _v(a['tool_call_validity']) >= 0.9 > _v(b['tool_call_validity'])
    assert a['self_written_tool_response_rate'] == 0
    # 4 minutes (400 SFT steps) reach 0.55 (seed 0) on 20 held-out questions, chance 0.115: identity answers are learned
    assert _v(a['answer_accuracy']) > _v(b['answer_accuracy'])
    assert _v(a['answer_accuracy']) > rep['chance_accuracy'] + 0.1
    assert set(a['per_kind']) == {'crop', 'identify'}
    for f in ('loss_curve.png', 'metrics.png'): assert (out/'figures'/f).stat().st_size > 1000
    assert '| answer_accuracy |' in (out/'report.md').read_text()
    # a rerun resumes: every stage is skipped and the report is the same
    assert demo_main(['--out', str(out), '--minutes', '4', '--grpo', '--json']) == 0
    rep2 = json.loads((out/'report.json').read_text())
    assert rep2['after'] == rep['after']

def test_demo_cli_errors(capsys):
    assert demo_main(['--minutes', '0']) == 2
    assert capsys.readouterr().err.startswith('error:')
    assert demo_main(['--help']) == 0
    assert 'vlm-nb demo' in capsys.readouterr().out
