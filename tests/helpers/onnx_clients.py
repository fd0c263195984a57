"""One ONNX client, greedy, on an export's onnx/ folder. Runs in the separate client
environment tests/test_interop.py builds (its onnxruntime is the CPU wheel, ours
onnxruntime-gpu); nothing of slm_export is imported here.

    python onnx_clients.py optimum|genai FOLDER OUT_DIR NEW_TOKENS PROMPT...
    python onnx_clients.py genai-ids FOLDER OUT_DIR NEW_TOKENS IDS_JSON

Writes OUT_DIR/result.json: {"prompt_ids": the client tokenizer's ids of each prompt,
"single": the new tokens of each prompt run alone, "batch": of all prompts as one padded
batch}, and OUT_DIR/<single|batch>_<row>.npy: the logits each new token was chosen from
(steps, vocab).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def optimum(folder: str, new_tokens: int):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    model = ORTModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)

    def run(prompts: list[str]):
        enc = tok(prompts, return_tensors="pt", padding=True)  # left (tokenizer_config.json)
        out = model.generate(**enc, do_sample=False, max_new_tokens=new_tokens,
                             output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, enc["input_ids"].shape[1]:]
        return new.tolist(), torch.stack(out.logits, dim=1).numpy()

    return lambda prompt: tok(prompt)["input_ids"], run


def genai(folder: str, new_tokens: int):
    import onnxruntime_genai as og

    model = og.Model(folder)
    tok = og.Tokenizer(model)
    pad = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["pad_token_id"]

    def run(prompts: list[str]):
        ids = tok.encode_batch(prompts).as_numpy()  # padded with pad_token_id (masked out)
        last = [np.flatnonzero(row != pad)[-1] for row in ids]  # each prompt's last token
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, batch_size=len(prompts),
                                  max_length=ids.shape[1] + new_tokens)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        tokens, logits = [], []
        while not gen.is_done():
            gen.generate_next_token()
            step = gen.get_output("logits")  # (rows, prompt length, vocab) first, then (rows, 1, vocab)
            at = last if not logits else [-1] * len(prompts)
            logits.append(step[np.arange(len(prompts)), at])
            tokens.append(gen.get_next_tokens())
        return np.stack(tokens, 1).tolist(), np.stack(logits, 1)

    return lambda prompt: tok.encode(prompt).tolist(), run


def genai_ids(folder: str, new_tokens: int, rows: list[list[int]], out: Path) -> None:
    """Token-id rows (one may hold eos = pad mid-text) as one batch, padded on the right with the
    pad id as genai's encode_batch does, and each alone: result.json {"batch", "single"} and
    the first step's logits of each row (first_<batch|single>_<row>.npy)."""
    import onnxruntime_genai as og

    model = og.Model(folder)
    pad = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["pad_token_id"]

    def run(batch):
        width = max(map(len, batch))
        ids = np.array([r + [pad] * (width - len(r)) for r in batch], dtype=np.int32)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, batch_size=len(batch), max_length=width + new_tokens)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        tokens, first = [], None
        while not gen.is_done():
            gen.generate_next_token()
            if first is None:
                first = gen.get_output("logits")[np.arange(len(batch)), [len(r) - 1 for r in batch]]
            tokens.append(gen.get_next_tokens())
        return np.stack(tokens, 1).tolist(), first

    result = {"batch": [], "single": []}
    result["batch"], first = run(rows)
    for r, row in enumerate(first):
        np.save(out / f"first_batch_{r}.npy", row)
    for r, row in enumerate(rows):
        tokens, first = run([row])
        result["single"].append(tokens[0])
        np.save(out / f"first_single_{r}.npy", first[0])
    (out / "result.json").write_text(json.dumps(result))


def main(client: str, folder: str, out_dir: str, new_tokens: str, *prompts: str) -> None:
    if client == "genai-ids":
        genai_ids(folder, int(new_tokens), json.loads(prompts[0]), Path(out_dir))
        return
    encode, run = {"optimum": optimum, "genai": genai}[client](folder, int(new_tokens))
    out = Path(out_dir)
    result = {"prompt_ids": [encode(p) for p in prompts], "single": []}
    for r, prompt in enumerate(prompts):
        tokens, logits = run([prompt])
        result["single"].append(tokens[0])
        np.save(out / f"single_{r}.npy", logits[0])
    result["batch"], logits = run(list(prompts))
    for r, row in enumerate(logits):
        np.save(out / f"batch_{r}.npy", row)
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
