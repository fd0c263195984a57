"""python export.py: a checkpoint -> TorchScript / ONNX / AOTInductor (/ HF) files, verified, manifest."""

from __future__ import annotations

from pathlib import Path

from slm_export.cli.common import ArgumentParser, entry_point, non_negative_float, unit_interval
from slm_export.errors import SlmError
from slm_export.registry import REDUCED

DEFAULT_CHECKPOINT = Path("artifacts/runs/latest/best.pt")
FORMATS = {"onnx": ("onnx",), "torchscript": ("torchscript",), "aoti": ("aoti",),
           "executorch": ("executorch",), "hf": ("hf",),
           # all: aoti where a C++ compiler is found, executorch where the edge extra is installed
           "all": ("onnx", "torchscript", "aoti", "executorch")}


def build_parser() -> ArgumentParser:
    from slm_export.export.onnx import DEFAULT_OPSET

    p = ArgumentParser(prog="export.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"a weights checkpoint (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--format", choices=list(FORMATS), default="all",
                   help="what to write (all = onnx + torchscript + aoti + executorch: aoti where a "
                        "C++ compiler is found, executorch where the edge extra is installed)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="export folder (default: <checkpoint folder>/export)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="fp16 also writes model.fp16.onnx / onnx/model.fp16.onnx (fp32 logits)")
    p.add_argument("--quantize", choices=["int8", "int4", "mixed", "auto"], action="append", default=[],
                   help="also write model.<q>.onnx / onnx/model.<q>.onnx: int8 = dynamic "
                        "quantization (weights and activations), int4 = 4-bit weights "
                        "(MatMulNBits), mixed = 4-bit blocks with an 8-bit embedding / lm_head, "
                        "auto = the smallest of int4 / mixed / int8 that passes the 8-bit gate "
                        "(each candidate's measurements in the manifest); int8 also writes "
                        "model_kv.int8.pte with executorch; repeatable")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N: where the files are verified, and what the aoti "
                        "package is compiled for (it runs on that device type only; default cpu)")
    p.add_argument("--verify", action="store_true", default=True,
                   help="check every file against eager PyTorch (default)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="write the files unchecked (the manifest records verified: false)")
    g = p.add_argument_group("quality gates of the reduced variants against fp32 on held-out "
                             "text (default: each variant's own, in the manifest; these set it "
                             "for every variant)")
    g.add_argument("--min-top1", type=unit_interval, default=None,
                   help="least top-1 agreement, full-sequence and cache graphs")
    g.add_argument("--max-loss-delta", type=non_negative_float, default=None,
                   help="largest |loss difference| in nats")
    g.add_argument("--max-kl", type=non_negative_float, default=None,
                   help="largest mean KL divergence per token in nats")
    g.add_argument("--min-greedy-agreement", type=unit_interval, default=None,
                   help="least share of the variant's greedy tokens that fp32 would pick too")
    g.add_argument("--max-logit-error", type=non_negative_float, default=None,
                   help="largest |logit difference| in units of the fp32 logits' std")
    g.add_argument("--allow-unverified", action="append", choices=REDUCED, default=[],
                   help="publish this variant unchecked if its check cannot run here "
                        "(recorded in the manifest; a check that runs and fails still fails)")
    return p


@entry_point
def main(argv=None) -> int:
    from slm_export.devices import resolve_device
    from slm_export.export import build, check_request, gates_with

    args = build_parser().parse_args(argv)
    formats = FORMATS[args.format]
    device = resolve_device(args.device)
    if args.format == "all":
        formats = _available(FORMATS["all"], device)
    variants = [*dict.fromkeys(args.quantize), *(["fp16"] if args.dtype == "fp16" else [])]
    check_request(formats, variants, args.opset, args.allow_unverified, device)
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    if args.checkpoint is None and not checkpoint.is_file():
        raise SlmError(f"no checkpoint at the default {checkpoint}: train first "
                       "(python train.py) or pass --checkpoint DIR/best.pt")
    gates = gates_with(min_top1=args.min_top1, max_loss_delta=args.max_loss_delta,
                       max_kl=args.max_kl, min_greedy_agreement=args.min_greedy_agreement,
                       max_logit_error=args.max_logit_error)
    build(checkpoint, args.out_dir, formats=formats, variants=variants, opset=args.opset,
          verify=args.verify, gates=gates, allow_unverified=args.allow_unverified,
          device=device, report=lambda line: print(line, flush=True))
    return 0


def _available(formats: tuple[str, ...], device=None) -> tuple[str, ...]:
    """``formats`` without aoti where it cannot be compiled here for ``device`` (a C++
    compiler; for CUDA, the CUDA toolkit too) and without executorch where its package is
    missing, saying so in one line."""
    from slm_export.export import executorch
    from slm_export.export.aoti import compiler_problem, cuda_toolkit_problem
    from slm_export.runtime.executorch import problem as executorch_problem

    problem = compiler_problem()
    if problem is None and device is not None and device.type == "cuda":
        problem = cuda_toolkit_problem()
    problems = {"aoti": (problem, "model_kv.pt2"), "executorch": (executorch_problem(), executorch.FILE)}
    for name, (reason, file) in problems.items():
        if reason is not None and name in formats:
            print(f"skipping {name} ({file}): {reason}", flush=True)
    return tuple(f for f in formats if problems.get(f, (None,))[0] is None)
