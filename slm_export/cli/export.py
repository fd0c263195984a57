"""python export.py: a checkpoint -> TorchScript / ONNX (/ HF) files, verified, with a manifest."""

from __future__ import annotations

from pathlib import Path

from slm_export.cli.common import ArgumentParser, entry_point
from slm_export.errors import SlmError

DEFAULT_CHECKPOINT = Path("artifacts/runs/latest/best.pt")
FORMATS = {"onnx": ("onnx",), "torchscript": ("torchscript",), "hf": ("hf",),
           "all": ("onnx", "torchscript")}


def build_parser() -> ArgumentParser:
    from slm_export.export.onnx import DEFAULT_OPSET

    p = ArgumentParser(prog="export.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"a weights checkpoint (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--format", choices=list(FORMATS), default="all",
                   help="what to write (all = onnx + torchscript)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="export folder (default: <checkpoint folder>/export)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="fp16 also writes model.fp16.onnx / onnx/model.fp16.onnx (fp32 logits)")
    p.add_argument("--quantize", choices=["int8", "int4"], action="append", default=[],
                   help="also write model.<q>.onnx / onnx/model.<q>.onnx: int8 = dynamic "
                        "quantization (weights and activations), int4 = 4-bit weights "
                        "(MatMulNBits); repeatable")
    p.add_argument("--verify", action="store_true", default=True,
                   help="check every file against eager PyTorch (default)")
    p.add_argument("--no-verify", dest="verify", action="store_false")
    return p


@entry_point
def main(argv=None) -> int:
    from slm_export.export import build, check_request

    args = build_parser().parse_args(argv)
    formats = FORMATS[args.format]
    variants = [*dict.fromkeys(args.quantize), *(["fp16"] if args.dtype == "fp16" else [])]
    check_request(formats, variants, args.opset)
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    if args.checkpoint is None and not checkpoint.is_file():
        raise SlmError(f"no checkpoint at the default {checkpoint}: train first "
                       "(python train.py) or pass --checkpoint DIR/best.pt")
    build(checkpoint, args.out_dir, formats=formats, variants=variants, opset=args.opset,
          verify=args.verify, report=lambda line: print(line, flush=True))
    return 0
