"""Ovis2.5 parity with the official remote code: `vlm-nb tiny --family ovis2_5` output loads in it unchanged.

The official code (AIDC-AI's `modeling_ovis2_5.py` + `configuration_ovis2_5.py`, from the model's hub repo) needs
transformers 4.57, which cannot share an environment with this project's transformers 5. So the check runs in a second
Python given by `VLM_NB_TF457_PYTHON` (e.g. a venv with `pip install torch==2.13.0 'transformers==4.57.*'`), with the
official files in the folder `VLM_NB_OVIS_OFFICIAL`; the project does not ship that code. Without both, the test skips
and says why. The check: the official `Ovis2_5.from_pretrained` loads the folder as written (config, weights, tokenizer,
`AutoImageProcessor` from `preprocessor_config.json`), its `preprocess_inputs` builds the same ids and pixels as
vlm_nb's adapter, and its logits equal vlm_nb's on the same input."""
import json, os, shutil, subprocess, sys, textwrap
from pathlib import Path
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

def test_generalise_name_imports_what_it_uses():
    "vlm_nb.ovis.generalise_name works in a fresh interpreter (its `re` import must be in the module, not a test cell)."
    r = subprocess.run([sys.executable, '-c', 'from vlm_nb.ovis import generalise_name; print(generalise_name("llm.model.layers.7.mlp.up_proj"))'],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == 'llm.model.layers.N.mlp.up_proj'

def test_tiny_preprocessor_names_its_image_processor(tmp_path):
    from vlm_nb.models import make_tiny
    pp = json.loads((make_tiny('ovis2_5', tmp_path/'o')/'preprocessor_config.json').read_text())
    assert pp['image_processor_type'] == 'SiglipImageProcessor' and pp['image_mean'] == [0.5]*3 and pp['min_pixels'] == 448*448

def _official():
    py, code = os.environ.get('VLM_NB_TF457_PYTHON', '/tmp/v457/bin/python'), os.environ.get('VLM_NB_OVIS_OFFICIAL', '/tmp/ovis_official')
    if not Path(py).exists(): return None, f'no transformers-4.57 Python ({py}); set VLM_NB_TF457_PYTHON'
    if not all((Path(code)/f).exists() for f in ('modeling_ovis2_5.py', 'configuration_ovis2_5.py')):
        return None, f'official Ovis2.5 remote code not found in {code}; set VLM_NB_OVIS_OFFICIAL'
    v = subprocess.run([py, '-c', 'import transformers; print(transformers.__version__)'], capture_output=True, text=True)
    if v.returncode or not v.stdout.startswith('4.57'): return None, f'{py} has transformers {v.stdout.strip() or v.stderr[-200:]}, not 4.57'
    return (py, Path(code)), ''

_OFFICIAL_RUN = textwrap.dedent('''
    import sys, json, torch, numpy as np
    from PIL import Image
    sys.path.insert(0, sys.argv[1])
    from ovis_remote.modeling_ovis2_5 import Ovis2_5
    ckpt, out = sys.argv[2], sys.argv[3]
    model = Ovis2_5.from_pretrained(ckpt, torch_dtype=torch.float32).eval()      # the checkpoint folder, unchanged
    img = Image.open(sys.argv[4]).convert('RGB')
    msgs = [{'role': 'user', 'content': [{'type': 'text', 'text': 'Look:'}, {'type': 'image', 'image': img}, {'type': 'text', 'text': 'What is red?'}]}]
    ids, pv, grid = model.preprocess_inputs(msgs, min_pixels=448*448, max_pixels=448*448)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, grid_thws=grid).logits
    np.save(out + '/logits.npy', logits[0].float().numpy()); np.save(out + '/pixels.npy', pv.numpy())
    json.dump({'ids': ids[0].tolist(), 'grid': grid.tolist(), 'processor': type(model.visual_tokenizer.image_processor).__name__}, open(out + '/out.json', 'w'))
''')

def test_tiny_checkpoint_loads_in_official_remote_code(tmp_path):
    got, why = _official()
    if got is None:
        print(f'SKIP reason: {why}'); pytest.skip(why)
    py, code = got
    import torch
    from PIL import Image
    from vlm_nb.models import load_model
    ck = tmp_path/'tiny_ovis'
    r = subprocess.run([sys.executable, '-m', 'vlm_nb.cli', 'tiny', '--family', 'ovis2_5', '--out', str(ck)], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert r.returncode == 0, r.stderr
    pkg = tmp_path/'remote'/'ovis_remote'; pkg.mkdir(parents=True)                  # the official files as a package, as
    for f in ('modeling_ovis2_5.py', 'configuration_ovis2_5.py'): shutil.copy(code/f, pkg/f)   # trust_remote_code imports them
    (pkg/'__init__.py').write_text('')
    a = np.zeros((300, 400, 3), np.uint8); a[50:200, 100:300] = (220, 30, 30)
    Image.fromarray(a).save(tmp_path/'img.png')
    run = subprocess.run([str(py), '-c', _OFFICIAL_RUN, str(pkg.parent), str(ck), str(tmp_path), str(tmp_path/'img.png')],
                         capture_output=True, text=True, env={**os.environ, 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'PYTHONPATH': ''})
    assert run.returncode == 0, run.stderr[-3000:]
    off = json.loads((tmp_path/'out.json').read_text())
    assert off['processor'].startswith('Siglip')
    model, ad = load_model(ck)
    text = ad.render_prompt([{'role': 'user', 'content': [{'type': 'text', 'text': 'Look:'}, {'type': 'image'}, {'type': 'text', 'text': 'What is red?'}]}])
    blk = ad.image_block(Image.open(tmp_path/'img.png'))
    ids = ad.encode_with_images(text, [blk])
    assert ids == off['ids']                                                        # same prompt (official default: thinking off)
    assert blk.pixel['grid_thws'].tolist() == off['grid']
    np.testing.assert_allclose(blk.pixel['pixel_values'].numpy(), np.load(tmp_path/'pixels.npy'), atol=1e-5)
    with torch.no_grad():
        ours = ad.forward(model, torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **ad.collate_pixels([blk])).logits
    np.testing.assert_allclose(ours[0].numpy(), np.load(tmp_path/'logits.npy'), atol=1e-4, rtol=1e-4)
