"""Export a checkpoint to TorchScript, ONNX (plus variants) and AOTInductor, verified, with a
manifest.

One call does it all: ``build(checkpoint_or_model, out_dir, formats=..., variants=...,
verify=True) -> Manifest`` (``pipeline.py``). Beside it: ``signatures.py`` (the exported
signatures), ``torchscript.py`` / ``onnx.py`` / ``onnx_folder.py`` / ``aoti.py`` / ``hf.py``
(the writers) and ``verify.py`` (checks through the runtime). Reading an export back is the
artifacts layer's and the runtime's business, never this package's.
"""

from slm_export.export.pipeline import (
    DEFAULT_GATES,
    FORMATS,
    build,
    check_request,
    gates_with,
)
from slm_export.export.verify import QualityGate

__all__ = ["DEFAULT_GATES", "FORMATS", "QualityGate", "build", "check_request",
           "gates_with"]
