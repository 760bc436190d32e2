"""Text sources, tokenisation, and packing into fixed-length contexts with the model's special tokens."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from saelab.config import TextConfig
from saelab.errors import TextSourceError

EMBEDDED_CORPUS = "stdlib_docs.jsonl.gz"
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TOKENIZE_BATCH = 256


def embedded_documents() -> Iterator[str]:
    """The embedded corpus: docstrings of the Python 3.11 standard library (see scripts/build_corpus.py)."""
    with resources.files("saelab.data").joinpath(EMBEDDED_CORPUS).open("rb") as raw:
        for line in gzip.open(raw):
            yield json.loads(line)["text"]


def _data_files(path: Path) -> tuple[str, list[str]]:
    """The datasets builder and files for a local file or folder."""
    if not path.exists():
        raise TextSourceError(
            f"text.path: no such file or folder: {str(path)!r}; give an existing .txt/.jsonl/.parquet file or folder"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_BUILDERS)
        if not files:
            raise TextSourceError(
                f"no .txt, .jsonl or .parquet files in {path}; put text files there or point text.path at one"
            )
    elif path.suffix in FILE_BUILDERS:
        files = [path]
    else:
        raise TextSourceError(f"{path} is not a .txt, .jsonl or .parquet file; convert it or choose another text.path")
    builders = {FILE_BUILDERS[p.suffix] for p in files}
    if len(builders) > 1:
        raise TextSourceError(f"{path} mixes file types {sorted(builders)}; keep one type per folder")
    return builders.pop(), [str(p) for p in files]


def _load_dataset(cfg: TextConfig) -> tuple[Any, list[str]]:
    """The streamed dataset of a `hf` or `files` source, and the local files it reads (none for `hf`)."""
    import datasets

    path = str(cfg.path)
    if cfg.source == "files":
        builder, files = _data_files(Path(path))
        kwargs: dict[str, Any] = {"sample_by": cfg.txt_sample_by} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs), files
    try:
        return datasets.load_dataset(path, cfg.name, split=cfg.split, streaming=True), []
    except (OSError, ValueError) as err:  # no such dataset, config or split; no network
        raise TextSourceError(
            f"cannot open the Hugging Face dataset {path!r} (name {cfg.name!r}, split {cfg.split!r}): {err}; "
            "check text.path, text.name and text.split"
        ) from None


def iter_documents(cfg: TextConfig) -> Iterator[str]:
    """Yield the documents of a text source in a fixed order.

    A `files` source that does not exist, or a text file that is not UTF-8, raises `TextSourceError`."""
    if cfg.source == "embedded":
        docs: Iterable[str] = embedded_documents()
    else:
        ds, files = _load_dataset(cfg)
        docs = _column(ds, cfg.text_column, str(cfg.path), files)
    return islice(docs, cfg.max_documents)


def _column(ds: Any, column: str, where: str, files: list[str]) -> Iterator[str]:
    try:
        for row in ds:
            if column not in row:
                raise TextSourceError(
                    f"{where} has no column {column!r} (columns: {sorted(row)}); set text.text_column"
                )
            yield row[column]
    except UnicodeDecodeError as err:
        bad = next((f for f in files if not _is_utf8(Path(f))), where)
        raise TextSourceError(
            f"{bad} is not UTF-8 text ({err.reason}); convert it to UTF-8, "
            f"e.g. `iconv -f latin1 -t utf-8 {bad} > {Path(bad).stem}.utf8{Path(bad).suffix}`"
        ) from None


def _is_utf8(path: Path) -> bool:
    """Whether a text file decodes as UTF-8 (binary files, such as parquet, count as UTF-8: they are not text)."""
    if path.suffix == ".parquet":
        return True
    try:
        with path.open(encoding="utf-8") as f:
            while f.read(1 << 20):
                pass
    except UnicodeDecodeError:
        return False
    return True


@dataclass(frozen=True)
class SpecialTokens:
    """How the model frames a context: tokens before and after it, and between documents."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    separator: int | None
    all_special: frozenset[int]

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, encoder: bool) -> SpecialTokens:
        """Encoders get [CLS] ... [SEP] with [SEP] between documents; decoders get BOS and EOS between documents."""
        all_special = frozenset(tokenizer.all_special_ids)
        if encoder:
            sep = tokenizer.sep_token_id
            cls_ = tokenizer.cls_token_id
            return cls(
                tuple(t for t in [cls_] if t is not None), tuple(t for t in [sep] if t is not None), sep, all_special
            )
        bos = tokenizer.bos_token_id
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
        return cls(tuple(t for t in [bos] if t is not None), (), eos, all_special)

    def frame(self, ids: Sequence[int]) -> list[int]:
        """One context as the model reads it: `prefix + ids + suffix` ([CLS] ids [SEP] or BOS ids)."""
        return [*self.prefix, *ids, *self.suffix]


@dataclass
class ContextBatch:
    """Packed contexts: `tokens`, `doc_id`, `position` and `special` are [n_contexts, context_length]."""

    tokens: np.ndarray
    doc_id: np.ndarray
    position: np.ndarray
    special: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def pack_contexts(
    docs: Iterable[str], tokenizer: Any, special: SpecialTokens, *, context_length: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens, doc_id) of each context, in order; the last partial context is dropped.

    Each context is `prefix + body + suffix`; the body concatenates documents, each followed by the
    separator. Framing tokens get doc_id -1.
    """
    body_len = context_length - len(special.prefix) - len(special.suffix)
    if body_len <= 0:
        raise TextSourceError(
            f"context_length {context_length} leaves no room for text; use at least {len(special.prefix) + len(special.suffix) + 1}"
        )
    prefix = np.array(special.prefix, dtype=np.int64)
    suffix = np.array(special.suffix, dtype=np.int64)
    frame = np.full(len(prefix), -1), np.full(len(suffix), -1)
    buf_tok: list[np.ndarray] = []
    buf_doc: list[np.ndarray] = []
    buffered = 0
    doc_index = 0
    it = iter(docs)
    while chunk := list(islice(it, TOKENIZE_BATCH)):
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for text_ids in ids:
            if text_ids:
                if special.separator is not None:
                    text_ids = [*text_ids, special.separator]
                buf_tok.append(np.asarray(text_ids, dtype=np.int64))
                buf_doc.append(np.full(len(text_ids), doc_index, dtype=np.int64))
                buffered += len(text_ids)
            doc_index += 1
        if buffered >= body_len:
            toks, dids = np.concatenate(buf_tok), np.concatenate(buf_doc)
            n_full = len(toks) // body_len
            for i in range(n_full):
                s = slice(i * body_len, (i + 1) * body_len)
                yield (
                    np.concatenate([prefix, toks[s], suffix]),
                    np.concatenate([frame[0], dids[s], frame[1]]),
                )
            rest = n_full * body_len
            buf_tok, buf_doc, buffered = [toks[rest:]], [dids[rest:]], len(toks) - rest


def batch_contexts(
    contexts: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int, special: SpecialTokens
) -> Iterator[ContextBatch]:
    """Group contexts into batches (the last one may be smaller)."""
    it = iter(contexts)
    while group := list(islice(it, batch_size)):
        tokens = np.stack([t for t, _ in group])
        doc_id = np.stack([d for _, d in group])
        position = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape).copy()
        special_mask = np.isin(tokens, list(special.all_special))
        yield ContextBatch(tokens, doc_id, position, special_mask)
