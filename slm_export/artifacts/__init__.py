"""What the pipeline's steps hand each other, below both the exporter and the runtime.

- ``files``: atomic writes, SHA-256, leftovers of killed writers, folder publishing;
- ``manifest``: the export folder's schema (``manifest.json``) and the metadata in each file;
- ``loaders``: the one TorchScript loader and the one ONNX Runtime session builder.

Imports: config and errors only (and torch / onnx / onnxruntime), never the model, the
exporter or the runtime.
"""
