"""Hugging Face export: a complete ``hf/`` folder that ``transformers`` (``pipeline``,
``AutoTokenizer``, ``GPT2LMHeadModel``) and the converters built on it open unchanged.

Weights: our GPT is GPT-2's architecture with nanoGPT's names, so the mapping is direct:
HF's Conv1D stores (in, out) where nn.Linear stores (out, in), hence the transposes; a model
without biases gets zero biases; the tied lm_head is saved once (``tie_word_embeddings``).
Tokenizer: ``vocab.json`` and ``merges.txt`` derived from the same SHA-256-checked ranks our
tokenizer uses (each merge recovered from the ranks by ``tokenizer.bpe_merges``) come out
byte for byte as OpenAI's GPT-2 ``encoder.json`` and ``vocab.bpe``; ``tokenizer.json`` is the
same BPE for the ``tokenizers`` library. Every export checks that ``AutoTokenizer`` gives
our ids (``verify_tokenizer``).
The hf/ folder needs the optional ``transformers`` and ``safetensors`` packages (``pip install
.[hf]``); the config and tokenizer writers (``metadata_files``, also used for onnx/) need only
``tokenizers``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from slm_export.artifacts.files import atomic_write
from slm_export.errors import SlmError
from slm_export.stories import story
from slm_export.tokenizer import EOT_ID, EOT_TOKEN, bpe_merges, encode, mergeable_ranks

FOLDER = "hf"
WEIGHTS = "model.safetensors"
# Beyond stories: what byte-level BPE gets wrong first (pre-token splits, bytes of one
# character across tokens, whitespace runs, contractions, digits).
TOKENIZER_SAMPLES = (
    "Tom's dog didn't bark; they'll say it's 'fine'... OK?! (yes) -- 100% [sure] {x: 1}",
    "café naïve über 日本語 한국어 Ελληνικά русский עברית العربية हिन्दी ไทย 🦄🐻‍❄️👩🏽‍💻",
    "3.14159 1,000,000 2024-01-02 0x1F $9.99 #42 v1.2.3 1e-5 ½ ² ①",
    "  leading\tand\t\ttabs   runs\n\n\nof  \n  lines\r\n\u00a0nbsp \u3000ideographic   ",
)
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def require() -> None:
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise SlmError(f"--format hf needs the optional packages transformers and safetensors "
                       f"({e.name} is missing): pip install 'slm-export[hf]'") from None


def hf_config(config) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": 4 * config.n_embd,
        "activation_function": "gelu",  # exact (erf) GELU, as nn.GELU()
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": EOT_ID, "eos_token_id": EOT_ID,
    }


def state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under GPT2LMHeadModel's names (lm_head omitted: tied to wte)."""
    c = model.config
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name.endswith(TRANSPOSED):
            tensor = tensor.t()
        out[name] = tensor.detach().contiguous().clone()
    if not c.bias:  # GPT-2 always has biases: zeros are the same function
        for i in range(c.n_layer):
            p = f"transformer.h.{i}."
            for key, size in (("ln_1.bias", c.n_embd), ("ln_2.bias", c.n_embd),
                              ("attn.c_attn.bias", 3 * c.n_embd), ("attn.c_proj.bias", c.n_embd),
                              ("mlp.c_fc.bias", 4 * c.n_embd), ("mlp.c_proj.bias", c.n_embd)):
                out[p + key] = torch.zeros(size)
        out["transformer.ln_f.bias"] = torch.zeros(c.n_embd)
    return out


def generation_config(config) -> dict:
    """Stop and pad on <|endoftext|>; at most the model's context in total (learned positions)."""
    return {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID,
            "max_length": config.block_size}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (vocab.json and merges.txt are text): printable
    Latin-1 bytes stand for themselves, the other 68 become chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def tokenizer_files(block_size: int) -> dict[str, bytes]:
    """vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json
    of our GPT-2 encoding, as transformers' GPT-2 tokenizer reads them. Needs ``tokenizers``."""
    return dict(_tokenizer_files(block_size))


@functools.lru_cache(maxsize=2)  # ~1 s to recover the merges; hf/ and onnx/ share the bytes
def _tokenizer_files(block_size: int) -> tuple[tuple[str, bytes], ...]:
    ranks = mergeable_ranks()
    char = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(char[b] for b in token)

    vocab = {text(token): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    vocab[EOT_TOKEN] = EOT_ID
    merges = [(text(a), text(b)) for a, b in bpe_merges(ranks)]
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN,
               "pad_token": EOT_TOKEN}
    config = {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, **special,
        "add_prefix_space": False, "add_bos_token": False, "padding_side": "left",
        "clean_up_tokenization_spaces": False,  # True would turn "a ." into "a." on decode
        "added_tokens_decoder": {str(EOT_ID): {
            "content": EOT_TOKEN, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}},
    }
    return (  # vocab.json and merges.txt byte for byte as OpenAI's encoder.json and vocab.bpe
        ("vocab.json", json.dumps(vocab).encode()),
        ("merges.txt", "\n".join(["#version: 0.2", *(f"{a} {b}" for a, b in merges)]).encode() + b"\n"),
        ("tokenizer.json", _tokenizer_json(vocab, merges)),
        ("tokenizer_config.json", to_json(config)),
        ("special_tokens_map.json", to_json(special)),
    )


def _tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]]) -> bytes:
    """The ``tokenizers`` form of the same BPE: byte-level, GPT-2's split pattern, no prefix
    space, <|endoftext|> as the one special token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    return tok.to_str().encode()


def to_json(obj) -> bytes:
    """The bytes of every JSON file written here: indented, UTF-8, a final newline."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def metadata_files(config) -> dict[str, bytes]:
    """Everything of a Hugging Face folder but the weights: config.json,
    generation_config.json and the tokenizer files (also written beside the ONNX cache graph)."""
    return {
        "config.json": to_json(hf_config(config)),
        "generation_config.json": to_json(generation_config(config)),
        **tokenizer_files(config.block_size),
    }


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Each of ``files`` (name -> bytes) into ``folder``, atomically."""
    for name, data in files.items():
        atomic_write(folder / name, lambda f, data=data: f.write(data))


def export(model: torch.nn.Module, folder: str | os.PathLike) -> dict[str, str]:
    """Write the hf/ folder (weights, model and generation config, tokenizer files), each file
    atomically; -> {file name: kind}."""
    require()
    from safetensors.torch import save

    files = {**metadata_files(model.config),
             WEIGHTS: save(state_dict(model), metadata={"format": "pt"})}
    write_files(Path(folder) / FOLDER, files)
    return {f"{FOLDER}/{name}": "hf" if name == WEIGHTS else "hf_config" for name in files}


def load(folder: str | os.PathLike):
    """GPT2LMHeadModel from an export's hf/ folder, in eval mode."""
    require()
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(Path(folder) / FOLDER)).eval()


def verify_tokenizer(folder: str | os.PathLike, texts: Sequence[str] | None = None) -> dict:
    """``AutoTokenizer`` on the hf/ folder against our encoding (``check_tokenizer``)."""
    require()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(folder) / FOLDER))
    return check_tokenizer(f"{FOLDER}/tokenizer.json: AutoTokenizer",  # verbose: stories pass 128
                           lambda text: tok.encode(text, verbose=False), tok.decode, texts)


def check_tokenizer(label: str, encode_other: Callable[[str], list[int]],
                    decode_other: Callable[[list[int]], str],
                    texts: Sequence[str] | None = None) -> dict:
    """Another library's tokenizer against our encoding: the same ids for every text (default:
    held-out stories and ``TOKENIZER_SAMPLES``) and the same text back. -> {"texts", "tokens"};
    raises ``SlmError`` starting with ``label`` at the first difference. The texts must not
    contain "<|endoftext|>" (tokenizer files read it as the special token, ``encode`` as text)."""
    if texts is None:
        texts = [story(i) for i in range(1_000_000, 1_000_008)] + list(TOKENIZER_SAMPLES)
    tokens = 0
    for text in texts:
        want, got = encode(text), list(encode_other(text))
        if got != want:
            pairs = enumerate(zip(got, want, strict=False))
            at = next((i for i, (a, b) in pairs if a != b), min(len(got), len(want)))
            raise SlmError(f"{label} ids differ from ours at token {at} of {text[:40]!r}")
        if decode_other(got) != text:
            raise SlmError(f"{label} does not decode {text[:40]!r} back")
        tokens += len(want)
    return {"texts": len(texts), "tokens": tokens}
