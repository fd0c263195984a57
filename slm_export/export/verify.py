"""Verification of a (staged) export folder against eager PyTorch on the same weights.

- Full-sequence files (``model.onnx``, ``model.ts``, ``hf/``) are opened with the artifacts
  loaders and compared logit for logit with the all-position forward on a grid of shapes;
  ``hf/``'s tokenizer, opened by ``AutoTokenizer``, must give our ids on held-out stories.
- ``onnx/``'s configs must describe the cache graph beside them (names, sizes), and its
  tokenizer, opened by ``tokenizers``, must give our ids (``onnx_folder.verify``).
- Cache files are opened the way the runtime serves them (``runtime.load_backend`` on the
  folder) and driven through the Backend contract beside the eager backend
  (``runtime.parity``), then through the one generation loop: what ships is exactly what
  was verified, by the code that will run it.
- Reduced-precision variants (``registry.REDUCED``: fp16, int8, int4) are measured against
  fp32 on held-out text (top-1 agreement, loss delta and KL divergence on both graphs, the
  largest logit difference, and fp32's agreement with the variant's own greedy
  continuation) and held to a ``QualityGate``; a check that cannot run is an error unless
  the caller allows that variant unverified.
- fp32 files are held to ``TOLERANCE``; on CUDA, ONNX Runtime runs with TF32 off
  (``ort.py``), so that holds there too.
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

from slm_export import registry
from slm_export.artifacts.loaders import load_torchscript, ort_session
from slm_export.artifacts.manifest import Manifest
from slm_export.errors import SlmError, first_line
from slm_export.export import onnx_folder
from slm_export.export.signatures import LogitsModule
from slm_export.runtime import Backend, backend_for_model, load_backend, parity
from slm_export.runtime.parity import Lockstep

TOLERANCE = 1e-4  # max |logit difference| for fp32 files (contract cases)
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
    """``backend`` against ``reference`` (in ``parity.Lockstep``) through prefill and forward
    on every case: every call's logits within ``tol``. -> {"max_abs_diff", "shapes"}."""
    g = torch.Generator().manual_seed(seed)
    worst, n = 0.0, 0
    for what, prefix, mask, new in _contract_cases(reference.config, batches, cases, g):
        pair = Lockstep(backend, reference)
        _, state = pair.prefill(prefix.to(backend.device), None if mask is None else mask.to(backend.device))
        if new is not None:
            pair.forward(new.to(backend.device), state)
        for step, when in zip(pair.steps, (" (prefill)" if new is not None else "", ""), strict=False):
            if not step.diff <= tol:  # also catches NaN
                raise SlmError(f"{label}: {what}{when}: max |diff| vs eager {step.diff:.3g} > {tol:g}")
            worst = max(worst, step.diff)
        n += 1
    return {"max_abs_diff": worst, "shapes": n}


def generation_prompts(config, seed: int = 0) -> list[list[int]]:
    """Three prompts of different lengths (a left-padded batch) from held-out stories."""
    tokens = held_out_tokens(config, rows=1)[0].tolist()
    return [tokens[:n] for n in (3, 11, 24)][:max(1, config.block_size // 8)]


def compare_generation(reference: Backend, backends: dict[str, Backend],
                       prompts: Sequence[Sequence[int]], new_tokens: int = GENERATION_TOKENS) -> dict:
    """Every backend's greedy continuation of a left-padded batch that crosses the window (so
    the overflow re-prefill runs too) beside ``reference`` (``parity.greedy``, checked: the
    reference's own tokens, except at a tie float noise may pick either).
    -> {"tokens", "rows", "backends", "ties": {backend: count}}."""
    ties = {name: parity.greedy(reference, backend, prompts, new_tokens).check().tie_count
            for name, backend in backends.items()}
    return {"tokens": new_tokens, "rows": len(prompts), "backends": sorted(backends), "ties": ties}


# -- reduced-precision variants: quality on real text rather than an exact match --------------

@dataclass(frozen=True)
class QualityGate:
    """What a reduced-precision variant must reach against fp32 on held-out text: thresholds
    on what ``measure_variant`` measures (None: not checked). Each is a named option
    (``export.py --min-top1 ...``) and goes into the manifest beside the measurements.
    A damaged file misses them (tests/test_export.py: a shuffled weight fails every one, a
    scaled lm_head keeps every argmax and fails the KL bound); a correct conversion of the
    trained test model clears them with room."""

    min_top1: float = 0.95  # top-1 agreement with fp32, full-sequence and cache graphs
    max_loss_delta: float | None = 0.05  # |loss - fp32 loss| in nats, either graph
    max_kl: float | None = 0.01  # mean KL(fp32 || variant) per token in nats, either graph
    min_greedy_agreement: float = 0.9  # fp32 picks the variant's greedy token (its own text)
    max_logit_error: float | None = None  # max |logit - fp32 logit| / std of the fp32 logits

    def check(self, label: str, result: dict) -> None:
        """Raise ``SlmError`` naming the first threshold ``result`` misses (NaN misses all)."""
        on = f"on {result['tokens']} held-out tokens"
        top1 = min(result["top1_agreement"], result["kv_top1_agreement"])
        delta = max(abs(result["loss_delta"]), abs(result["kv_loss_delta"]))
        kl = max(result["kl"], result["kv_kl"])
        greedy, error = result["greedy_agreement"], result["logit_error"]
        if not math.isfinite(result["loss"]):
            raise SlmError(f"{label}: loss on held-out text is {result['loss']} (broken conversion)")
        if not top1 >= self.min_top1:
            raise SlmError(f"{label}: top-1 agreement with fp32 {top1:.2%} < {self.min_top1:.0%} {on}")
        if self.max_loss_delta is not None and not delta <= self.max_loss_delta:
            raise SlmError(f"{label}: loss delta vs fp32 {delta:.4f} > {self.max_loss_delta:g} nats {on}")
        if self.max_kl is not None and not kl <= self.max_kl:
            raise SlmError(f"{label}: KL divergence from fp32 {kl:.3g} > {self.max_kl:g} nats {on}")
        if not greedy >= self.min_greedy_agreement:
            raise SlmError(f"{label}: fp32 agrees with {greedy:.2%} of its greedy tokens < "
                           f"{self.min_greedy_agreement:.0%} ({result['greedy_tokens']} tokens)")
        if self.max_logit_error is not None and not error <= self.max_logit_error:
            raise SlmError(f"{label}: max |logit difference| vs fp32 {error:.3g} x the logits' std "
                           f"> {self.max_logit_error:g} {on}")


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


def greedy_agreement(reference: Backend, backend: Backend, prompts: Sequence[Sequence[int]],
                     new_tokens: int = GENERATION_TOKENS) -> dict:
    """The variant's greedy continuation of a left-padded batch through the one loop (across
    the window), with fp32 teacher-forced along it: the share of steps where fp32 would
    have picked the same token, and how many tokens each row matched fp32's own greedy text
    (its first disagreement: up to there both continuations are the same)."""
    report = parity.greedy(reference, backend, prompts, new_tokens)
    return {"greedy_agreement": report.agreement, "greedy_tokens": report.tokens,
            "greedy_identical_tokens": [new_tokens if t is None else t for t in report.ties]}


def measure_variant(model, run: LogitsRunner, reference: Backend, backend: Backend,
                    tokens: torch.Tensor, prompts: Sequence[Sequence[int]]) -> dict:
    """A variant's full-sequence file (``run``) and cache graph (``backend``) against fp32:
    loss and top-1 agreement on held-out ``tokens`` (rows of block_size + 1), the largest
    logit difference relative to the logits' scale, and greedy continuations of ``prompts``."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        ref = LogitsModule(model)(x)
    logits = run(x).float()
    full = parity.scores(ref, logits, y)
    kv = parity.teacher_forced(reference, backend, tokens)
    return {
        "loss_fp32": full["loss_fp32"], "loss": full["loss"], "loss_delta": full["loss"] - full["loss_fp32"],
        "top1_agreement": full["top1"], "kl": full["kl"],
        "logit_error": ((logits - ref).abs().max() / ref.std()).item(),
        "kv_loss_delta": kv["loss"] - kv["loss_fp32"], "kv_top1_agreement": kv["top1"],
        "kv_kl": kv["kl"],
        "tokens": int(y.numel()),
        **greedy_agreement(reference, backend, prompts),
    }


# -- a whole folder -----------------------------------------------------------------------------

FULL_SEQUENCE_KINDS = ("onnx", "torchscript", "hf")


def verify_folder(model, folder: Path, variants: Sequence[str], gates: dict[str, QualityGate],
                  device: torch.device | str = "cpu", report=None,
                  allow_unverified: Sequence[str] = ()) -> dict:
    """Every check for the files ``folder``'s manifest lists; -> results for the manifest.

    ``model`` is the eager fp32 GPT (on the CPU) the files were exported from; the served
    files run on ``device``. Each variant is held to ``gates[variant]``; a variant in
    ``allow_unverified`` may be published unchecked when its check cannot run. Raises
    ``SlmError``.
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
    for spec in registry.BACKENDS.values():  # the files a backend serves, through it
        if not spec.from_checkpoint and manifest.has(spec.loads):
            on = device if spec.serves("fp32", device.type) else torch.device("cpu")  # CPU-only
            served[spec.name] = load_backend(spec.name, folder, on)
            label = manifest.file(spec.loads).relative_to(folder).as_posix()
            results[label] = compare_backend(eager, served[spec.name], spec.name)
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
        results["generation"] = r = compare_generation(eager, served, generation_prompts(model.config))
        ties = sum(r["ties"].values())
        report(f"greedy {GENERATION_TOKENS}-token continuations of a padded batch identical: "
               f"eager, {', '.join(sorted(served))}"
               + (f" (but {ties} tie(s) within {parity.REL_TOL:g} x the logits' std)" if ties else ""))
    for variant in variants:
        for spec in (s for s in registry.BACKENDS.values() if s.variants != ("fp32",)):
            if manifest.has(spec.loads, variant):  # the ONNX and ExecuTorch files of a variant
                key = variant if spec.name == "ort" else manifest.file(spec.loads, variant).name
                results[key] = verify_variant(model, manifest, variant, eager, gates[variant],
                                              variant in allow_unverified, report, spec.name)
    return results


def _variant_files(manifest: Manifest, backend_name: str, variant: str, device):
    """(the cache-graph backend, a full-sequence runner) of a variant: ONNX's two files, or
    ExecuTorch's one program (every position's logits through its forward)."""
    if backend_name == "ort":
        return (load_backend("ort", manifest.folder, device, variant=variant),
                logits_runner(manifest, "onnx", variant))
    backend = load_backend(backend_name, manifest.folder, "cpu", variant=variant)

    return backend, lambda ids: parity.all_logits(backend, ids)


def verify_variant(model, manifest: Manifest, variant: str, eager: Backend, gate: QualityGate,
                   allow_unverified: bool = False, report=None, backend_name: str = "ort") -> dict:
    """The ``variant``'s files (ONNX's two, or ExecuTorch's program) measured against fp32
    (``measure_variant``, on ``eager``'s device) and held to ``gate``; -> the manifest's record
    (measurements, providers, gate). A check that cannot run (the runtime cannot load or run
    a file here) raises ``SlmError`` unless ``allow_unverified``: then the record says why it
    did not run.
    """
    report = report or (lambda line: None)
    label = variant if backend_name == "ort" else f"{backend_name} {variant}"
    try:
        backend, run = _variant_files(manifest, backend_name, variant, eager.device)
        measured = measure_variant(model, run, eager, backend, held_out_tokens(model.config),
                                   generation_prompts(model.config))
    except Exception as e:  # ONNX Runtime raises its own types (Fail, NotImplemented, ...)
        reason = str(e) if isinstance(e, SlmError) else f"{type(e).__name__}: {first_line(e)}"
        if not allow_unverified:
            raise SlmError(f"{variant} variant: its quality check could not run ({reason}); "
                           f"--allow-unverified {variant} publishes it unchecked") from None
        report(f"{label}: NOT verified, its check could not run ({reason}); published as "
               f"--allow-unverified {variant} asks")
        return {"dtype": variant, "verified": False, "reason": reason, "allow_unverified": True}
    session = getattr(backend, "session", None)
    result = {"dtype": variant, "verified": True, **measured, "gate": asdict(gate),
              "providers": session.get_providers() if session else [f"{backend_name} (CPU)"]}
    gate.check(f"{label} variant", result)
    r = result
    report(f"{label}: held-out loss {r['loss_fp32']:.4f} -> {r['loss']:.4f} (delta "
           f"{r['loss_delta']:+.4f}, cache graph {r['kv_loss_delta']:+.4f}), top-1 agreement "
           f"{r['top1_agreement']:.1%} (cache graph {r['kv_top1_agreement']:.1%}), greedy "
           f"agreement {r['greedy_agreement']:.1%}, max logit error {r['logit_error']:.2g} x std: "
           f"within {gate}")
    return result
