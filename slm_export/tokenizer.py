"""The GPT-2 BPE encoding (tiktoken ``gpt2``), available offline.

tiktoken downloads the ``gpt2`` ranks from the internet. The ``openai-whisper`` sdist ships
the same ranks as ``whisper/assets/gpt2.tiktoken`` (MIT); ``scripts/install.sh`` takes that
one file out of the sdist into the environment's data folder (``BPE_DATA``) without
installing whisper. Its SHA-256 is the one tiktoken itself expects for ``r50k_base``, which
has the same ranks as ``gpt2``, so ids are identical to ``tiktoken.get_encoding("gpt2")``.
Where no local file exists we fall back to tiktoken's own download; where neither works,
one clear error.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
import sys
import tarfile
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from slm_export.errors import SlmError

TOKENIZER_NAME = "gpt2"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
GPT2_BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
BPE_ENV = "SLM_GPT2_BPE"  # optional explicit path to a gpt2.tiktoken file
# Where scripts/install.sh puts the ranks: inside the environment, removed with it.
BPE_DATA = Path(sys.prefix) / "share" / "slm-export" / "gpt2.tiktoken"
SDIST_MEMBER = "whisper/assets/gpt2.tiktoken"  # the file's path inside the openai-whisper sdist


def bpe_file() -> Path | None:
    """The local GPT-2 ranks file, first found of: $SLM_GPT2_BPE, ``BPE_DATA``, and the
    asset of an installed openai-whisper package (installs made before ``BPE_DATA``)."""
    if os.environ.get(BPE_ENV):
        return Path(os.environ[BPE_ENV])
    if BPE_DATA.is_file():
        return BPE_DATA
    try:
        spec = importlib.util.find_spec("whisper")  # locates the package, does not import it
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "assets" / "gpt2.tiktoken"
        if candidate.is_file():
            return candidate
    return None


def extract_ranks(sdist: str | os.PathLike, dest: str | os.PathLike = BPE_DATA) -> Path:
    """Copy ``whisper/assets/gpt2.tiktoken`` out of an openai-whisper sdist (.tar.gz) to
    ``dest``, refusing anything but the exact GPT-2 ranks; the file appears whole or not at
    all. What ``scripts/install.sh`` runs; nothing else of the sdist is kept."""
    dest = Path(dest)
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            member = next((m for m in tar.getmembers() if m.isfile()
                           and m.name.split("/", 1)[-1] == SDIST_MEMBER), None)
            if member is None:
                raise SlmError(f"{sdist} has no {SDIST_MEMBER}")
            data = tar.extractfile(member).read()
    except (OSError, tarfile.TarError) as e:
        raise SlmError(f"cannot read {sdist}: {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_BPE_SHA256:
        raise SlmError(f"{SDIST_MEMBER} in {sdist} is not the GPT-2 BPE ranks file "
                       f"(sha256 {digest[:12]}...)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def load_ranks(path: Path) -> dict[bytes, int]:
    """Read a .tiktoken ranks file, refusing anything but the exact GPT-2 ranks.

    Parsed here rather than with ``tiktoken.load.load_tiktoken_bpe``, which copies even a
    local file into its cache directory (and fails when that directory is read-only).
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SlmError(f"cannot read GPT-2 BPE file {path}: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_BPE_SHA256:
        raise SlmError(f"{path} is not the GPT-2 BPE ranks file (sha256 {digest[:12]}...)")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def encoding_from_file(path: Path) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name=TOKENIZER_NAME,
        pat_str=r50k_pat_str,
        mergeable_ranks=load_ranks(path),
        special_tokens={EOT_TOKEN: EOT_ID},
    )


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding: from the local ranks file if present, else tiktoken's download."""
    path = bpe_file()
    if path is not None:
        return encoding_from_file(path)
    try:
        return tiktoken.get_encoding(TOKENIZER_NAME)
    except Exception as e:  # network errors come in many types (requests, OSError, ...)
        raise SlmError(
            f"GPT-2 tokenizer unavailable: no local ranks file (scripts/install.sh puts one at "
            f"{BPE_DATA}) and tiktoken's download failed ({type(e).__name__}); set "
            f"{BPE_ENV}=/path/to/gpt2.tiktoken"
        ) from None


def encode(text: str) -> list[int]:
    """Token ids of plain text; a literal "<|endoftext|>" in it is treated as text."""
    return get_encoding().encode_ordinary(text)


def decode(ids) -> str:
    return get_encoding().decode(list(ids))


def mergeable_ranks() -> dict[bytes, int]:
    """Every ordinary token's bytes -> its id (= its BPE rank), the special token left out."""
    enc = get_encoding()
    return {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i != EOT_ID}


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that creates each multi-byte token, in rank order (GPT-2's merges.txt).

    tiktoken keeps only ranks: BPE repeatedly joins the adjacent pair whose union has the
    lowest rank. A token of rank r is therefore the union of the two pieces that BPE leaves
    when it runs on the token's own bytes with only the ranks below r.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe(ranks, token, max_rank=rank)
        if len(parts) != 2:
            raise SlmError(f"token {rank} ({token!r}) is not one merge of lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, at = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best:
                best, at = rank, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts
