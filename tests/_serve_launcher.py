"""Run `transformers serve` in an environment without torchvision (used by tests/test_serve.py).

transformers 5.x processors for Qwen-VL always build a *video* processor, and every video processor needs
torchvision, which this project does not install (images use the PIL backends). Serving images never touches the
video processor, so this launcher makes `AutoProcessor` skip it (None) when torchvision is absent, then runs the
unchanged `transformers` CLI with the given arguments."""
import sys
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

if __name__ == '__main__':
    from transformers.cli.transformers import main
    sys.argv = ['transformers', *sys.argv[1:]]
    sys.exit(main())
