"""The export pipeline as one library call, ``build(...) -> Manifest``.

Files are written into a hidden staging folder beside the output folder, verified there
through the runtime that will serve them, recorded in the staged manifest, and only then
swapped in for the output folder. A failed or interrupted export leaves the output folder
as it was; an export killed in the middle of the swap is undone by the next one.
``slm_export.cli.export`` is argparse around this call.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from slm_export import registry
from slm_export.artifacts.files import publish_folder, staging_folder
from slm_export.artifacts.manifest import MANIFEST, Manifest, Provenance, file_entry, write_manifest
from slm_export.errors import SlmError
from slm_export.export import onnx as onnx_export
from slm_export.export import torchscript
from slm_export.export.verify import QualityGate, verify_folder
from slm_export.runtime import backend_for_model

FORMATS = ("onnx", "torchscript", "aoti", "executorch", "hf")
DEFAULT_FORMATS = ("onnx", "torchscript")
# Each reduced variant's gate against fp32 on held-out text (verify.QualityGate): a correct
# conversion of a briefly trained model clears them, a shuffled or scaled weight misses them
# (tests/test_export.py). The bench checks its variants against the same thresholds.
DEFAULT_GATES = {
    "int8": QualityGate(min_top1=0.95, max_loss_delta=0.05, max_kl=0.01, min_greedy_agreement=0.9),
    "int4": QualityGate(min_top1=0.9, max_loss_delta=0.05, max_kl=0.02, min_greedy_agreement=0.85),
    # 4-bit blocks with an 8-bit vocabulary matrix: held to the 8-bit file's bar, as auto is
    "mixed": QualityGate(min_top1=0.95, max_loss_delta=0.05, max_kl=0.01, min_greedy_agreement=0.9),
    "auto": QualityGate(min_top1=0.95, max_loss_delta=0.05, max_kl=0.01, min_greedy_agreement=0.9),
    "fp16": QualityGate(min_top1=0.99, max_loss_delta=0.01, max_kl=1e-4, min_greedy_agreement=0.99,
                        max_logit_error=0.02),
}


def build(source: str | os.PathLike | torch.nn.Module, out_dir: str | os.PathLike | None = None,
          *, formats: Sequence[str] = DEFAULT_FORMATS, variants: Sequence[str] = (),
          opset: int = onnx_export.DEFAULT_OPSET, verify: bool = True,
          gates: dict[str, QualityGate] | None = None, allow_unverified: Sequence[str] = (),
          device: torch.device | str = "cpu",
          report: Callable[[str], None] | None = None) -> Manifest:
    """Export ``source`` (a weights checkpoint path, or a GPT) into ``out_dir``.

    ``out_dir`` defaults to ``<checkpoint folder>/export``. ``variants`` adds reduced ONNX
    files (``registry.REDUCED``: int8, int4, fp16; they need "onnx" in ``formats``). With
    ``verify`` every file is checked against eager PyTorch and each variant against its
    ``gates`` entry (``DEFAULT_GATES``); the served files run on ``device``, and "aoti"
    (``model_kv.pt2``, not a default: it compiles C++) is compiled for it. A variant whose
    check cannot run fails the export unless it is in ``allow_unverified`` (the manifest
    then records why it was not checked). ``report`` receives one line per step; the
    manifest records ``verified``.
    Returns the published folder's manifest; raises ``SlmError`` on any failure.
    """
    check_request(formats, variants, opset, allow_unverified, device)
    if AUTO in variants and not verify:
        raise SlmError("--quantize auto chooses by the quality gates: it needs verification")
    model, provenance = _load(source)
    out = _output_folder(out_dir, provenance)
    report = report or (lambda line: None)
    gates = {**DEFAULT_GATES, **(gates or {})}
    asked = [v for v in variants if v != AUTO]
    written = [*asked, *(c for c in AUTO_CANDIDATES if AUTO in variants and c not in asked)]
    with staging_folder(out) as staging:
        files = _write_files(model, provenance, staging, formats, written, opset, device)
        extra = {"opset": opset if "onnx" in formats else None}
        write_manifest(staging, provenance, files, **extra, verified=False, verification=None)
        if verify:
            results = verify_folder(model, staging, asked, gates, device, report, allow_unverified)
            if AUTO in variants:
                results[AUTO] = choose_auto(model, staging, files, asked, gates[AUTO], device, report)
            write_manifest(staging, provenance, files, **extra, verified=True, verification=results)
        publish_folder(staging, out)
    for name, entry in sorted(files.items()):
        report(f"wrote {out / name} ({entry['bytes'] / 1e6:.1f} MB, {entry['kind']} {entry['dtype']})")
    report(f"wrote {out / MANIFEST}" + ("" if verify else " (not verified)"))
    return Manifest.read(out, verify_hashes=False)


AUTO = "auto"  # --quantize auto: the smallest of AUTO_CANDIDATES that passes the auto gate
AUTO_CANDIDATES = ("int4", "mixed", "int8")


def choose_auto(model, folder: Path, files: dict[str, dict], asked, gate: QualityGate,
                device, report) -> dict:
    """Measure every candidate variant against ``gate`` (the same measurements as a variant's
    own check), keep the smallest cache graph that passes, and remove the other candidates
    (those not asked for by name) from ``folder`` and ``files``. -> the manifest's record."""
    from slm_export.export.verify import verify_variant

    manifest = Manifest.read(folder, verify_hashes=False)
    eager = backend_for_model("eager", model if torch.device(device).type == "cpu" else
                              copy.deepcopy(model).to(device))
    record = {"gate": dataclasses.asdict(gate), "candidates": {}}
    for variant in AUTO_CANDIDATES:
        size = manifest.files[manifest.file("onnx_kv", variant).relative_to(folder).as_posix()]["bytes"]
        try:
            measured = verify_variant(model, manifest, variant, eager, gate, report=lambda line: None)
            record["candidates"][variant] = {"bytes": size, "passed": True, **measured}
        except SlmError as e:
            record["candidates"][variant] = {"bytes": size, "passed": False, "reason": str(e)}
    passed = [v for v, r in record["candidates"].items() if r["passed"]]
    if not passed:
        raise SlmError(f"--quantize auto: no candidate passes the gate ({gate}); "
                       f"{'; '.join(r['reason'] for r in record['candidates'].values())}")
    record["chosen"] = chosen = min(passed, key=lambda v: record["candidates"][v]["bytes"])
    for name in [n for n, e in files.items() if e["dtype"] in AUTO_CANDIDATES
                 and e["dtype"] not in (chosen, *asked)]:
        (folder / name).unlink()
        del files[name]
    sizes = ", ".join(f"{v} {r['bytes'] / 1e6:.1f} MB {'passed' if r['passed'] else 'failed'}"
                      for v, r in record["candidates"].items())
    report(f"--quantize auto: {chosen} ({sizes}; gate {gate})")
    return record


def check_request(formats: Sequence[str], variants: Sequence[str], opset: int,
                  allow_unverified: Sequence[str] = (), device: torch.device | str = "cpu") -> None:
    """Refuse an impossible request before any work (one-line ``SlmError``)."""
    unknown = [f for f in formats if f not in FORMATS] + [
        v for v in variants if v not in (*registry.REDUCED, AUTO)]
    if unknown:
        raise SlmError(f"unknown export format or variant {unknown[0]!r}")
    from slm_export.export import executorch

    for variant in variants:  # a variant needs a format that writes it
        if "onnx" not in formats and not ("executorch" in formats and variant in executorch.VARIANTS):
            where = "ONNX and ExecuTorch" if variant in executorch.VARIANTS else "ONNX"
            raise SlmError(f"variant {variant} applies to {where}: include the onnx format")
    stray = [v for v in allow_unverified if v not in variants]
    if stray:
        raise SlmError(f"--allow-unverified {stray[0]}: this export writes no {stray[0]} variant")
    if "onnx" in formats:
        onnx_export.check_opset(opset)
    if "hf" in formats:
        from slm_export.export import hf

        hf.require()
    if "aoti" in formats:
        from slm_export.export import aoti

        aoti.require(device)
    if "executorch" in formats:
        executorch.require()


def gates_with(**thresholds: float | None) -> dict[str, QualityGate]:
    """``DEFAULT_GATES`` with the given ``QualityGate`` thresholds set for every variant
    (None: keep each variant's default)."""
    given = {name: value for name, value in thresholds.items() if value is not None}
    return {variant: dataclasses.replace(gate, **given) for variant, gate in DEFAULT_GATES.items()}


def _load(source) -> tuple[torch.nn.Module, Provenance]:
    if isinstance(source, torch.nn.Module):
        return source.eval(), Provenance(source.config.to_dict())
    from slm_export.checkpoint import load_model

    model, ckpt = load_model(source)
    return model, Provenance.of_checkpoint(ckpt, source)


def _output_folder(out_dir, provenance: Provenance) -> Path:
    if out_dir is None:
        if not provenance.checkpoint:
            raise SlmError("exporting a model object needs an output folder")
        out_dir = Path(provenance.checkpoint).parent / "export"
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SlmError(f"output folder {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        # The whole folder is replaced: never someone else's.
        raise SlmError(f"output folder {out} is not empty and is not an export folder "
                       f"(no {MANIFEST}); choose another folder")
    return out


def _write_files(model, provenance: Provenance, folder: Path, formats, variants,
                 opset: int, device) -> dict[str, dict]:
    """Write every requested file into ``folder`` -> {file name: manifest entry}."""
    kinds: dict[str, tuple[str, str]] = {}
    if "onnx" in formats:
        written = onnx_export.export(model, provenance, folder, opset)
        kinds.update({name: (kind, "fp32") for name, kind in written.items()})
        for variant in variants:
            written = onnx_export.export_variant(folder, provenance, variant)
            kinds.update({name: (kind, variant) for name, kind in written.items()})
    if "torchscript" in formats:
        written = torchscript.export(model, provenance, folder)
        kinds.update({name: (kind, "fp32") for name, kind in written.items()})
    if "aoti" in formats:  # compiled for the device the files are verified (and served) on
        from slm_export.export import aoti

        kinds.update({name: (kind, "fp32") for name, kind in aoti.export(model, provenance, folder,
                                                                         device).items()})
    if "executorch" in formats:
        from slm_export.export import executorch

        kinds.update(executorch.export(model, provenance, folder,
                                       tuple(v for v in variants if v in executorch.VARIANTS)))
    if "hf" in formats:
        from slm_export.export import hf

        kinds.update({name: (kind, "fp32") for name, kind in hf.export(model, folder).items()})
    return {name: file_entry(folder, name, kind, variant) for name, (kind, variant) in kinds.items()}
