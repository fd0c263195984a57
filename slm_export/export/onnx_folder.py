"""The ``onnx/`` folder of an export: the ONNX cache graph as ``model.onnx`` beside the files
other runtimes read, so optimum (``ORTModelForCausalLM.from_pretrained``) and
onnxruntime-genai (``onnxruntime_genai.Model``) open the folder as it is.

- ``model.onnx`` (and ``model.int8.onnx`` / ``model.fp16.onnx``): the cache graphs of
  ``artifacts/kv_layout.py``, written by ``export/onnx.py``. optimum loads the file named
  ``model.onnx`` and recognizes the past / present inputs and outputs by name (``use_cache``).
- ``config.json``, ``generation_config.json`` and the tokenizer files: ``hf.py``'s writers,
  the same bytes as in ``hf/`` (optimum reads the config, ``AutoTokenizer`` the rest).
- ``genai_config.json``: onnxruntime-genai's generic ``decoder`` model type with our input and
  output names (its ``gpt2`` type wants one combined past tensor per layer, not ours), the
  context length, eos / pad, and greedy search on the CPU by default.
Writing and checking these needs ``tokenizers`` (a dependency), not transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx

from slm_export.artifacts import kv_layout
from slm_export.artifacts.manifest import Manifest
from slm_export.errors import SlmError
from slm_export.export import hf
from slm_export.tokenizer import EOT_ID

FOLDER = "onnx"
CACHE_GRAPH = "model.onnx"  # the fp32 cache graph; variants are model.<dtype>.onnx beside it
GENAI_CONFIG = "genai_config.json"
KIND = "onnx_config"


def genai_config(config) -> dict:
    """onnxruntime-genai's configuration of the cache graph (its ``decoder`` model type)."""
    head_size = config.n_embd // config.n_head
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID,
            "context_length": config.block_size,  # learned positions: the cache cannot slide
            "vocab_size": config.vocab_size,
            "decoder": {
                "filename": CACHE_GRAPH,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": head_size,
                "hidden_size": config.n_embd,
                "num_attention_heads": config.n_head,
                "num_key_value_heads": config.n_head,
                "num_hidden_layers": config.n_layer,
                "inputs": {**{name: name for name in kv_layout.TOKEN_INPUTS},
                           "past_key_names": kv_layout.PAST[0],
                           "past_value_names": kv_layout.PAST[1]},
                "outputs": {"logits": "logits",
                            "present_key_names": kv_layout.PRESENT[0],
                            "present_value_names": kv_layout.PRESENT[1]},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1,
            "max_length": config.block_size, "min_length": 0,
            "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
            # present = past + new tokens (a concatenation), not a max-length buffer
            "past_present_share_buffer": False,
        },
    }


def write(config, folder: str | os.PathLike) -> dict[str, str]:
    """Write the config and tokenizer files into ``folder``/onnx; -> {file name: kind}."""
    files = {**hf.metadata_files(config), GENAI_CONFIG: hf.to_json(genai_config(config))}
    hf.write_files(Path(folder) / FOLDER, files)
    return {f"{FOLDER}/{name}": KIND for name in files}


def verify(manifest: Manifest) -> dict:
    """The onnx/ files against the fp32 cache graph they describe and against our tokenizer:
    genai_config.json names that graph, feeds exactly its inputs and reads its outputs, and
    agrees with it and with config.json on layers, heads, head size and vocabulary;
    tokenizer.json (through ``tokenizers``) gives our ids and decodes them back.
    -> {"layers", "texts", "tokens"}; raises ``SlmError`` naming the file and the mismatch."""
    folder = manifest.folder / FOLDER
    model = json.loads((folder / GENAI_CONFIG).read_text())["model"]
    decoder = model["decoder"]
    graph = manifest.file("onnx_kv", verify_hash=False)  # hashed when the folder was read
    if folder / decoder["filename"] != graph:
        raise SlmError(f"{FOLDER}/{GENAI_CONFIG}: decoder filename {decoder['filename']!r} is not "
                       f"the cache graph {graph.relative_to(manifest.folder)}")
    layers = _check_genai_io(model, onnx.load(str(graph)))
    hf_config = json.loads((folder / "config.json").read_text())
    sizes = {"n_layer": decoder["num_hidden_layers"], "n_head": decoder["num_attention_heads"],
             "n_embd": decoder["hidden_size"], "vocab_size": model["vocab_size"],
             "n_positions": model["context_length"]}
    for key, value in sizes.items():
        if hf_config[key] != value:
            raise SlmError(f"{FOLDER}/config.json: {key} {hf_config[key]}, {GENAI_CONFIG} "
                           f"says {value}")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    checked = hf.check_tokenizer(
        f"{FOLDER}/tokenizer.json: tokenizers", lambda text: tok.encode(text).ids,
        lambda ids: tok.decode(ids, skip_special_tokens=False))
    return {"layers": layers, **checked}


def _check_genai_io(model: dict, proto: onnx.ModelProto) -> int:
    """genai_config.json's names and sizes against the graph's inputs and outputs -> layers."""
    decoder, where = model["decoder"], f"{FOLDER}/{GENAI_CONFIG}"
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*proto.graph.input, *proto.graph.output)}
    optional = {init.name for init in proto.graph.initializer}  # inputs with a default
    n = decoder["num_hidden_layers"]
    names, per_layer = decoder["inputs"], ("past_key_names", "past_value_names")
    fed = {names[k] for k in names if k not in per_layer}
    fed |= {names[k] % i for k in per_layer for i in range(n)}
    required = {v.name for v in proto.graph.input} - optional
    if fed != required:
        raise SlmError(f"{where}: feeds {sorted(fed - required)[:3]} that the graph lacks or "
                       f"misses its inputs {sorted(required - fed)[:3]}")
    names, per_layer = decoder["outputs"], ("present_key_names", "present_value_names")
    read = {names["logits"]} | {names[k] % i for k in per_layer for i in range(n)}
    if missing := read - {v.name for v in proto.graph.output}:
        raise SlmError(f"{where}: reads outputs the graph lacks: {sorted(missing)[:3]}")
    heads = decoder["num_key_value_heads"], decoder["head_size"]
    for name in {names[k] % i for k in per_layer for i in range(n)}:
        if (shapes[name][1], shapes[name][3]) != heads:
            raise SlmError(f"{where}: {name} is {shapes[name]} in the graph, the config says "
                           f"{heads[0]} heads of size {heads[1]}")
    if shapes[names["logits"]][-1] != model["vocab_size"]:
        raise SlmError(f"{where}: vocab_size {model['vocab_size']}, the graph's logits have "
                       f"{shapes[names['logits']][-1]}")
    return n
