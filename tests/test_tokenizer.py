import hashlib
import io
import tarfile

import pytest
import tiktoken

from slm_export import tokenizer
from slm_export.errors import SlmError


def test_known_ids_and_vocab():
    enc = tokenizer.get_encoding()
    assert enc.n_vocab == 50257
    assert enc.encode("Hello world") == [15496, 995]
    assert tokenizer.encode("Once upon a time") == [7454, 2402, 257, 640]
    assert enc.eot_token == tokenizer.EOT_ID == 50256


def test_unicode_round_trip():
    text = "Tom saw a 🐻 in the café — naïve 日本語 ümlaut\n\ttabs  and   spaces"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_endoftext_is_the_document_separator():
    enc = tokenizer.get_encoding()
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    # corpus text never turns into the special token by accident
    assert 50256 not in tokenizer.encode("a <|endoftext|> b")
    assert tokenizer.decode([tokenizer.EOT_ID]) == "<|endoftext|>"


def test_bpe_file_is_checked(tmp_path, monkeypatch):
    assert tokenizer.bpe_file() is not None, "run scripts/install.sh (README, Install)"
    wrong = tmp_path / "gpt2.tiktoken"
    wrong.write_bytes(b"aGVsbG8= 0\n")
    with pytest.raises(SlmError, match="not the GPT-2 BPE ranks"):
        tokenizer.encoding_from_file(wrong)
    monkeypatch.setenv(tokenizer.BPE_ENV, str(tmp_path / "missing.tiktoken"))
    with pytest.raises(SlmError, match="cannot read"):
        tokenizer.encoding_from_file(tokenizer.bpe_file())


def test_no_file_and_no_network_is_one_clear_error(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tokenizer, "bpe_file", lambda: None)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    tokenizer.get_encoding.cache_clear()
    try:
        with pytest.raises(SlmError, match=r"no local ranks file .*install\.sh.* SLM_GPT2_BPE="):
            tokenizer.get_encoding()
    finally:
        tokenizer.get_encoding.cache_clear()


def test_same_ids_as_tiktoken_download():
    try:
        online = tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline machine: the comparison needs tiktoken's download
        pytest.skip(f"tiktoken cannot download gpt2 here ({type(e).__name__})")
    text = "Once upon a time, Lily found a shiny 🐚 by the sea. <|endoftext|> The end."
    assert online.encode_ordinary(text) == tokenizer.encode(text)
    assert online.n_vocab == tokenizer.get_encoding().n_vocab


def test_bpe_file_resolution_order(tmp_path, monkeypatch):
    """$SLM_GPT2_BPE, then the environment's data file (scripts/install.sh), then an installed
    openai-whisper's asset (installs made before the data file), else None (tiktoken's
    download). whisper is located, never imported."""
    monkeypatch.delenv(tokenizer.BPE_ENV, raising=False)
    data = tmp_path / "prefix" / "share" / "slm-export" / "gpt2.tiktoken"
    monkeypatch.setattr(tokenizer, "BPE_DATA", data)
    assets = tmp_path / "site" / "whisper" / "assets"
    assets.mkdir(parents=True)
    (assets.parent / "__init__.py").write_text("raise RuntimeError('whisper was imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # shadows any real whisper
    assert tokenizer.bpe_file() is None
    (assets / "gpt2.tiktoken").write_bytes(b"ranks")
    assert tokenizer.bpe_file() == assets / "gpt2.tiktoken"
    data.parent.mkdir(parents=True)
    data.write_bytes(b"ranks")
    assert tokenizer.bpe_file() == data
    monkeypatch.setenv(tokenizer.BPE_ENV, str(tmp_path / "mine.tiktoken"))
    assert tokenizer.bpe_file() == tmp_path / "mine.tiktoken"


def sdist(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_ranks_from_the_whisper_sdist(tmp_path):
    """What scripts/install.sh does: one checked file out of the sdist, nothing else."""
    ranks = tokenizer.bpe_file().read_bytes()
    good = sdist(tmp_path / "good.tar.gz", {
        "openai_whisper-20250625/whisper/assets/multilingual.tiktoken": b"other",
        "openai_whisper-20250625/whisper/assets/gpt2.tiktoken": ranks})
    dest = tmp_path / "env" / "share" / "slm-export" / "gpt2.tiktoken"
    assert tokenizer.extract_ranks(good, dest) == dest
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == tokenizer.GPT2_BPE_SHA256
    assert tokenizer.encoding_from_file(dest).encode("Hello world") == [15496, 995]
    assert sorted(p.name for p in dest.parent.iterdir()) == ["gpt2.tiktoken"]

    dest.unlink()
    wrong = sdist(tmp_path / "wrong.tar.gz", {"w-1/whisper/assets/gpt2.tiktoken": ranks + b"\n"})
    with pytest.raises(SlmError, match="not the GPT-2 BPE ranks"):
        tokenizer.extract_ranks(wrong, dest)
    missing = sdist(tmp_path / "missing.tar.gz", {"w-1/whisper/__init__.py": b""})
    with pytest.raises(SlmError, match="has no whisper/assets/gpt2.tiktoken"):
        tokenizer.extract_ranks(missing, dest)
    with pytest.raises(SlmError, match="cannot read"):
        tokenizer.extract_ranks(tmp_path / "nope.tar.gz", dest)
    assert list(dest.parent.iterdir()) == []  # no file, no temp left behind
