"""Text -> GPT-2 token ids, once, into memory-mapped files; random batches from them.

``prepare(dataset)`` accepts
- ``stories``: the embedded story generator (offline default),
- a local ``.txt`` (blank-line separated documents), ``.jsonl``/``.json``, ``.parquet`` file
  or a folder of them,
- a Hugging Face hub name (e.g. ``roneneldan/TinyStories``),
- a folder this module prepared before (it holds ``meta.json``), used as it is.
It writes ``<out_root>/<name>/{train,val}.bin`` (uint16 token ids, documents separated by
``<|endoftext|>``) and then ``meta.json``; files are written under temporary names and
renamed, and ``meta.json`` (with each file's size and SHA-256) comes last, so an
interrupted run never leaves a folder that looks complete. A later run reuses a valid
folder and rebuilds an invalid one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slm_export import tokenizer
from slm_export.artifacts.files import atomic_write, sha256_file
from slm_export.config import TrainConfig
from slm_export.errors import SlmError, first_line
from slm_export.stories import stories

FORMAT = "slm-export-data"
VERSION = 2  # 2: the held-out split is drawn by SPLIT_METHOD (1: datasets' shuffle)
READABLE_VERSIONS = (1, 2)
SPLIT_METHOD = "numpy.random.default_rng(seed).choice(n_docs, n_val, replace=False)"
STREAM_SPLIT_METHOD = "blake2b(f'{seed}:{index}', 8 bytes) / 2**64 < val_fraction, per document"
DTYPE = np.uint16  # GPT-2 ids < 65536
SPLITS = ("train", "val")
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
VAL_NAMES = ("validation", "val", "valid", "test")


@dataclass(frozen=True)
class Source:
    """Where text comes from, and how to read a document out of a row: the data fields of a
    ``TrainConfig`` (which holds their defaults), made by ``Source.of``."""

    dataset: str
    text_field: str  # a column, or a template "{Context}\n{Response}"
    val_fraction: float  # held out when the source has no val split
    stories: int  # size of the embedded corpus (number of stories)
    seed: int  # of the embedded corpus and the held-out split: the same documents every run
    config: str | None  # load_dataset's name= (builder config)
    train_split: str
    val_split: str | None  # None: the first of VAL_NAMES it has
    streaming: bool

    @classmethod
    def of(cls, cfg: TrainConfig | None = None, **changes) -> Source:
        """The source of ``cfg`` (default: ``TrainConfig()``) with ``changes`` to its fields."""
        cfg = dataclasses.replace(cfg or TrainConfig(), **changes)
        return cls(dataset=cfg.dataset, text_field=cfg.text_field, val_fraction=cfg.val_fraction,
                   stories=cfg.stories, seed=cfg.data_seed, config=cfg.dataset_config,
                   train_split=cfg.train_split, val_split=cfg.val_split, streaming=cfg.streaming)

    @property
    def name(self) -> str:
        """Folder name under the data root: readable, and distinct per source and options."""
        if self.dataset == "stories":
            base = f"stories-{self.stories}-s{self.seed}"
            if self.val_fraction != TrainConfig.val_fraction:
                base += f"-v{self.val_fraction:g}"
        else:
            base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.dataset).name or self.dataset)
            key = f"{Path(self.dataset).resolve() if Path(self.dataset).exists() else self.dataset}"
            key += (f"|{self.text_field}|{self.val_fraction}|{self.seed}|{self.config}"
                    f"|{self.train_split}|{self.val_split}|{self.streaming}")
            base += "-" + hashlib.sha256(key.encode()).hexdigest()[:8]
        return base


class TokenData:
    """A prepared data folder: validated ``meta.json`` and read-only memmaps of each split."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.meta = _read_meta(self.root)
        self.splits = {}
        for split in SPLITS:
            path = self.root / f"{split}.bin"
            expected = self.meta["splits"][split]["tokens"]
            actual = path.stat().st_size if path.is_file() else -1
            if actual != expected * np.dtype(DTYPE).itemsize:
                raise SlmError(f"{path}: size {actual} bytes disagrees with meta.json "
                               f"({expected} uint16 tokens); delete the folder to rebuild it")
            self.splits[split] = np.memmap(path, dtype=DTYPE, mode="r")

    def tokens(self, split: str) -> np.ndarray:
        return self.splits[split]

    def verify_checksums(self) -> None:
        for split in SPLITS:
            digest = sha256_file(self.root / f"{split}.bin")
            if digest != self.meta["splits"][split]["sha256"]:
                raise SlmError(f"{self.root / f'{split}.bin'}: SHA-256 disagrees with meta.json")


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int,
              generator: torch.Generator, device: torch.device | str = "cpu"):
    """Random windows (x, y), y shifted by one, read from the memmap (never loaded whole).

    The windows are read straight into one contiguous (batch, block + 1) buffer; x and y are
    views of it. On CUDA that buffer is pinned (page-locked) host memory, so the copy to the
    GPU is a real asynchronous DMA (``non_blocking``): from pageable memory it would go
    through a staging copy and wait.
    """
    n = len(tokens) - block_size - 1
    if n < 0:
        raise SlmError(f"split has {len(tokens)} tokens, fewer than block_size + 1 "
                       f"({block_size + 1}); use more text or a smaller context")
    ix = torch.randint(n + 1, (batch_size,), generator=generator).tolist()
    device = torch.device(device)
    cuda = device.type == "cuda"  # CUDA-only: pinned memory needs a CUDA device
    batch = torch.empty((batch_size, block_size + 1), dtype=torch.int64, pin_memory=cuda)
    rows = batch.numpy()
    for row, i in enumerate(ix):
        rows[row] = tokens[i : i + block_size + 1]
    if cuda:
        batch = batch.to(device, non_blocking=True)
    return batch[:, :-1], batch[:, 1:]


def prepare(source: Source, out_root: str | os.PathLike = "artifacts/data",
            num_proc: int | None = None) -> TokenData:
    """Tokenize ``source`` once into ``out_root/<name>`` (reused when valid) and open it."""
    if Path(source.dataset, "meta.json").is_file():  # an already prepared folder: used strictly
        data = TokenData(source.dataset)
        data.verify_checksums()  # same-size damage would otherwise train on garbage ids
        return data
    folder = Path(out_root) / source.name
    if (folder / "meta.json").is_file():
        try:
            data = TokenData(folder)
            data.verify_checksums()
            if data.meta["version"] == VERSION:  # an older split method: rebuild below
                return data
        except SlmError:
            pass  # incomplete or damaged: rebuild below
    splits, split_info = _load_splits(source)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # the folder is invalid until rewritten
    meta = {
        "format": FORMAT, "version": VERSION, "tokenizer": tokenizer.TOKENIZER_NAME,
        "eot_id": tokenizer.EOT_ID, "dtype": "uint16", "source": source.dataset,
        "text_field": source.text_field, "split": split_info, "splits": {},
    }
    for split, ds in splits.items():
        meta["splits"][split] = _write_split(ds, source.text_field, folder / f"{split}.bin",
                                             num_proc)
    atomic_write(folder / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return TokenData(folder)


# -- loading text ---------------------------------------------------------------------------

def _load_splits(source: Source) -> tuple[dict, dict]:
    """-> ({"train": dataset, "val": dataset}, how val was chosen), holding out a validation
    set when the source has none. Datasets are ``IterableDataset``s with ``streaming``."""
    import datasets

    if source.dataset == "stories":
        # streamed to an Arrow file: memory stays bounded whatever --stories asks for
        ds = datasets.Dataset.from_generator(
            _story_rows, gen_kwargs={"n": source.stories, "seed": source.seed})
        raw = datasets.DatasetDict({"train": ds})
    else:
        raw = _load_dataset(source)
    for wanted in (source.train_split, source.val_split):
        if wanted is not None and wanted not in raw:
            raise SlmError(f"dataset {source.dataset!r} has no {wanted!r} split "
                           f"(splits: {', '.join(raw) or 'none'})")
    train = raw[source.train_split]
    val_name = source.val_split or next((n for n in VAL_NAMES if n in raw and n != source.train_split), None)
    if val_name is not None:
        val, split_info = raw[val_name], {"method": f"the source's {val_name!r} split"}
    elif source.streaming:
        train, val = _hold_out_stream(train, source.val_fraction, source.seed)
        split_info = {"method": STREAM_SPLIT_METHOD, "seed": source.seed,
                      "val_fraction": source.val_fraction}
    else:
        if len(train) < 2:
            raise SlmError(f"dataset {source.dataset!r} has {len(train)} document(s): "
                           "too few to hold out a validation split")
        train, val = _hold_out(train, source.val_fraction, source.seed)
        split_info = {"method": SPLIT_METHOD, "seed": source.seed,
                      "val_fraction": source.val_fraction}
    for split, ds in (("train", train), ("val", val)):
        if not source.streaming and len(ds) == 0:  # a stream's emptiness shows when written
            raise SlmError(f"dataset {source.dataset!r}: the {split} split is empty")
    _check_field(train, source)
    return {"train": train, "val": val}, split_info


def _hold_out(ds, fraction: float, seed: int):
    """Split ``ds`` into (train, val) with our own seeded RNG (``SPLIT_METHOD``), so a seed
    holds out the same documents whatever the ``datasets`` version (``train_test_split``'s
    shuffle changed between versions). Both splits keep the corpus order."""
    n_val = max(1, round(fraction * len(ds)))
    held = np.random.default_rng(seed).choice(len(ds), size=n_val, replace=False)
    is_val = np.zeros(len(ds), dtype=bool)
    is_val[held] = True
    return ds.select(np.flatnonzero(~is_val)), ds.select(np.flatnonzero(is_val))


def _held_out(seed: int, index: int, fraction: float) -> bool:
    """STREAM_SPLIT_METHOD: one document's draw, from the seed and its index alone."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def _hold_out_stream(ds, fraction: float, seed: int):
    """(train, val) of a stream whose length is unknown: each document is held out on its own
    draw (``STREAM_SPLIT_METHOD``), so the split needs one pass and no memory."""
    def held(_row, index):
        return _held_out(seed, index, fraction)

    def kept(_row, index):
        return not _held_out(seed, index, fraction)

    return ds.filter(kept, with_indices=True), ds.filter(held, with_indices=True)


def _story_rows(n: int, seed: int):
    for text in stories(n, seed=seed):
        yield {"text": text}


def _load_dataset(source: Source):
    """The source's splits through ``datasets.load_dataset``: a local file, a local folder
    (its files' names give the splits, as on the hub; a dataset card's ``configs`` too), or a
    hub name; ``config`` and ``streaming`` passed on."""
    import datasets

    name, path = source.dataset, Path(source.dataset)
    kw: dict = {"streaming": source.streaming}
    if source.config:
        kw["name"] = source.config
    if path.exists():
        builder = _local_builder(path)
        if builder == "text":
            kw["sample_by"] = "paragraph"  # a document is a blank-line separated paragraph
        target = str(path) if path.is_dir() else builder
        if path.is_file():
            kw["data_files"] = {"train": str(path)}
        try:
            return datasets.load_dataset(target, **kw)
        except Exception as e:  # malformed JSON / parquet raise builder-specific types
            raise SlmError(f"cannot read {name}: {first_line(e)}") from None
    hub_like = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)
    if path.suffix in LOCAL_BUILDERS or not hub_like:
        raise SlmError(f"dataset file not found: {name}")
    try:
        return datasets.load_dataset(name, **kw)
    except Exception as e:  # offline: ConnectionError / OfflineModeIsEnabled; others vary
        raise SlmError(
            f"cannot load {name!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{first_line(e, 100)}); offline, use a local .txt/.jsonl/.parquet file or "
            "--dataset stories") from None


def _local_builder(path: Path) -> str:
    """The datasets builder of a local file or folder (text, json or parquet), checked."""
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS) \
        if path.is_dir() else [path]
    kinds = {LOCAL_BUILDERS.get(p.suffix) for p in files}
    if not files or None in kinds or len(kinds) != 1:
        raise SlmError(f"{path}: expected .txt, .jsonl or .parquet file(s) of one kind")
    empty = next((p for p in files if p.stat().st_size == 0), None)
    if empty is not None:
        raise SlmError(f"{path}: empty file {empty}")
    return kinds.pop()


def _check_field(ds, source: Source) -> None:
    fields = set(re.findall(r"{(\w+)}", source.text_field)) or {source.text_field}
    columns = ds.column_names
    if columns is None:  # a stream whose features are unknown until read: look at one row
        columns = list(next(iter(ds), {}))
    missing = fields - set(columns)
    if missing:
        raise SlmError(f"dataset {source.dataset!r} has no {', '.join(sorted(missing))!r} "
                       f"field (columns: {', '.join(columns)}); use --text-field")


# -- tokenizing -----------------------------------------------------------------------------

def _tokenize_batch(batch: dict, text_field: str) -> dict:
    """Documents -> ids, each followed by <|endoftext|>. A literal <|endoftext|> in the text
    (as in the TinyStories .txt files) separates documents too."""
    n = len(next(iter(batch.values())))
    if "{" in text_field:
        texts = [text_field.format(**{k: batch[k][i] for k in batch}) for i in range(n)]
    else:
        texts = batch[text_field]
    ids = []
    for text in texts:
        doc = []
        for part in (text or "").split(tokenizer.EOT_TOKEN):
            if part.strip():
                doc += tokenizer.encode(part.strip())
                doc.append(tokenizer.EOT_ID)
        ids.append(doc)
    return {"ids": ids}


def _write_split(ds, text_field: str, path: Path, num_proc: int | None) -> dict:
    """Tokenize ``ds`` into ``path`` batch by batch (bounded memory whatever the corpus; a
    stream is read once, with a progress bar of its own) -> the split's meta.json entry."""
    import datasets

    streaming = isinstance(ds, datasets.IterableDataset)
    if streaming:
        tokenized = ds.map(_tokenize_batch, batched=True, batch_size=1000,
                           fn_kwargs={"text_field": text_field}, remove_columns=ds.column_names)
        bar = datasets.utils.tqdm(desc=f"tokenizing {path.stem} (stream)", unit=" docs")
    else:
        if num_proc is None:
            num_proc = min(os.cpu_count() or 1, 8) if len(ds) >= 50_000 else None
        tokenized = ds.map(_tokenize_batch, batched=True, batch_size=1000, num_proc=num_proc,
                           fn_kwargs={"text_field": text_field}, remove_columns=ds.column_names,
                           desc=f"tokenizing {path.stem}")
        bar = None
    sha = hashlib.sha256()
    count = documents = 0

    def write(f):
        nonlocal count, documents
        for batch in tokenized.iter(batch_size=1000):
            arr = np.fromiter((t for doc in batch["ids"] for t in doc), dtype=DTYPE)
            data = arr.tobytes()
            f.write(data)
            sha.update(data)
            count += arr.size
            documents += len(batch["ids"])
            if bar is not None:
                bar.update(len(batch["ids"]))

    try:
        atomic_write(path, write)
    finally:
        if bar is not None:
            bar.close()
    if count == 0:
        raise SlmError(f"{path.stem} split holds no text after tokenizing")
    return {"tokens": count, "documents": documents, "sha256": sha.hexdigest()}


def _read_meta(root: Path) -> dict:
    path = root / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise SlmError(f"{root}: no meta.json (not a prepared data folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SlmError(f"{path}: not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SlmError(f"{path}: not an slm-export data folder")
    if meta.get("version") not in READABLE_VERSIONS:
        raise SlmError(f"{path}: unsupported data format version {meta.get('version')!r}")
    if meta.get("dtype") != "uint16" or set(meta.get("splits", {})) != set(SPLITS):
        raise SlmError(f"{path}: expected uint16 train/val splits")
    return meta
