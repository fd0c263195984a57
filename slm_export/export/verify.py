"""Verification of a (staged) export folder against eager PyTorch on the same weights.

- Full-sequence files (``model.onnx``, ``model.ts``, ``hf/``) are opened with the artifacts
  loaders and compared logit for logit with the all-position forward on a grid of shapes;
  ``hf/``'s tokenizer, opened by ``AutoTokenizer``, must give our ids on held-out stories.
- ``onnx/``'s configs must describe the cache graph beside them (names, sizes), and its
  tokenizer, opened by ``tokenizers``, must give our ids (``onnx_folder.verify``).
- Cache files are opened the way the runtime serves them (``runtime.load_backend`` on the
  folder) and driven through the Backend contract (``prefill`` / ``decode``) beside the
  eager backend, then through the one generation loop (``runtime.generate``): what ships is
  exactly what was verified, by the code that will run it.
- Reduced-precision variants (int8, fp16) are measured on held-out text (loss delta, top-1
  agreement, greedy continuations) and held to a ``QualityGate``.
A failed check raises ``SlmError`` naming the file and the diverging shape.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch
from torch.nn import functional as F

from slm_export.artifacts.loaders import load_torchscript, ort_session
from slm_export.artifacts.manifest import Manifest
from slm_export.errors import SlmError, first_line
from slm_export.export import onnx_folder
from slm_export.export.signatures import LogitsModule
from slm_export.runtime import GREEDY, Backend, backend_for_model, generate, load_backend

TOLERANCE = 1e-4  # max |logit difference| for fp32 files
BATCHES = (1, 3)
LENGTHS = (1, 7, 64, 128)
KV_CASES = ((0, 1), (0, 7), (1, 1), (31, 7), (64, 16), (100, 28), (127, 1))  # (past, new)
GENERATION_TOKENS = 160  # greedy tokens per row: crosses the 128-token window (a rebase)

LogitsRunner = Callable[[torch.Tensor], torch.Tensor]


def check_onnx(path: Path) -> None:
    """onnx.checker on the path (so external data, if any, is found beside it)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise SlmError(f"{path.name} fails onnx.checker ({first_line(e)})") from None


def _diff(name: str, what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    got, want = got.float().cpu(), want.float().cpu()
    if got.shape != want.shape:
        raise SlmError(f"{name}: {what}: shape {tuple(got.shape)}, eager gives {tuple(want.shape)}")
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    if not diff <= tol:  # also catches NaN
        raise SlmError(f"{name}: {what}: max |diff| vs eager {diff:.3g} > {tol:g}")
    return diff


# -- full-sequence files ----------------------------------------------------------------------

def logits_runner(manifest: Manifest, kind: str, dtype: str = "fp32") -> LogitsRunner:
    """input_ids (B, T) -> logits (B, T, V) through the file of ``kind``, as loaded for use."""
    path = manifest.file(kind, dtype)
    if kind == "onnx":
        session = ort_session(path)
        return lambda ids: torch.from_numpy(
            session.run(["logits"], {"input_ids": ids.contiguous().numpy()})[0])
    if kind == "torchscript":
        module, _ = load_torchscript(path)
        return torch.no_grad()(module)
    from slm_export.export import hf

    model = hf.load(manifest.folder)
    return torch.no_grad()(lambda ids: model(ids).logits)


def compare_logits(model, runners: dict[str, LogitsRunner], batches=BATCHES, lengths=LENGTHS,
                   tol: float = TOLERANCE, seed: int = 0) -> dict[str, dict]:
    """All-position logits on every (batch, length), each runner against eager.

    -> {runner name: {"max_abs_diff", "shapes"}}.
    """
    g = torch.Generator().manual_seed(seed)
    eager, worst = LogitsModule(model), dict.fromkeys(runners, 0.0)
    lengths = sorted({min(T, model.config.block_size) for T in lengths})  # a shorter context
    for B in batches:
        for T in lengths:
            ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
            with torch.no_grad():
                want = eager(ids)
            for name, run in runners.items():
                diff = _diff(name, f"input_ids [{B}, {T}]", run(ids), want, tol)
                worst[name] = max(worst[name], diff)
    return {name: {"max_abs_diff": w, "shapes": len(batches) * len(lengths)}
            for name, w in worst.items()}


# -- cache files, through the runtime ---------------------------------------------------------

def _contract_cases(config, batches, cases, g):
    """(description, prefix ids, prefix mask or None, new ids or None) for each check."""
    V, W = config.vocab_size, config.block_size
    for B in batches:
        for P, T in [(P, T) for P, T in cases if P + T <= W] or [(0, 1)]:
            if P == 0:
                yield f"input_ids [{B}, {T}]", torch.randint(0, V, (B, T), generator=g), None, None
            else:
                yield (f"input_ids [{B}, {T}] after past_sequence {P}",
                       torch.randint(0, V, (B, P), generator=g), None,
                       torch.randint(0, V, (B, T), generator=g))
    n = min(9, W)  # left padding: rows with 0, 3 and 6 pad tokens before a 9-token prompt
    mask = torch.ones(3, n, dtype=torch.long)
    mask[1, :n // 3] = 0
    mask[2, :2 * n // 3] = 0
    yield (f"left-padded input_ids [3, {n}] then one token",
           torch.randint(0, V, (3, n), generator=g), mask, torch.randint(0, V, (3, 1), generator=g))


@torch.inference_mode()
def compare_backend(reference: Backend, backend: Backend, label: str, batches=BATCHES,
                    cases=KV_CASES, tol: float = TOLERANCE, seed: int = 0) -> dict:
    """``backend`` against ``reference`` through prefill and decode on every case.

    -> {"max_abs_diff", "shapes"}.
    """
    g = torch.Generator().manual_seed(seed)
    worst, n = 0.0, 0
    for what, prefix, mask, new in _contract_cases(reference.config, batches, cases, g):
        want, s_want = reference.prefill(prefix.to(reference.device), _to(mask, reference))
        have, s_have = backend.prefill(prefix.to(backend.device), _to(mask, backend))
        step = what if new is None else f"{what} (prefill)"
        worst = max(worst, _diff(label, step, have, want, tol))
        if new is not None:
            want, _ = reference.decode(new.to(reference.device), s_want)
            have, _ = backend.decode(new.to(backend.device), s_have)
            worst = max(worst, _diff(label, what, have, want, tol))
        n += 1
    return {"max_abs_diff": worst, "shapes": n}


def _to(mask: torch.Tensor | None, backend: Backend) -> torch.Tensor | None:
    return None if mask is None else mask.to(backend.device)


def generation_prompts(config, seed: int = 0) -> list[list[int]]:
    """Three prompts of different lengths (a left-padded batch) from held-out stories."""
    tokens = held_out_tokens(config, rows=1)[0].tolist()
    return [tokens[:n] for n in (3, 11, 24)][:max(1, config.block_size // 8)]


def compare_generation(reference: Backend, backends: dict[str, Backend],
                       prompts: Sequence[Sequence[int]],
                       new_tokens: int = GENERATION_TOKENS) -> dict:
    """The same greedy tokens from the one loop on every backend as on ``reference``, for a
    left-padded batch that crosses the window (so the overflow re-prefill runs too)."""
    kw = dict(max_new_tokens=new_tokens, sampling=GREEDY, stop_id=None)
    want = generate(reference, prompts, **kw).tokens
    for name, backend in backends.items():
        got = generate(backend, prompts, **kw).tokens
        if got != want:
            row, col = next((r, c) for r in range(len(want)) for c in range(new_tokens)
                            if got[r][c] != want[r][c])
            raise SlmError(f"{name}: greedy continuation differs from eager at token {col} "
                           f"of row {row} ({len(prompts)} prompts, {new_tokens} new tokens)")
    return {"tokens": new_tokens, "rows": len(prompts), "backends": sorted(backends)}


# -- reduced-precision variants: quality on real text rather than an exact match --------------

@dataclass(frozen=True)
class QualityGate:
    """What a reduced-precision variant must reach against fp32 on held-out text."""

    min_top1: float = 0.0  # top-1 agreement with fp32, full-sequence and cache graphs
    max_loss_delta: float | None = None  # loss(variant) - loss(fp32), nats; None: no limit

    def check(self, label: str, result: dict) -> None:
        agree = min(result["top1_agreement"], result["kv_top1_agreement"])
        if not math.isfinite(result["loss"]):
            raise SlmError(f"{label}: loss on held-out text is {result['loss']} (broken conversion)")
        if agree < self.min_top1:
            raise SlmError(f"{label}: top-1 agreement with fp32 {agree:.2%} < {self.min_top1:.0%} "
                           f"on {result['tokens']} held-out tokens")
        if self.max_loss_delta is not None and result["loss_delta"] > self.max_loss_delta:
            raise SlmError(f"{label}: loss delta vs fp32 {result['loss_delta']:+.4f} > "
                           f"{self.max_loss_delta:g} nats on {result['tokens']} held-out tokens")


def held_out_tokens(config, rows: int = 4, start: int = 1_000_000) -> torch.Tensor:
    """(rows, block_size + 1) token ids of embedded stories (no data files needed), taken
    far beyond the story indices a training run uses."""
    from slm_export.stories import story
    from slm_export.tokenizer import EOT_ID, encode

    need, ids, i = rows * (config.block_size + 1), [], start
    while len(ids) < need:
        ids += encode(story(i)) + [EOT_ID]
        i += 1
    return torch.tensor(ids[:need]).view(rows, -1)


@torch.inference_mode()
def teacher_forced_top1(reference: Backend, backend: Backend, tokens: torch.Tensor) -> float:
    """Share of positions where ``backend``'s next-token argmax equals ``reference``'s,
    prefilling half the window and then decoding the true tokens one at a time."""
    half = tokens.size(1) // 2
    want, s_want = reference.prefill(tokens[:, :half].to(reference.device), None)
    have, s_have = backend.prefill(tokens[:, :half].to(backend.device), None)
    agree = []
    for t in range(half, tokens.size(1)):
        agree.append(have.argmax(-1).cpu() == want.argmax(-1).cpu())
        want, s_want = reference.decode(tokens[:, t].to(reference.device), s_want)
        have, s_have = backend.decode(tokens[:, t].to(backend.device), s_have)
    return torch.stack(agree).float().mean().item()


def measure_variant(model, run: LogitsRunner, reference: Backend, backend: Backend,
                    tokens: torch.Tensor) -> dict:
    """Loss and top-1 agreement with fp32 of a variant's full-sequence and cache files."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        ref = LogitsModule(model)(x)
    logits = run(x).float()
    ref_loss = F.cross_entropy(ref.flatten(0, 1), y.flatten()).item()
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    return {
        "loss_fp32": ref_loss, "loss": loss, "loss_delta": loss - ref_loss,
        "top1_agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "kv_top1_agreement": teacher_forced_top1(reference, backend, x),
        "tokens": int(y.numel()),
    }


# -- a whole folder -----------------------------------------------------------------------------

FULL_SEQUENCE_KINDS = ("onnx", "torchscript", "hf")
SERVED_KINDS = {"onnx_kv": "ort", "torchscript_kv": "torchscript", "aoti_kv": "aoti"}  # kind -> backend


def verify_folder(model, folder: Path, variants: Sequence[str], gates: dict[str, QualityGate],
                  device: torch.device | str = "cpu", report=None) -> dict:
    """Every check for the files ``folder``'s manifest lists; -> results for the manifest.

    ``model`` is the eager fp32 GPT (on the CPU) the files were exported from; the served
    files run on ``device``. Raises ``SlmError``.
    """
    report = report or (lambda line: None)
    manifest = Manifest.read(folder)
    for name, entry in manifest.files.items():
        if entry["kind"] in ("onnx", "onnx_kv"):
            check_onnx(folder / name)
    runners = {manifest.file(kind).relative_to(folder).as_posix(): logits_runner(manifest, kind)
               for kind in FULL_SEQUENCE_KINDS if manifest.has(kind)}
    results = compare_logits(model, runners)
    device = torch.device(device)
    eager = backend_for_model("eager", model if device.type == "cpu" else copy.deepcopy(model).to(device))
    served = {}
    for kind, name in SERVED_KINDS.items():
        if manifest.has(kind):
            served[name] = load_backend(name, folder, device)
            label = manifest.file(kind).relative_to(folder).as_posix()
            results[label] = compare_backend(eager, served[name], name)
    for name, r in results.items():
        report(f"verified {name} on {r['shapes']} shapes: max |diff| vs eager {r['max_abs_diff']:.2g}")
    if manifest.has("hf"):
        from slm_export.export import hf

        results["hf/tokenizer.json"] = r = hf.verify_tokenizer(folder)
        report(f"verified hf/tokenizer.json: AutoTokenizer gives our ids on {r['tokens']} tokens "
               f"of {r['texts']} texts and decodes them back")
    if manifest.has(onnx_folder.KIND):
        results[f"{onnx_folder.FOLDER}/"] = r = onnx_folder.verify(manifest)
        report(f"verified {onnx_folder.FOLDER}/: {onnx_folder.GENAI_CONFIG} and config.json match "
               f"the cache graph's {r['layers']} layers; tokenizer.json gives our ids on "
               f"{r['tokens']} tokens")
    if served:
        results["generation"] = compare_generation(eager, served, generation_prompts(model.config))
        report(f"greedy {GENERATION_TOKENS}-token continuations of a padded batch identical: "
               f"eager, {', '.join(sorted(served))}")
    for dtype in variants:
        results[dtype] = _verify_variant(model, manifest, dtype, eager, gates[dtype])
        r = results[dtype]
        report(f"{dtype}: held-out loss {r['loss_fp32']:.4f} -> {r['loss']:.4f} "
               f"(delta {r['loss_delta']:+.4f}), top-1 agreement {r['top1_agreement']:.1%} "
               f"(cache graph {r['kv_top1_agreement']:.1%})")
    return results


def _verify_variant(model, manifest: Manifest, dtype: str, eager: Backend,
                    gate: QualityGate) -> dict:
    backend = load_backend("ort", manifest.folder, eager.device, variant=dtype)
    run = logits_runner(manifest, "onnx", dtype)
    measured = measure_variant(model, run, eager, backend, held_out_tokens(model.config))
    result = {"dtype": dtype, **measured, "providers": backend.session.get_providers(),
              "gate": asdict(gate)}
    gate.check(f"{dtype} variant", result)
    return result
