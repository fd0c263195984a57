"""python export.py: a checkpoint -> TorchScript / ONNX (/ HF) files, verified, with a manifest.

The export is built in a hidden sibling folder and swapped in only when every file is
written (and verified), so a failed or interrupted export never leaves a half-written
folder, or a manifest describing other files, under the final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from slm_export.artifacts.files import remove_stale_temps
from slm_export.checkpoint import load_model
from slm_export.cli.common import ArgumentParser, entry_point
from slm_export.errors import SlmError, first_line
from slm_export.export import onnx as onnx_export
from slm_export.export import torchscript, verify
from slm_export.export.manifest import MANIFEST, file_entry, write_manifest

DEFAULT_CHECKPOINT = Path("artifacts/runs/latest/best.pt")
FORMATS = {"onnx": ("onnx",), "torchscript": ("torchscript",), "hf": ("hf",),
           "all": ("onnx", "torchscript")}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="export.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"a weights checkpoint (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--format", choices=list(FORMATS), default="all",
                   help="what to write (all = onnx + torchscript)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="export folder (default: <checkpoint folder>/export)")
    p.add_argument("--opset", type=int, default=onnx_export.DEFAULT_OPSET,
                   help=f"ONNX opset (default {onnx_export.DEFAULT_OPSET})")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="fp16 also writes model.fp16.onnx / model_kv.fp16.onnx (fp32 IO)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="also write dynamically quantized model.int8.onnx / model_kv.int8.onnx")
    p.add_argument("--verify", action="store_true", default=True,
                   help="check every file against eager PyTorch (default)")
    p.add_argument("--no-verify", dest="verify", action="store_false")
    return p


def _check_args(args) -> None:
    formats = FORMATS[args.format]
    variants = [v for v in (args.quantize, "fp16" if args.dtype == "fp16" else None) if v]
    if variants and "onnx" not in formats:
        raise SlmError(f"--quantize/--dtype {variants[0]} applies to ONNX: use --format onnx or all")
    if "onnx" in formats:
        onnx_export.check_opset(args.opset)
    if "hf" in formats:
        from slm_export.export import hf
        hf.require()


def _resolve_out(args, checkpoint: Path) -> Path:
    out = args.out_dir or checkpoint.parent / "export"
    if out.exists() and not out.is_dir():
        raise SlmError(f"--out-dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        # We replace the whole folder: never someone else's.
        raise SlmError(f"--out-dir {out} is not empty and is not an export folder "
                       f"(no {MANIFEST}); choose another folder")
    return out


def _recover_killed_publish(out: Path) -> None:
    """An export killed inside ``_publish`` may have moved the previous folder aside and not
    yet put the new one in place: put the previous one back (then stale leftovers go)."""
    if not out.exists():
        for old in sorted(out.parent.glob(f".{out.name}.old*")):
            os.replace(old, out)
            break
    remove_stale_temps(out, tags=("old",))


def _publish(staging: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _ort_providers() -> list[str] | None:
    import onnxruntime as ort

    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return None


def _verify(model, folder: Path, files: dict[str, dict], variants: list[str]) -> dict:
    """Every check for the files written; -> results for the manifest. Raises SlmError."""
    logits_runners, kv_runners = {}, {}
    kinds = {(e["kind"], e["dtype"]) for e in files.values()}
    if ("onnx", "fp32") in kinds:
        for name in (n for n in files if n.endswith(".onnx")):
            verify.check_onnx(folder / name)
        logits_runners["model.onnx"] = verify.ort_logits(
            onnx_export.session(folder / "model.onnx"))
        kv_runners["model_kv.onnx"] = verify.ort_kv(onnx_export.session(folder / "model_kv.onnx"))
    if ("torchscript", "fp32") in kinds:
        logits_runners["model.ts"] = _no_grad(torchscript.load(folder / "model.ts")[0])
        kv_runners["model_kv.ts"] = _no_grad(torchscript.load(folder / "model_kv.ts")[0])
    if ("hf", "fp32") in kinds:
        from slm_export.export import hf

        hf_model = hf.load(folder)
        logits_runners["hf/model.safetensors"] = _no_grad(lambda ids: hf_model(ids).logits)
    results = verify.verify_logits(model, logits_runners)
    results.update(verify.verify_kv(model, kv_runners) if kv_runners else {})
    for name, r in results.items():
        print(f"verified {name} on {r['shapes']} shapes: max |diff| vs eager "
              f"{r['max_abs_diff']:.2g}")
    if kv_runners:
        results["greedy"] = verify.verify_greedy(model, kv_runners)
        print(f"greedy {results['greedy']['tokens']}-token continuations identical: eager, "
              + ", ".join(sorted(kv_runners)))
    for dtype in variants:
        results[dtype] = _verify_variant(model, folder, dtype)
    return results


def _no_grad(fn):
    def run(*args):
        with torch.no_grad():
            return fn(*args)
    return run


def _verify_variant(model, folder: Path, dtype: str) -> dict:
    providers = _ort_providers() if dtype == "fp16" else None
    try:
        run = verify.ort_logits(onnx_export.session(folder / f"model.{dtype}.onnx", providers))
        run_kv = verify.ort_kv(onnx_export.session(folder / f"model_kv.{dtype}.onnx", providers))
        result = verify.verify_variant(model, dtype, run, run_kv, verify.sample_tokens(model))
    except SlmError:
        raise
    except Exception as e:  # e.g. ORT without fp16 kernels for an op on this device
        if dtype != "fp16":
            raise
        reason = first_line(e)
        print(f"fp16 check skipped: ONNX Runtime cannot run it here ({reason})")
        return {"dtype": dtype, "skipped": reason}
    result["providers"] = providers or ["CPUExecutionProvider"]
    print(f"{dtype}: validation loss {result['val_loss_fp32']:.4f} -> {result['val_loss']:.4f} "
          f"(delta {result['val_loss_delta']:+.4f}), top-1 agreement "
          f"{result['top1_agreement']:.1%} (KV {result['kv_top1_agreement']:.1%})")
    return result


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    if args.checkpoint is None and not checkpoint.is_file():
        raise SlmError(f"no checkpoint at the default {checkpoint}: train first "
                       "(python train.py) or pass --checkpoint DIR/best.pt")
    model, ckpt = load_model(checkpoint)
    out = _resolve_out(args, checkpoint)
    formats = FORMATS[args.format]
    variants = [v for v in (args.quantize, "fp16" if args.dtype == "fp16" else None) if v]

    _recover_killed_publish(out)
    remove_stale_temps(out)  # a staging folder left by an export that was killed
    staging = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        kinds: dict[str, tuple[str, str]] = {}
        if "onnx" in formats:
            kinds.update({n: (k, "fp32") for n, k in
                          onnx_export.export(model, ckpt, staging, args.opset).items()})
            for dtype in variants:
                kinds.update({n: (k, dtype) for n, k in
                              onnx_export.export_variant(staging, ckpt, dtype).items()})
        if "torchscript" in formats:
            kinds.update({n: (k, "fp32") for n, k in
                          torchscript.export(model, ckpt, staging).items()})
        if "hf" in formats:
            from slm_export.export import hf
            kinds.update({n: (k, "fp32") for n, k in hf.export(model, staging).items()})
        files = {n: file_entry(staging, n, k, d) for n, (k, d) in kinds.items()}
        results = _verify(model, staging, files, variants) if args.verify else {}
        extra = {"verification": results or None}
        if "int8" in results:
            extra["int8_val_loss_delta"] = results["int8"]["val_loss_delta"]
        write_manifest(staging, model_config=ckpt["model_config"], files=files,
                       tokenizer=ckpt.get("tokenizer", "gpt2"), step=ckpt.get("step", 0),
                       val_loss=ckpt.get("val_loss"), source_checkpoint=str(checkpoint),
                       opset=args.opset if "onnx" in formats else None, **extra)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name, entry in sorted(files.items()):
        print(f"wrote {out / name} ({entry['bytes'] / 1e6:.1f} MB, {entry['kind']} "
              f"{entry['dtype']})")
    print(f"wrote {out / MANIFEST}" + ("" if args.verify else " (not verified: --no-verify)"))
    return 0
