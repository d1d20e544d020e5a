"""Lets PyPI's torchvision import beside a CPU-only torch.

PyPI's torchvision wheels are built against CUDA torch; next to the CPU wheel their compiled ops (`_C.so`) cannot
load, and `import torchvision` then fails in `_meta_registrations` with "operator torchvision::nms does not exist".
The pure-torch transforms that Qwen2.5-VL's processors need do not use those ops. This hook runs just before
torchvision is first imported: if `_C.so` loads, nothing changes; if not, it declares the schemas of the two ops
torchvision registers fake kernels for, so the import succeeds and only those compiled ops stay unavailable.
"""
import importlib.abc
import importlib.util
import os
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the declared schemas alive for the life of the process


def _declare_missing_ops(package_dir: str) -> None:
    global _library
    if _library is not None:
        return
    import torch

    try:
        torch.ops.load_library(os.path.join(package_dir, "_C.so"))
        return
    except (OSError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _library = library


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        _declare_missing_ops(os.path.dirname(module.__file__))
        self._inner.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    _busy = False  # the inner lookup below must not find this finder again

    def find_spec(self, name, path, target=None):
        if name != "torchvision" or self._busy:
            return None
        _Finder._busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            _Finder._busy = False
        if spec is not None and spec.loader is not None and not isinstance(spec.loader, _Loader):
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
