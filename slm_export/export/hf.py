"""Hugging Face export: ``hf/config.json`` + ``hf/model.safetensors`` for
``transformers.GPT2LMHeadModel.from_pretrained``.

Our GPT is GPT-2's architecture with nanoGPT's names, so the mapping is direct: HF's Conv1D
stores (in, out) where nn.Linear stores (out, in), hence the transposes; a model without
biases gets zero biases; the tied lm_head is saved once (``tie_word_embeddings``).
Needs the optional ``transformers`` and ``safetensors`` packages (``pip install .[hf]``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from slm_export.artifacts.files import atomic_write
from slm_export.errors import SlmError
from slm_export.tokenizer import EOT_ID

FOLDER = "hf"
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


def export(model: torch.nn.Module, folder: str | os.PathLike) -> dict[str, str]:
    """Write hf/config.json and hf/model.safetensors; -> {file name: kind}."""
    require()
    from safetensors.torch import save

    target = Path(folder) / FOLDER
    config = json.dumps(hf_config(model.config), indent=2).encode()
    weights = save(state_dict(model), metadata={"format": "pt"})
    atomic_write(target / "config.json", lambda f: f.write(config))
    atomic_write(target / "model.safetensors", lambda f: f.write(weights))
    return {f"{FOLDER}/model.safetensors": "hf", f"{FOLDER}/config.json": "hf_config"}


def load(folder: str | os.PathLike):
    """GPT2LMHeadModel from an export's hf/ folder, in eval mode."""
    require()
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(Path(folder) / FOLDER)).eval()
