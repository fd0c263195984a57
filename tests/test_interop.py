"""Other tools open our exports unchanged: transformers (AutoTokenizer, pipeline),
tiktoken's own GPT-2 loader, the `tokenizers` library, CTranslate2 (hf/); optimum and
onnxruntime-genai (onnx/, in an environment of their own). Every claim runs the real client
on a real export; nothing is mocked."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_generate_cli import scripted_model

from slm_export.artifacts.manifest import Manifest
from slm_export.errors import SlmError
from slm_export.export import build, hf, onnx_folder
from slm_export.runtime import GREEDY, backend_for_model, generate
from slm_export.stories import story
from slm_export.tokenizer import EOT_ID, decode, encode, get_encoding, mergeable_ranks

pytestmark = pytest.mark.slow  # exports a model
transformers = pytest.importorskip("transformers", reason="needs the test extra (transformers)")

PROMPTS = ["Once upon a time", "Hi", "The 3 little pigs said:"]
SCRIPT_TEXT = (' Lily found 3 shiny shells by the sea, and said: "Wow, 100%!" Then the café\'s '
               "cat 🦄 slept.\n\nThe end.")
TOKENIZER_FILES = {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json"}
VARIED_TEXTS = [
    story(7), story(123),
    "Hello world", "  two leading spaces", "trailing spaces   ", "tabs\tand\t\ttabs",
    "line\nbreaks\n\n\nand\r\nCRLF\n", "Tom's dog didn't bark; they'll say it's 'fine'.",
    "Wait... what?! (Really?) [yes] {no} <maybe> -- #1 @home & 50% off*",
    "Numbers: 0 7 42 3.14159 1,000,000 2024-01-02 0x1F 1e-5 007 12345678901234567890",
    "Unicode: café naïve Zürich São Paulo 日本語のテキスト 한국어 Ελληνικά русский עברית العربية",
    "Emoji 🦄🐻‍❄️👩🏽‍💻 and symbols ½ ² ① ∑ → ™ ©", "\u00a0non-breaking\u3000ideographic\u2028",
    "x" * 300, "ab" * 200 + " " * 50 + "!" * 40,
]


def live_scripted_model(script: list[int]):
    """The scripted GPT (greedy output = ``script``, whatever the input) with its blocks'
    output projections given small random weights back: attention and MLP then shape the
    logits, so a converter's attention or KV cache has to be right for the logits to match,
    while the greedy choice stays the script."""
    model = scripted_model(script)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.transformer.h:
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.copy_(0.02 * torch.randn(lin.weight.shape, generator=g))
    return model


def ours(model, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """Our greedy continuations (one left-padded batch through the one loop)."""
    out = generate(backend_for_model("eager", model), [encode(p) for p in prompts],
                   max_new_tokens=new_tokens, sampling=GREEDY)
    return out.tokens


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An hf export of a model whose greedy continuation of PROMPTS[0] is SCRIPT_TEXT."""
    pad = len(encode(PROMPTS[0])) - 1
    model = live_scripted_model([0] * pad + encode(SCRIPT_TEXT) + [EOT_ID])
    assert decode(ours(model, PROMPTS[:1], 60)[0]) == SCRIPT_TEXT
    out = tmp_path_factory.mktemp("interop") / "export"
    manifest = build(model, out, formats=["hf"])
    return model, manifest


def hf_folder(export) -> Path:
    return export[1].folder / hf.FOLDER


def test_hf_folder_is_complete_and_in_the_manifest(export):
    _, manifest = export
    folder = hf_folder(export)
    names = {"config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES}
    assert {p.name for p in folder.iterdir()} == names  # no temp files left
    assert set(manifest.files) == {f"hf/{n}" for n in names}
    assert manifest.file("hf").name == "model.safetensors"  # hashes checked by Manifest.read
    assert manifest.data["verification"]["hf/tokenizer.json"]["tokens"] > 1000
    gen = transformers.GenerationConfig.from_pretrained(folder)
    assert (gen.eos_token_id, gen.pad_token_id, gen.bos_token_id, gen.max_length) == (EOT_ID,) * 3 + (128,)


def test_vocab_and_merges_are_gpt2s_own_files(export, monkeypatch):
    """tiktoken builds `gpt2` from OpenAI's encoder.json + vocab.bpe and pins their SHA-256;
    its own loader accepts our vocab.json + merges.txt under those pins, giving our ranks:
    the byte-to-unicode mapping and every merge recovered from the ranks are exact."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext import openai_public

    pinned = {}
    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks",
                        lambda **kw: pinned.update(kw) or {})
    openai_public.gpt2()  # records the hashes tiktoken pins (no download happens)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local files, cache nothing
    folder = hf_folder(export)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(folder / "merges.txt"), encoder_json_file=str(folder / "vocab.json"),
        vocab_bpe_hash=pinned["vocab_bpe_hash"], encoder_json_hash=pinned["encoder_json_hash"])
    assert ranks == mergeable_ranks()
    assert len((folder / "merges.txt").read_text().splitlines()) == 1 + 50000


def large_varied_sample(chars: int = 600_000, seed: int = 0) -> list[str]:
    """Python's own sources (code, prose, odd spacing) plus seeded random strings mixing
    scripts, emoji, combining marks, digits, contractions and every kind of whitespace."""
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        total += len(texts[-1])
        if total > chars // 2:
            break
    rng = random.Random(seed)
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0xE00, 0xE7F), (0x2000, 0x206F), (0x3040, 0x30FF),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1D400, 0x1D7FF), (0x1F300, 0x1FAFF),
              (0x0, 0x1F)]
    spaces = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\x0b",
              "\x0c", "\x85", "\u2028"]
    while total < chars:
        parts = []
        for _ in range(rng.randint(1, 40)):
            kind = rng.random()
            if kind < 0.3:
                parts.append(rng.choice(spaces))
            elif kind < 0.4:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 15))))
            elif kind < 0.5:
                parts.append(rng.choice(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "...", "?!"]))
            else:
                lo, hi = rng.choice(blocks)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
        texts.append("".join(parts))
        total += len(texts[-1])
    return texts


def test_tokenizer_files_reproduce_tiktoken_on_a_large_varied_sample(export):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = hf_folder(export)
    from_json = Tokenizer.from_file(str(folder / "tokenizer.json"))
    from_files = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    from_files.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = large_varied_sample()
    want = [get_encoding().encode_ordinary(t) for t in texts]
    for tok in (from_json, from_files):
        got = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        bad = [t for t, g, w in zip(texts, got, want, strict=True) if g != w]
        assert not bad, f"{len(bad)} of {len(texts)} texts differ, first: {bad[0][:80]!r}"
    assert sum(map(len, want)) > 250_000


def test_autotokenizer_gives_our_ids_and_round_trips(export):
    tok = transformers.AutoTokenizer.from_pretrained(hf_folder(export))
    for text in VARIED_TEXTS:
        ids = tok(text, verbose=False)["input_ids"]
        assert ids == encode(text), text[:60]
        assert tok.decode(ids) == text
    assert (tok.eos_token_id, tok.bos_token_id, tok.unk_token_id, tok.pad_token_id) == (EOT_ID,) * 4
    assert tok.model_max_length == 128 and len(tok) == 50257
    # transformers reads the literal special token as the token (our encode(), as text)
    assert tok.encode("<|endoftext|>") == [EOT_ID] and tok.decode([EOT_ID]) == "<|endoftext|>"


def test_pipeline_greedy_continuation_equals_ours(export):
    model, _ = export
    pipe = transformers.pipeline("text-generation", model=str(hf_folder(export)))
    want = ours(model, PROMPTS, 60)
    got = pipe(PROMPTS[0], do_sample=False, max_new_tokens=60, return_tensors=True)
    assert got[0]["generated_token_ids"] == encode(PROMPTS[0]) + want[0] + [EOT_ID]  # HF keeps eos
    assert decode(want[0]) == SCRIPT_TEXT
    batched = pipe(PROMPTS, do_sample=False, max_new_tokens=60, batch_size=3)  # left-padded
    texts = [p + decode(w) for p, w in zip(PROMPTS, want, strict=True)]
    assert [r[0]["generated_text"] for r in batched] == texts
    # no arguments at all: the generation config keeps it inside the 128 learned positions
    assert pipe(PROMPTS[0])[0]["generated_text"].startswith(PROMPTS[0])


def test_transformers_cached_generation_logits_equal_ours(export):
    """HF's generate decodes through its own KV cache: each step's logits equal our full
    forward on the same tokens (the attention and MLP weights are live)."""
    model, _ = export
    lm = transformers.AutoModelForCausalLM.from_pretrained(hf_folder(export)).eval()
    prompt = torch.tensor([encode(PROMPTS[2])])
    with torch.no_grad():
        out = lm.generate(prompt, do_sample=False, max_new_tokens=40, output_logits=True,
                          return_dict_in_generate=True)
        full = model.lm_head(model.hidden_states(out.sequences))
    steps = torch.stack(out.logits, dim=1)  # (1, new, vocab)
    want = full[:, prompt.size(1) - 1:-1]
    assert steps.shape == want.shape and (steps - want).abs().max() <= 1e-4


def test_a_wrong_tokenizer_file_fails_verification(export, tmp_path):
    """verify_tokenizer (run by every hf export) catches a tokenizer that differs by one merge."""
    broken = tmp_path / "export"
    shutil.copytree(hf_folder(export), broken / hf.FOLDER)
    path = broken / hf.FOLDER / "tokenizer.json"
    data = json.loads(path.read_text())
    data["model"]["merges"].remove(["Ġt", "he"])  # " the" can no longer form
    path.write_text(json.dumps(data))
    with pytest.raises(SlmError, match="AutoTokenizer ids differ from ours at token"):
        hf.verify_tokenizer(broken)
    assert hf.verify_tokenizer(export[1].folder)["texts"] == 12


def test_ctranslate2_converts_and_generates_our_tokens(export, tmp_path):
    """`ct2-transformers-converter --model hf/`, then CTranslate2's own greedy search and
    logits against ours."""
    ctranslate2 = pytest.importorskip("ctranslate2", reason="needs the test extra (ctranslate2)")
    model, _ = export
    out = tmp_path / "ct2"
    r = subprocess.run([sys.executable, "-m", "ctranslate2.converters.transformers", "--model",
                        str(hf_folder(export)), "--output_dir", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    generator = ctranslate2.Generator(str(out), device="cpu")
    tok = transformers.AutoTokenizer.from_pretrained(hf_folder(export))
    pieces = [tok.convert_ids_to_tokens(encode(p)) for p in PROMPTS]
    results = generator.generate_batch(pieces, max_length=80, sampling_topk=1)  # prompt included
    got = [res.sequences_ids[0][len(p):] for res, p in zip(results, pieces, strict=True)]
    assert got == ours(model, PROMPTS, 60)  # CTranslate2 drops the eos, as we do
    ids = torch.randint(0, 50257, (2, 128), generator=torch.Generator().manual_seed(0))
    logits = np.asarray(generator.forward_batch([tok.convert_ids_to_tokens(row) for row in ids.tolist()]))
    with torch.no_grad():
        want = model.lm_head(model.hidden_states(ids))
    assert (torch.from_numpy(logits) - want).abs().max() <= 1e-4


# -- onnx/: optimum and onnxruntime-genai ------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
# What tests/helpers/onnx_clients.py runs on, pinned: the versions the README names. They
# live in an environment of their own: both need the CPU `onnxruntime` wheel, which would
# overwrite the `onnxruntime` module of our onnxruntime-gpu, and optimum-onnx 0.1 wants
# transformers < 4.58.
CLIENTS = ("optimum-onnx[onnxruntime]==0.1.0", "optimum==2.1.0", "onnxruntime==1.32.0",
           "onnxruntime-genai==0.18.0", "transformers==4.57.6")
NEW_TOKENS = 40  # every row of the script ends (eos) before that


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    """An onnx export of the model the hf fixture exports, and our greedy continuations of
    PROMPTS (verification is tests/test_export.py's business; here the clients' results count)."""
    pad = len(encode(PROMPTS[0])) - 1
    model = live_scripted_model([0] * pad + encode(SCRIPT_TEXT) + [EOT_ID])
    out = tmp_path_factory.mktemp("interop_onnx") / "export"
    return model, build(model, out, formats=["onnx"], verify=False), ours(model, PROMPTS, NEW_TOKENS)


@pytest.fixture(scope="session")
def client_python() -> Path:
    """The python of an environment with the ONNX clients, built once (~1 minute) under
    artifacts/interop-env (or $SLM_INTEROP_ENV) and reused while the pins stay the same.
    Skips, saying why, only when pip cannot download the clients (no network)."""
    env = Path(os.environ.get("SLM_INTEROP_ENV") or ROOT / "artifacts" / "interop-env").absolute()
    pins = [*CLIENTS, f"torch=={torch.__version__}"]  # optimum needs torch: the wheel we have
    stamp = "slm-interop-pins.json"
    if (env / stamp).is_file() and json.loads((env / stamp).read_text()) == pins:
        return env / "bin" / "python"
    staging = env.with_name(f".{env.name}.build{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    env.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True, capture_output=True)
        # --no-compile: byte-compiling all of torch doubled the build; imports compile what they use
        r = subprocess.run([str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet",
                            "--disable-pip-version-check", "--no-compile", *pins],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode:
            pip_failed(r.stderr or r.stdout, pins)
        (staging / stamp).write_text(json.dumps(pins))
        shutil.rmtree(env, ignore_errors=True)
        os.replace(staging, env)  # a venv runs from anywhere through its bin/python
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return env / "bin" / "python"


def pip_failed(output: str, pins: list[str]):
    """Skip when pip cannot reach the index (a download of one client fails too); else fail."""
    last = (output.strip().splitlines() or ["(no output)"])[-1]
    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                "--dest", tmp, CLIENTS[3]], capture_output=True, timeout=600)
    if probe.returncode:
        pytest.skip(f"pip cannot download the ONNX clients (no network?): {last}")
    pytest.fail(f"pip install {' '.join(pins)} failed: {output[-3000:]}")


def run_client(python: Path, client: str, folder: Path, out: Path) -> dict:
    """tests/helpers/onnx_clients.py in the client environment -> its result.json."""
    out.mkdir()
    r = subprocess.run([str(python), str(ROOT / "tests" / "helpers" / "onnx_clients.py"), client,
                        str(folder), str(out), str(NEW_TOKENS), *PROMPTS],
                       capture_output=True, text=True, timeout=600, cwd=out,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def assert_untouched(manifest: Manifest) -> None:
    """The export folder holds exactly its manifest's files, unchanged (hashes checked)."""
    Manifest.read(manifest.folder)
    files = {p.relative_to(manifest.folder).as_posix() for p in manifest.folder.rglob("*")
             if p.is_file()}
    assert files == {*manifest.files, "manifest.json"}


def assert_our_greedy(model, want: list[list[int]], result: dict, out: Path) -> None:
    """The client's prompt ids are ours; each row (alone and in the padded batch) continues
    with our greedy tokens ``want`` and then eos, each chosen from our logits (within 1e-4)."""
    assert result["prompt_ids"] == [encode(p) for p in PROMPTS]
    for r, (prompt, row) in enumerate(zip(PROMPTS, want, strict=True)):
        steps, ids = len(row) + 1, torch.tensor([encode(prompt) + row])
        with torch.no_grad():
            logits = model.lm_head(model._hidden(ids, torch.arange(ids.size(1))))[0]
        logits = logits[len(encode(prompt)) - 1:]  # (steps, vocab): what each new token came from
        for mode in ("single", "batch"):
            assert result[mode][r][:steps] == row + [EOT_ID], (mode, r)
            got = torch.from_numpy(np.load(out / f"{mode}_{r}.npy")[:steps])
            diff = (got - logits).abs().max().item()
            assert diff <= 1e-4, (mode, r, diff)


def test_onnx_folder_holds_what_the_clients_read(onnx_export, export):
    """onnx/: the cache graph as model.onnx, hf/'s config and tokenizer bytes, genai_config.json."""
    manifest = onnx_export[1]
    folder = manifest.folder / onnx_folder.FOLDER
    companions = {"config.json", "generation_config.json", "genai_config.json", *TOKENIZER_FILES}
    assert {p.name for p in folder.iterdir()} == {"model.onnx", *companions}
    assert manifest.file("onnx_kv") == folder / "model.onnx"
    assert {n for n, e in manifest.files.items() if e["kind"] == "onnx_config"} == {
        f"onnx/{n}" for n in companions}
    for name in companions - {"genai_config.json"}:  # hf.py's writers: the same bytes as hf/
        assert (folder / name).read_bytes() == (hf_folder(export) / name).read_bytes(), name
    genai = json.loads((folder / "genai_config.json").read_text())
    assert genai["model"]["type"] == "decoder" and genai["model"]["context_length"] == 128
    assert genai["model"]["decoder"]["filename"] == "model.onnx"
    assert genai["search"]["do_sample"] is False and genai["search"]["max_length"] == 128
    assert onnx_folder.verify(manifest) == {"layers": 4, "texts": 12, "tokens": 1175}


def test_a_wrong_onnx_folder_file_fails_verification(onnx_export, tmp_path):
    """onnx_folder.verify (run by every onnx export) catches a genai_config.json that names
    an input the graph lacks or a wrong head size, and a tokenizer.json without one merge."""
    broken = tmp_path / "export"
    shutil.copytree(onnx_export[1].folder, broken)
    genai_path = broken / "onnx" / "genai_config.json"
    good = json.loads(genai_path.read_text())
    spoiled = (
        (lambda d: d["inputs"].update(past_key_names="past_%d"), r"feeds \['past_0', 'past_1', 'past_2'\]"),
        (lambda d: d.update(head_size=64), r"present\.\d\.\w+ is \['batch', 4, 'total_sequence', 32\]"),
        (lambda d: d.update(filename="model.int8.onnx"), "decoder filename 'model.int8.onnx' is not"))
    for spoil, error in spoiled:
        bad = copy.deepcopy(good)
        spoil(bad["model"]["decoder"])
        genai_path.write_text(json.dumps(bad))
        with pytest.raises(SlmError, match=error):
            onnx_folder.verify(Manifest.read(broken, verify_hashes=False))
    genai_path.write_text(json.dumps(good))
    tok_path = broken / "onnx" / "tokenizer.json"
    data = json.loads(tok_path.read_text())
    data["model"]["merges"].remove(["Ġt", "he"])
    tok_path.write_text(json.dumps(data))
    with pytest.raises(SlmError, match="onnx/tokenizer.json: tokenizers ids differ from ours"):
        onnx_folder.verify(Manifest.read(broken, verify_hashes=False))


def test_optimum_generates_our_tokens(client_python, onnx_export, tmp_path):
    """`ORTModelForCausalLM.from_pretrained("export/onnx")` + `generate(do_sample=False)`,
    each prompt alone and as one left-padded batch, with AutoTokenizer on the same folder."""
    model, manifest, want = onnx_export
    result = run_client(client_python, "optimum", manifest.folder / "onnx", tmp_path / "out")
    assert_our_greedy(model, want, result, tmp_path / "out")
    assert_untouched(manifest)


def test_onnxruntime_genai_keeps_an_eos_inside_a_prompt_of_a_batch(client_python, onnx_export, tmp_path):
    """genai once masked every token equal to the pad id when eos = pad (onnxruntime-genai#1682,
    fixed for batch 1 in #1694), and genai_config.json sets eos = pad = 50256: a batch where
    one prompt holds <|endoftext|> mid-text, padded with it, must still give our logits and
    tokens for that row (it does with 0.18.0, so the config stays)."""
    import numpy as np

    model, manifest, _ = onnx_export
    rows = [encode(PROMPTS[0]) + [EOT_ID] + encode(" and then"), encode(PROMPTS[1])]
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([str(client_python), str(ROOT / "tests" / "helpers" / "onnx_clients.py"),
                        "genai-ids", str(manifest.folder / "onnx"), str(out), "8", json.dumps(rows)],
                       capture_output=True, text=True, timeout=600, cwd=out,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    backend = backend_for_model("eager", model)
    for row, ids in enumerate(rows):
        logits, _ = backend.prefill(torch.tensor([ids]), None)
        for mode in ("batch", "single"):
            np.testing.assert_allclose(np.load(out / f"first_{mode}_{row}.npy"), logits[0].numpy(), atol=1e-4)
    want = generate(backend, rows, max_new_tokens=8, sampling=GREEDY, stop_id=None).tokens
    assert [t[:len(w)] for t, w in zip(result["batch"], want, strict=True)] == [
        w[:len(t)] for t, w in zip(result["batch"], want, strict=True)]


def test_onnxruntime_genai_generates_our_tokens(client_python, onnx_export, tmp_path):
    """`onnxruntime_genai.Model("export/onnx")` + its Tokenizer and Generator, greedy, each
    prompt alone and as one padded batch. The logits check matters: with past_key_names and
    past_value_names swapped in genai_config.json the scripted tokens still came out right."""
    model, manifest, want = onnx_export
    result = run_client(client_python, "genai", manifest.folder / "onnx", tmp_path / "out")
    assert_our_greedy(model, want, result, tmp_path / "out")
    assert_untouched(manifest)
