"""The one place that repairs `import torchvision` on a mismatched torch/torchvision pair.

PyPI's torchvision wheel is a CUDA build. Beside the CPU torch wheel its compiled ops fail to load, and its
fake-op registration then raises ``RuntimeError: operator torchvision::nms does not exist``, which breaks every
import of torchvision, open_clip and timm. Defining the two missing schemas lets the import finish; transforms,
datasets and models work, ``torchvision.io`` decoding and ``ops.nms`` do not (we decode with PIL).

Engaged only on that exact failure: with a matched pair the first import succeeds and nothing is patched.
"""

from __future__ import annotations

import sys

_MISSING_OP_MESSAGE = "operator torchvision::nms does not exist"
_library_fragment = None  # must stay referenced, or torch drops the schema definitions


def ensure_torchvision() -> None:
    """Import torchvision, patching the missing op schemas first if the plain import fails as described above."""
    global _library_fragment
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as error:
        if _MISSING_OP_MESSAGE not in str(error):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _library_fragment = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _library_fragment.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401
