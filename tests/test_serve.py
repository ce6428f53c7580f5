"""`transformers serve` answers an OpenAI chat request with an image for a tiny native-family checkpoint.

Needs fastapi, uvicorn and openai (`pip install fastapi uvicorn openai`). The server runs through
tests/_serve_launcher.py, which only lets the Qwen-VL processor load without torchvision (see its docstring)."""
import base64, io, os, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from conftest import transformers_serve

@pytest.fixture(scope='module')
def server(tmp_path_factory):
    for mod in ('fastapi', 'uvicorn', 'openai'): pytest.importorskip(mod, reason=f'transformers serve needs {mod}')
    from vlm_nb.models import make_tiny
    ckpt = make_tiny('qwen2_5_vl', tmp_path_factory.mktemp('tiny') / 'qwen2_5_vl')
    with transformers_serve(ckpt, tmp_path_factory.mktemp('log') / 'serve.log', launcher=True, timeout=120) as port:
        yield dict(url=f'http://127.0.0.1:{port}/v1', model=str(ckpt))

def test_chat_with_image(server):
    from openai import OpenAI
    from PIL import Image
    buf = io.BytesIO(); Image.new('RGB', (448, 448), (200, 30, 30)).save(buf, 'PNG')
    url = 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode()
    client = OpenAI(base_url=server['url'], api_key='none', timeout=90, max_retries=0)
    # a random tiny model may repeat the prompt's last token ("\n"); banning whitespace-only tokens keeps the reply
    # visible with the real vocabulary and with the small self-built one alike
    from transformers import AutoTokenizer
    blank = {str(i): -100.0 for t, i in AutoTokenizer.from_pretrained(server['model']).get_vocab().items() if set(t) <= set('ĠĊĉč')}
    r = client.chat.completions.create(model=server['model'], max_tokens=4, temperature=0, logit_bias=blank, messages=[
        {'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': url}}, {'type': 'text', 'text': 'What is this?'}]}])
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.usage.completion_tokens == 4
    # the 448×448 image became 256 <|image_pad|> tokens (tiny checkpoint: max_pixels 448², patch 14, merge 2)
    assert r.usage.prompt_tokens > 256
