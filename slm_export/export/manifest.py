"""``manifest.json``: what an export folder holds, and the checksums that prove it.

The manifest is the one place a loader looks: the model config, tokenizer, training step
and, for every file, its kind (``onnx``, ``onnx_kv``, ``torchscript``, ``torchscript_kv``,
``hf``), dtype (``fp32``, ``fp16``, ``int8``), size and SHA-256. Nothing is guessed from file
names: ``file_for(manifest, folder, "onnx_kv", "int8")`` asks the manifest.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from slm_export.artifacts.files import atomic_write, sha256_file
from slm_export.errors import SlmError, first_line

FORMAT = "slm-export-export"
VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("onnx", "onnx_kv", "torchscript", "torchscript_kv", "hf", "hf_config")
DTYPES = ("fp32", "fp16", "int8")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of the libraries that wrote (and should be able to read) the files."""
    import onnx
    import onnxruntime
    import torch

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "slm_export": package_version("slm-export") or "0+local",
    }


def file_metadata(ckpt: dict, kind: str, dtype: str = "fp32") -> dict[str, str]:
    """String key/values embedded in every exported file (ONNX ``metadata_props``,
    TorchScript ``_extra_files``), so a file alone says what it is."""
    val_loss = ckpt.get("val_loss")
    return {
        "format": FORMAT,
        "kind": kind,
        "dtype": dtype,
        "model_config": json.dumps(ckpt["model_config"], sort_keys=True),
        "tokenizer": str(ckpt.get("tokenizer", "gpt2")),
        "step": str(int(ckpt.get("step", 0))),
        "val_loss": "null" if val_loss is None else repr(float(val_loss)),
        "versions": json.dumps(versions(), sort_keys=True),
    }


def file_entry(folder: str | os.PathLike, name: str, kind: str, dtype: str = "fp32") -> dict:
    """The manifest record of one file already written in ``folder``."""
    assert kind in KINDS and dtype in DTYPES, (kind, dtype)
    path = Path(folder) / name
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size,
            "kind": kind, "dtype": dtype}


def write_manifest(folder: str | os.PathLike, *, model_config: dict, files: dict[str, dict],
                   tokenizer: str = "gpt2", step: int = 0, val_loss: float | None = None,
                   source_checkpoint: str = "", opset: int | None = None,
                   **extra: Any) -> Path:
    """Write ``folder/manifest.json`` atomically.

    ``files`` maps a file name (relative to ``folder``) to ``file_entry(...)`` records;
    ``extra`` holds anything else worth keeping (verification results, the int8 loss delta).
    """
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": dict(model_config),
        "tokenizer": tokenizer,
        "step": int(step),
        "val_loss": None if val_loss is None else float(val_loss),
        "source_checkpoint": str(source_checkpoint),
        "versions": versions(),
        "opset": opset,
        "files": dict(sorted(files.items())),
        **extra,
    }
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    path = Path(folder) / MANIFEST
    atomic_write(path, lambda f: f.write(data))
    return path


def read_manifest(folder: str | os.PathLike, verify_hashes: bool = True) -> dict:
    """Load and validate ``folder/manifest.json``; with ``verify_hashes``, check every file.

    Every problem (no manifest, bad JSON, wrong format, a listed file missing, resized or
    with a different SHA-256) is a one-line ``SlmError`` naming the file.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise SlmError(f"no {MANIFEST} in {folder} (not an export folder? run export.py)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SlmError(f"{path} is not valid JSON ({first_line(e, 120)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SlmError(f"{path} is not an slm-export export manifest")
    if manifest.get("version") != VERSION:
        raise SlmError(f"{path}: unsupported manifest version {manifest.get('version')!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("model_config"), dict):
        raise SlmError(f"{path}: missing 'files' or 'model_config'")
    for name, entry in files.items():
        _check_entry(folder, name, entry, verify_hashes)
    return manifest


def _check_entry(folder: Path, name: str, entry: Any, verify_hashes: bool) -> None:
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise SlmError(f"{folder / MANIFEST}: file name {name!r} points outside the folder")
    if not isinstance(entry, dict) or not {"sha256", "bytes", "kind", "dtype"} <= entry.keys():
        raise SlmError(f"{folder / MANIFEST}: malformed entry for {name}")
    path = folder / name
    if not path.is_file():
        raise SlmError(f"{path} is listed in the manifest but missing")
    if not verify_hashes:
        return
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise SlmError(f"{path} has {size} bytes, the manifest says {entry['bytes']} "
                       "(modified or truncated; re-export)")
    if sha256_file(path) != entry["sha256"]:
        raise SlmError(f"{path}: SHA-256 mismatch with the manifest (modified; re-export)")


def file_for(manifest: dict, folder: str | os.PathLike, kind: str, dtype: str = "fp32",
             verify_hash: bool = False) -> Path:
    """The path of the file of this kind and dtype the manifest lists, or a one-line error.

    ``verify_hash`` checks that one file's size and SHA-256 (a runtime loading one file of
    a large export need not hash all the others).
    """
    for name, entry in manifest["files"].items():
        if entry.get("kind") == kind and entry.get("dtype") == dtype:
            _check_entry(Path(folder), name, entry, verify_hash)
            return Path(folder) / name
    have = sorted(f"{e.get('kind')}/{e.get('dtype')}" for e in manifest["files"].values())
    raise SlmError(f"export in {folder} has no {kind} file in {dtype} "
                   f"(it has: {', '.join(have) or 'nothing'}); re-export with that format")
