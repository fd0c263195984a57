"""``manifest.json``: what an export folder holds, and the checksums that prove it.

The manifest is the one place a loader looks: the model config, tokenizer, training step
and, for every file, its kind (``onnx``, ``onnx_kv``, ``torchscript``, ``torchscript_kv``,
``aoti_kv``, ``hf``, ...), variant (``registry.VARIANTS``, stored under the key ``dtype``),
size and SHA-256. Nothing is guessed from file names:
``Manifest.read(folder).file("onnx_kv", "int8")`` asks the manifest, and hashes only the file
it returns (a runtime loading one file of a large export need not hash the others).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slm_export.artifacts.files import atomic_write, sha256_file
from slm_export.config import GPTConfig
from slm_export.errors import SlmError, first_line
from slm_export.registry import VARIANTS

FORMAT = "slm-export-export"
VERSION = 2  # 2: cache graphs in the per-layer layout of kv_layout.py (1: one packed tensor)
MANIFEST = "manifest.json"
# *_config: the files other tools read beside the weights (configs, tokenizer): hf/, onnx/
KINDS = ("onnx", "onnx_kv", "onnx_config", "torchscript", "torchscript_kv", "aoti_kv",
         "executorch_kv", "hf", "hf_config")


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


@dataclass(frozen=True)
class Provenance:
    """Where the exported weights come from: recorded in the manifest and in every file."""

    model_config: dict
    tokenizer: str = "gpt2"
    step: int = 0
    val_loss: float | None = None
    checkpoint: str = ""

    @classmethod
    def of_checkpoint(cls, ckpt: dict, path: str | os.PathLike = "") -> Provenance:
        val_loss = ckpt.get("val_loss")
        return cls(dict(ckpt["model_config"]), str(ckpt.get("tokenizer", "gpt2")),
                   int(ckpt.get("step", 0)), None if val_loss is None else float(val_loss),
                   str(path))

    def file_metadata(self, kind: str, variant: str = "fp32") -> dict[str, str]:
        """String key/values embedded in every exported file (ONNX ``metadata_props``,
        TorchScript ``_extra_files``), so a file alone says what it is."""
        return {
            "format": FORMAT,
            "kind": kind,
            "dtype": variant,
            "model_config": json.dumps(self.model_config, sort_keys=True),
            "tokenizer": self.tokenizer,
            "step": str(self.step),
            "val_loss": "null" if self.val_loss is None else repr(self.val_loss),
            "versions": json.dumps(versions(), sort_keys=True),
        }


def file_entry(folder: str | os.PathLike, name: str, kind: str, variant: str = "fp32") -> dict:
    """The manifest record of one file already written in ``folder``."""
    if kind not in KINDS or variant not in VARIANTS:
        raise ValueError(f"unknown file kind/variant {kind}/{variant}")
    path = Path(folder) / name
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size,
            "kind": kind, "dtype": variant}


def write_manifest(folder: str | os.PathLike, provenance: Provenance, files: dict[str, dict],
                   **extra: Any) -> Path:
    """Write ``folder/manifest.json`` atomically.

    ``files`` maps a file name (relative to ``folder``) to ``file_entry(...)`` records;
    ``extra`` holds anything else worth keeping (opset, verification results).
    """
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": dict(provenance.model_config),
        "tokenizer": provenance.tokenizer,
        "step": provenance.step,
        "val_loss": provenance.val_loss,
        "source_checkpoint": provenance.checkpoint,
        "versions": versions(),
        "files": dict(sorted(files.items())),
        **extra,
    }
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    path = Path(folder) / MANIFEST
    atomic_write(path, lambda f: f.write(data))
    return path


@dataclass(frozen=True)
class Manifest:
    """A validated ``manifest.json`` and the folder it describes."""

    folder: Path
    data: dict

    @classmethod
    def read(cls, folder: str | os.PathLike, verify_hashes: bool = True) -> Manifest:
        """Load and validate ``folder/manifest.json``; every listed file must exist and, with
        ``verify_hashes``, match its size and SHA-256. Problems are one-line ``SlmError``s."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise SlmError(f"no {MANIFEST} in {folder} (not an export folder? run export.py)")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SlmError(f"{path} is not valid JSON ({first_line(e, 120)})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SlmError(f"{path} is not an slm-export export manifest")
        if data.get("version") == 1:
            raise SlmError(f"{path}: an export of slm-export 0.1 (packed KV-cache layout); "
                           "re-export it with python export.py")
        if data.get("version") != VERSION:
            raise SlmError(f"{path}: unsupported manifest version {data.get('version')!r}")
        if not isinstance(data.get("files"), dict) or not isinstance(data.get("model_config"), dict):
            raise SlmError(f"{path}: missing 'files' or 'model_config'")
        manifest = cls(folder, data)
        for name, entry in data["files"].items():
            manifest._check(name, entry, verify_hashes)
        return manifest

    @property
    def config(self) -> GPTConfig:
        return GPTConfig.from_dict(self.data["model_config"])

    @property
    def files(self) -> dict[str, dict]:
        return self.data["files"]

    def has(self, kind: str, variant: str = "fp32") -> bool:
        return any(e.get("kind") == kind and e.get("dtype") == variant for e in self.files.values())

    def file(self, kind: str, variant: str = "fp32", verify_hash: bool = True) -> Path:
        """The path of the file of this kind and variant, its hash checked; else one line."""
        for name, entry in self.files.items():
            if entry.get("kind") == kind and entry.get("dtype") == variant:
                self._check(name, entry, verify_hash)
                return self.folder / name
        have = sorted(f"{e.get('kind')}/{e.get('dtype')}" for e in self.files.values())
        raise SlmError(f"export in {self.folder} has no {kind} file in {variant} "
                       f"(it has: {', '.join(have) or 'nothing'}); re-export with that format")

    def _check(self, name: str, entry: Any, verify_hash: bool) -> None:
        where = self.folder / MANIFEST
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise SlmError(f"{where}: file name {name!r} points outside the folder")
        if not isinstance(entry, dict) or not {"sha256", "bytes", "kind", "dtype"} <= entry.keys():
            raise SlmError(f"{where}: malformed entry for {name}")
        path = self.folder / name
        if not path.is_file():
            raise SlmError(f"{path} is listed in the manifest but missing")
        if not verify_hash:
            return
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise SlmError(f"{path} has {size} bytes, the manifest says {entry['bytes']} "
                           "(modified or truncated; re-export)")
        if sha256_file(path) != entry["sha256"]:
            raise SlmError(f"{path}: SHA-256 mismatch with the manifest (modified; re-export)")
