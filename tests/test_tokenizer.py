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
    assert tokenizer.bpe_file() is not None, "install openai-whisper --no-deps (README)"
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
        with pytest.raises(SlmError, match="openai-whisper"):
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
