"""Export a checkpoint to TorchScript and ONNX (plus variants), with a checked manifest.

``torchscript.py`` and ``onnx.py`` write the files, ``verify.py`` compares them with eager
PyTorch, ``manifest.py`` records them; ``slm_export.cli.export`` runs the steps in order.
Loaders only need ``read_manifest`` and ``file_for``.
"""

from slm_export.export.manifest import MANIFEST, file_for, read_manifest, write_manifest

__all__ = ["MANIFEST", "file_for", "read_manifest", "write_manifest"]
