"""Parity checks of exported files against eager PyTorch.

Every runner here takes and returns torch tensors on the CPU, so one comparison serves
TorchScript and ONNX Runtime alike:
- logits runner: input_ids (B, T) -> logits (B, T, V)
- KV runner: (input_ids, past_key_values, attention_mask) -> (logits (B, V), present)
A failed check raises ``SlmError`` naming the file and the diverging shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import onnx
import torch
from torch.nn import functional as F

from slm_export.errors import SlmError, first_line
from slm_export.export import KVModule, LogitsModule

TOLERANCE = 1e-4  # max |logit difference| for fp32 files
BATCHES = (1, 3)
LENGTHS = (1, 7, 64, 128)
KV_CASES = ((0, 1), (0, 7), (1, 1), (31, 7), (64, 16), (100, 28), (127, 1))  # (past, new)
GREEDY_TOKENS = 32
FP16_MIN_AGREEMENT = 0.99

LogitsRunner = Callable[[torch.Tensor], torch.Tensor]
KVRunner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def check_onnx(path: Path) -> None:
    """onnx.checker on the path (so external data, if any, is found beside it)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise SlmError(f"{path.name} fails onnx.checker ({first_line(e)})") \
            from None


def ort_logits(session) -> LogitsRunner:
    def run(ids):
        (logits,) = session.run(["logits"], {"input_ids": ids.contiguous().numpy()})
        return torch.from_numpy(logits)
    return run


def ort_kv(session) -> KVRunner:
    def run(ids, past, mask):
        feeds = {"input_ids": ids.contiguous().numpy(),
                 "past_key_values": past.contiguous().numpy(),
                 "attention_mask": mask.contiguous().numpy()}
        logits, present = session.run(["logits", "present_key_values"], feeds)
        return torch.from_numpy(logits), torch.from_numpy(present)
    return run


def _diff(name: str, what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    if got.shape != want.shape:
        raise SlmError(f"{name}: {what}: shape {tuple(got.shape)}, eager gives {tuple(want.shape)}")
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    if not diff <= tol:  # also catches NaN
        raise SlmError(f"{name}: {what}: max |diff| vs eager {diff:.3g} > {tol:g}")
    return diff


def verify_logits(model, runners: dict[str, LogitsRunner], batches=BATCHES, lengths=LENGTHS,
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
                diff = _diff(name, f"input_ids [{B}, {T}]", run(ids).float(), want, tol)
                worst[name] = max(worst[name], diff)
    return {name: {"max_abs_diff": w, "shapes": len(batches) * len(lengths)}
            for name, w in worst.items()}


def _past(model, B: int, P: int, g: torch.Generator) -> torch.Tensor:
    """A real cache of P positions (from eager), so the check exercises meaningful values."""
    if P == 0:
        return model.empty_kv(B)
    prefix = torch.randint(0, model.config.vocab_size, (B, P), generator=g)
    with torch.no_grad():
        return model.forward_kv(prefix, model.empty_kv(B))[1]


def _kv_inputs(model, batches, cases, g):
    """(description, input_ids, past, attention_mask) for every check of the cache path."""
    block = model.config.block_size
    cases = [(P, T) for P, T in cases if P + T <= block] or [(0, 1)]
    for B in batches:
        for P, T in cases:
            past = _past(model, B, P, g)
            ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
            yield f"input_ids [{B}, {T}] after past_sequence {P}", ids, past, \
                torch.ones(B, P + T, dtype=torch.long)
    # Left padding: rows with 0, 3 and 6 pad tokens in front of a 9-token prompt.
    n = min(9, block)
    ids = torch.randint(0, model.config.vocab_size, (3, n), generator=g)
    mask = torch.ones(3, n, dtype=torch.long)
    mask[1, :n // 3] = 0
    mask[2, :2 * n // 3] = 0
    yield f"left-padded input_ids [3, {n}]", ids, model.empty_kv(3), mask


def verify_kv(model, runners: dict[str, KVRunner], batches=BATCHES, cases=KV_CASES,
              tol: float = TOLERANCE, seed: int = 0) -> dict[str, dict]:
    """Cache path on (past, new) lengths plus a left-padded batch, each runner against eager.

    -> {runner name: {"max_abs_diff", "shapes"}}.
    """
    g = torch.Generator().manual_seed(seed)
    eager, worst, n = KVModule(model), dict.fromkeys(runners, 0.0), 0
    for what, ids, past, mask in _kv_inputs(model, batches, cases, g):
        with torch.no_grad():
            want_logits, want_present = eager(ids, past, mask)
        for name, run in runners.items():
            logits, present = run(ids, past, mask)
            worst[name] = max(worst[name],
                              _diff(name, what + " (logits)", logits, want_logits, tol),
                              _diff(name, what + " (present)", present, want_present, tol))
        n += 1
    return {name: {"max_abs_diff": w, "shapes": n} for name, w in worst.items()}


def greedy(run: KVRunner, model, prompt: torch.Tensor, steps: int = GREEDY_TOKENS) -> list:
    """Greedy continuation through a KV runner: prefill the prompt, then one token a step."""
    B = prompt.size(0)
    past, ids, out = model.empty_kv(B), prompt, []
    mask = torch.ones(B, prompt.size(1), dtype=torch.long)
    for _ in range(steps):
        logits, past = run(ids, past, mask)
        ids = logits.argmax(-1, keepdim=True)  # (B, 1)
        out.append(ids)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
    return torch.cat(out, dim=1).tolist()


def verify_greedy(model, runners: dict[str, KVRunner], steps: int = GREEDY_TOKENS,
                  seed: int = 0) -> dict:
    """The same greedy tokens from eager ``forward_kv`` and every exported KV runner."""
    g = torch.Generator().manual_seed(seed)
    block = model.config.block_size
    prompt = torch.randint(0, model.config.vocab_size, (2, min(8, block)), generator=g)
    steps = min(steps, block - prompt.size(1) + 1)  # the last token is sampled, not fed
    eager_runner = KVModule(model)

    def eager(ids, past, mask):
        with torch.no_grad():
            return eager_runner(ids, past, mask)

    want = greedy(eager, model, prompt, steps)
    for name, run in runners.items():
        got = greedy(run, model, prompt, steps)
        if got != want:
            row, col = next((r, c) for r in range(len(want)) for c in range(steps)
                            if got[r][c] != want[r][c])
            raise SlmError(f"{name}: greedy continuation differs from eager at token {col} "
                           f"of row {row} (prompt {list(prompt.shape)})")
    return {"tokens": steps, "identical": True, "runners": sorted(runners)}


# -- lower-precision variants: quality on real text rather than an exact match ------------

def sample_tokens(model, rows: int = 4, seed_start: int = 1_000_000) -> torch.Tensor:
    """(rows, block_size + 1) token ids of embedded stories (no data files needed), taken
    far beyond the indices a training run uses."""
    from slm_export.stories import story
    from slm_export.tokenizer import EOT_ID, encode

    need, ids, i = rows * (model.config.block_size + 1), [], seed_start
    while len(ids) < need:
        ids += encode(story(i)) + [EOT_ID]
        i += 1
    return torch.tensor(ids[:need]).view(rows, -1)


def _loss_and_top1(logits: torch.Tensor, targets: torch.Tensor, ref: torch.Tensor):
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).item()
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return loss, agree


def verify_variant(model, dtype: str, run: LogitsRunner, run_kv: KVRunner,
                   tokens: torch.Tensor) -> dict:
    """Validation loss, and top-1 agreement with eager fp32, of an int8 / fp16 variant.

    The KV graph is checked teacher-forced: prefill half the window, then decode the rest
    one token at a time, comparing each step's top-1 with eager's full forward.
    """
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        ref = LogitsModule(model)(x)
    ref_loss, _ = _loss_and_top1(ref, y, ref)
    loss, agree = _loss_and_top1(run(x), y, ref)
    half = x.size(1) // 2
    B = x.size(0)
    past, steps = model.empty_kv(B), []
    mask = torch.ones(B, half, dtype=torch.long)
    logits, past = run_kv(x[:, :half], past, mask)
    steps.append(logits)
    for t in range(half, x.size(1)):
        mask = torch.ones(B, t + 1, dtype=torch.long)
        logits, past = run_kv(x[:, t:t + 1], past, mask)
        steps.append(logits)
    kv_logits = torch.stack(steps[:-1], dim=1)  # predictions for positions half-1 .. T-2
    kv_agree = (kv_logits.argmax(-1) == ref[:, half - 1:-1].argmax(-1)).float().mean().item()
    result = {
        "dtype": dtype,
        "val_loss_fp32": ref_loss,
        "val_loss": loss,
        "val_loss_delta": loss - ref_loss,
        "top1_agreement": agree,
        "kv_top1_agreement": kv_agree,
        "tokens": int(y.numel()),
    }
    if not math.isfinite(loss):
        raise SlmError(f"{dtype} variant: validation loss is {loss} (broken conversion)")
    if dtype == "fp16" and min(agree, kv_agree) < FP16_MIN_AGREEMENT:
        raise SlmError(f"fp16 variant: top-1 agreement with fp32 {min(agree, kv_agree):.2%} "
                       f"< {FP16_MIN_AGREEMENT:.0%} on {tuple(x.shape)} tokens")
    return result
