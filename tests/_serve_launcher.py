"""Run `transformers serve` in an environment without torchvision (used by tests/test_serve.py).

transformers 5.x processors for Qwen-VL always build a *video* processor, and every video processor needs
torchvision, which this project does not install (images use the PIL backends). Serving images never touches the
video processor, so this launcher makes `AutoProcessor` skip it (None) when torchvision is absent, then runs the
unchanged `transformers` CLI with the given arguments.

With `VLM_NB_SERVE_IDS=FILE` set, every prompt the server tokenizes is appended to FILE as one JSON line of token ids
(the ids `apply_chat_template` returns, images expanded), so tests can compare them with training sequences."""
import json, os, sys
from transformers.utils import is_torchvision_available

if not is_torchvision_available():
    import transformers.processing_utils as pu
    class _NoVideoProcessor:
        @classmethod
        def from_pretrained(cls, *a, **k): return None
    _m = pu.MODALITY_TO_AUTOPROCESSOR_MAPPING
    _get = type(_m).__getitem__
    type(_m).__getitem__ = lambda self, k: _NoVideoProcessor if k == 'video_processor' else _get(self, k)
    _check = pu.ProcessorMixin.check_argument_for_proper_class
    pu.ProcessorMixin.check_argument_for_proper_class = (
        lambda self, name, arg: None if arg is None and name == 'video_processor' else _check(self, name, arg))

_ids_log = os.environ.get('VLM_NB_SERVE_IDS')
if _ids_log:
    import transformers.processing_utils as _pu
    _apply = _pu.ProcessorMixin.apply_chat_template
    def _logged_apply(self, *a, **k):
        out = _apply(self, *a, **k)
        try:
            ids = out['input_ids']
            ids = ids.tolist() if hasattr(ids, 'tolist') else list(ids)
            if ids and isinstance(ids[0], list): ids = ids[0]
            with open(_ids_log, 'a') as f: f.write(json.dumps(ids) + '\n')
        except (KeyError, TypeError, IndexError): pass
        return out
    _pu.ProcessorMixin.apply_chat_template = _logged_apply

if __name__ == '__main__':
    from transformers.cli.transformers import main
    sys.argv = ['transformers', *sys.argv[1:]]
    sys.exit(main())
