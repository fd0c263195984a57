"""``slm-eval`` (``python -m slm_export.evaluate``): what each file of an export costs in
quality, on your own held-out text, through the runtime that would serve it.

For every file the export holds (each backend's file and variant: ONNX fp32 / fp16 / int8 /
int4 / mixed, TorchScript, AOTInductor, ExecuTorch; and GGUF files (``--gguf``, through
llama-cpp-python) and the CTranslate2 conversion of ``hf/`` where those packages are
installed), on windows of ``block_size + 1`` tokens of the text: perplexity, next-token
accuracy, and top-1 agreement and KL divergence against the fp32 checkpoint (eager). The
scores are ``runtime.parity.scores``, what the export's quality gates measure with, so a
gate and slm-eval cannot disagree about how a file is scored. One rich table, and JSON
with ``--json FILE``.

    slm-eval --model artifacts/runs/latest --dataset my_stories.txt --json eval.json
    slm-eval --model artifacts/runs/latest --data artifacts/data/stories-10000-s42 --rows 64
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from slm_export import registry
from slm_export.cli.common import ArgumentParser, device, entry_point, positive_int
from slm_export.errors import SlmError, first_line


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="slm-eval", description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--model", type=Path, required=True, help="a run folder (best.pt + export/)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="text to evaluate on: any train.py --dataset source "
                                       "(a .txt/.jsonl/.parquet file or folder, a hub name, stories)")
    src.add_argument("--data", type=Path, help="a prepared data folder (holds meta.json)")
    p.add_argument("--split", choices=("val", "train"), default="val", help="which split (default val)")
    p.add_argument("--text-field", default="text", help="column of --dataset rows holding the text")
    p.add_argument("--data-root", type=Path, default=Path("artifacts/data"),
                   help="where --dataset is tokenized (default artifacts/data)")
    p.add_argument("--rows", type=positive_int, default=32,
                   help="windows of block_size + 1 tokens evaluated (default 32)")
    p.add_argument("--backends", default=None,
                   help="comma-separated subset of the file rows, e.g. ort,executorch (default all)")
    p.add_argument("--gguf", type=Path, action="append", default=[],
                   help="a GGUF file of the same weights to score too (llama-cpp-python)")
    p.add_argument("--device", type=device, default="cpu", help="where the files run (default cpu)")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    return p


def windows(args, block_size: int) -> torch.Tensor:
    """(rows, block_size + 1) token windows of the split, consecutive from its start."""
    from slm_export.data import Source, TokenData, prepare

    if args.data is not None:
        data = TokenData(args.data)
    else:
        data = prepare(Source.of(dataset=args.dataset, text_field=args.text_field), args.data_root)
    tokens = data.tokens(args.split)
    width = block_size + 1
    rows = min(args.rows, len(tokens) // width)
    if rows == 0:
        raise SlmError(f"the {args.split} split has {len(tokens)} tokens: fewer than one window of {width}")
    return torch.from_numpy(tokens[: rows * width].astype("int64")).view(rows, width)


def files(run: Path, wanted: set | None, on) -> list[tuple[str, str, str, object]]:
    """(label, backend, variant, a callable ids (B, T) -> logits (B, T, V)) per file here."""
    from slm_export.artifacts.manifest import Manifest
    from slm_export.runtime import load_backend, parity, resolve_model_path

    export = resolve_model_path("ort", run)
    manifest = Manifest.read(export, verify_hashes=False)
    found = []
    for spec in registry.BACKENDS.values():
        if spec.from_checkpoint or (wanted is not None and spec.name not in wanted):
            continue
        for variant in spec.variants:
            if manifest.has(spec.loads, variant):
                where = on if spec.serves(variant, on.type) else torch.device("cpu")
                backend = load_backend(spec.name, export, where, variant)
                label = manifest.file(spec.loads, variant, verify_hash=False).relative_to(export).as_posix()
                found.append((label, spec.name, variant, lambda ids, b=backend: parity.all_logits(b, ids)))
    if manifest.has("hf") and (wanted is None or "ctranslate2" in wanted):
        found += _ctranslate2(export)
    return found


def _ctranslate2(export: Path) -> list:
    """CTranslate2's conversion of hf/ (its own converter), where ctranslate2 is installed."""
    try:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        return []
    out = export.parent / "ctranslate2"
    if not (out / "model.bin").is_file():
        TransformersConverter(str(export / "hf")).convert(str(out), force=True)
    generator = ctranslate2.Generator(str(out), device="cpu")
    vocab = {i: piece for piece, i in json.loads((export / "hf" / "vocab.json").read_text()).items()}

    def logits(ids: torch.Tensor) -> torch.Tensor:
        pieces = [[vocab[int(t)] for t in row] for row in ids]
        return torch.from_numpy(np.asarray(generator.forward_batch(pieces))).float()

    return [("ctranslate2 (from hf/)", "ctranslate2", "float32", logits)]


def _gguf(path: Path) -> tuple:
    try:
        import llama_cpp
    except ImportError:
        raise SlmError(f"--gguf {path}: llama-cpp-python is not installed") from None
    if not path.is_file():
        raise SlmError(f"--gguf {path}: no such file")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)

    def logits(ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in ids.tolist():
            llm.reset()
            llm.eval(row)
            rows.append(torch.tensor(llm.scores[: len(row)]))
        return torch.stack(rows).float()

    return (f"{path.name} (llama.cpp)", "llama.cpp", path.stem.rsplit(".", 1)[-1], logits)


def evaluate(run: Path, tokens: torch.Tensor, entries: list, on) -> list[dict]:
    """One row per file: ``parity.scores`` against eager fp32, perplexity, seconds."""
    from slm_export.runtime import load_backend, parity

    x, y = tokens[:, :-1], tokens[:, 1:]
    reference = parity.all_logits(load_backend("eager", run, on), x)
    rows = [{"file": "best.pt (fp32 checkpoint)", "backend": "eager", "variant": "fp32",
             **parity.scores(reference, reference, y), "seconds": 0.0}]
    for label, backend, variant, logits_of in entries:
        start = time.perf_counter()
        try:
            have = logits_of(x)
            row = {**parity.scores(reference, have, y), "error": None}
        except Exception as e:  # a file that cannot run here is a row saying why
            row = {"error": f"{type(e).__name__}: {first_line(e, 120)}"}
        rows.append({"file": label, "backend": backend, "variant": variant, **row,
                     "seconds": round(time.perf_counter() - start, 2)})
    for r in rows:
        if r.get("loss") is not None:
            r["perplexity"] = math.exp(r["loss"])
    return rows


def table(rows: list[dict], tokens: int):
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"slm-eval: {tokens} held-out tokens, against the fp32 checkpoint")
    for name in ("file", "backend", "variant", "perplexity", "next-token acc", "top-1 vs fp32",
                 "KL vs fp32", "seconds"):
        t.add_column(name)
    for r in rows:
        if r.get("error"):
            t.add_row(escape(r["file"]), r["backend"], r["variant"], escape(r["error"]), "", "", "", "")
            continue
        t.add_row(escape(r["file"]), r["backend"], r["variant"], f"{r['perplexity']:.3f}",
                  f"{r['accuracy']:.2%}", f"{r['top1']:.2%}", f"{r['kl']:.2e}", f"{r['seconds']:.1f}")
    return t


@entry_point
def main(argv=None) -> int:
    from rich.console import Console

    from slm_export.devices import resolve_device
    from slm_export.runtime import resolve_model_path

    args = build_parser().parse_args(argv)
    on = resolve_device(args.device)
    run = resolve_model_path("eager", args.model).parent
    wanted = None if args.backends is None else {b.strip() for b in args.backends.split(",") if b.strip()}
    from slm_export.checkpoint import load

    block = load(run / "best.pt")["model_config"]["block_size"]
    tokens = windows(args, block)
    entries = files(run, wanted, on) + [_gguf(p) for p in args.gguf]
    rows = evaluate(run, tokens, entries, on)
    Console(width=160).print(table(rows, int(tokens[:, 1:].numel())))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"tokens": int(tokens[:, 1:].numel()), "split": args.split,
                                         "rows": rows}, indent=2) + "\n")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
