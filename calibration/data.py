"""Calibration text and token batches: which documents, in which order, cut into which rows.

Sources (never an evaluation split):

* ``aclsum`` (default): the **train** split of ACLSum, each paper's abstract + introduction + conclusion (the
  abstract alone is too short to fill many rows), read through :mod:`calibration.datasets`, so it works offline.
* ``cnn_dailymail``: the train split's articles, as TensorRT-LLM's own calibration does (Hub or local
  ``datasets`` cache; offline without a cache it is a one-line error).
* a local file: ``.txt`` (one document per blank-line-separated block; a file without blank lines is one
  document) or ``.jsonl``/``.json``/``.parquet``/``.csv`` (or a ``save_to_disk`` folder) with a text column,
  found among ``text``/``article``/``document``/``input`` unless ``text_column`` names it.

Documents are visited in a permutation seeded with ``seed``, tokenized without special tokens and concatenated
with the tokenizer's EOS id between documents; the stream is cut into ``num_samples`` full rows of ``seq_len``
real tokens (no padding, so every position the model sees is real text and every statistic counts real tokens).
Only as many documents are tokenized as the rows need.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator

from pydantic import ConfigDict, Field, StrictInt, StrictStr
from pydantic.dataclasses import dataclass

from calibration.datasets import load_local_table, load_samples
from quant.errors import UserError, one_line_errors, positive_int, seed_int

if TYPE_CHECKING:
    import torch

KNOWN_SOURCES = ("aclsum", "cnn_dailymail")
DEFAULT_SOURCE = "aclsum"
ACLSUM_CALIB_SECTIONS = ("abstract", "introduction", "conclusion")
CALIB_SPLIT = "train"  # the only split calibration ever reads
TEXT_COLUMNS = ("text", "article", "document", "input")  # auto-detected in this order
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
KEY_VERSION = "calib-v1"  # bump when the way documents become rows changes: old cache entries then miss

_FETCH_CHUNK = 64  # rows fetched at a time from a table source


# ---------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class CalibSpec:
    """Everything that decides the calibration tokens (together with the tokenizer, i.e. the model).

    Declared fields with their types and bounds (checked by pydantic, reported as one-line UserErrors); whether
    the source exists is checked in ``__post_init__``. ``key`` is a stable string for cache keys; for a local
    file it holds a hash of the file's bytes (not its path), so editing the file in place changes the key and
    moving it does not.
    """

    source: StrictStr = DEFAULT_SOURCE
    num_samples: Annotated[StrictInt, Field(gt=0)] = 32
    seq_len: Annotated[StrictInt, Field(gt=0)] = 256
    seed: Annotated[StrictInt, Field(ge=0)] = 0
    text_column: StrictStr | None = None

    _one_line = one_line_errors(lambda cls, errors: _spec_error(cls, errors[0]))

    def __post_init__(self) -> None:
        _check_source(self.source)

    @cached_property
    def source_id(self) -> str:
        """What the source *is*, independent of where it lies: a name + split + sections, or a content hash."""
        if self.source == "aclsum":
            return f"aclsum:{CALIB_SPLIT}:{'+'.join(ACLSUM_CALIB_SECTIONS)}"
        if self.source == "cnn_dailymail":
            return f"cnn_dailymail:3.0.0:{CALIB_SPLIT}"
        path = Path(self.source).expanduser()
        kind = "dir" if path.is_dir() else path.suffix.lower()
        return f"file{kind}:sha256={_hash_path(path)[:24]}"

    @property
    def key(self) -> str:
        return (
            f"{KEY_VERSION}|source={self.source_id}|column={self.text_column or 'auto'}"
            f"|samples={self.num_samples}|seq_len={self.seq_len}|seed={self.seed}"
        )

    @property
    def key_hash(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()[:12]

    @property
    def num_tokens(self) -> int:
        return self.num_samples * self.seq_len

    def to_dict(self) -> dict:
        return {**asdict(self), "key": self.key}

    def batches(self, tokenizer) -> "torch.Tensor":
        return calibration_batches(
            tokenizer, source=self.source, num_samples=self.num_samples, seq_len=self.seq_len, seed=self.seed,
            text_column=self.text_column,
        )


def _spec_error(cls, e: dict) -> str:
    names = list(cls.__dataclass_fields__)
    name = names[e["loc"][0]] if isinstance(e["loc"][0], int) else e["loc"][0]
    must = {"source": "must be a name or a path", "seed": "must be an integer >= 0",
            "text_column": "must be a column name"}.get(name, "must be a positive integer")
    if e["type"] == "unexpected_keyword_argument":
        must = f"is not a calibration setting (known: {', '.join(names)})"
    return f"calibration {name} {must}, got {e['input']!r}"


def _check_source(source: str) -> None:
    if not isinstance(source, str) or not source:
        raise UserError(f"calibration source must be a name or a path, got {source!r}")
    if source in KNOWN_SOURCES:
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(
            f"unknown calibration source {source!r}: not one of {', '.join(KNOWN_SOURCES)} and no such file or folder"
        )
    if path.is_file() and path.suffix.lower() not in (".txt", *TABLE_SUFFIXES):
        raise UserError(
            f"cannot calibrate on {source}: expected a .txt, {', '.join(TABLE_SUFFIXES)} file or a save_to_disk folder"
        )


def _hash_path(path: Path) -> str:
    """sha256 of a file's bytes, or of every file (relative name + bytes) under a folder."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    try:
        for file in files:
            if file is not path:
                digest.update(str(file.relative_to(path)).encode() + b"\0")
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    except OSError as exc:
        raise UserError(f"cannot read calibration source {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- documents


def iter_documents(source: str = DEFAULT_SOURCE, *, seed: int = 0, text_column: str | None = None) -> Iterator[str]:
    """The source's documents (non-blank texts) in the order seeded by ``seed``, read lazily where it matters."""
    _check_source(source)
    if source == "aclsum":
        yield from _aclsum_documents(seed)
    elif source == "cnn_dailymail":
        yield from _cnn_documents(seed)
    else:
        path = Path(source).expanduser()
        if path.is_file() and path.suffix.lower() == ".txt":
            yield from _txt_documents(path, seed)
        else:
            yield from _table_documents(path, seed, text_column)


def _aclsum_documents(seed: int) -> Iterator[str]:
    samples = load_samples(
        "aclsum", split=CALIB_SPLIT, num_samples=None, seed=seed, aclsum_sections=ACLSUM_CALIB_SECTIONS
    )
    for sample in samples:
        if sample.article.strip():
            yield sample.article


def _cnn_documents(seed: int) -> Iterator[str]:
    """Train articles in load_samples' seeded order; a larger request with the same seed extends a smaller one."""
    done, wanted = 0, _FETCH_CHUNK
    while True:
        samples = load_samples("cnn_dailymail", split=CALIB_SPLIT, num_samples=wanted, seed=seed)
        for sample in samples[done:]:
            yield sample.article
        if len(samples) < wanted:
            return  # the split is exhausted
        done, wanted = len(samples), wanted * 2


def _txt_documents(path: Path, seed: int) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    documents = split_paragraph_blocks(text)
    random.Random(seed).shuffle(documents)
    yield from documents


def split_paragraph_blocks(text: str) -> list[str]:
    """Blank-line-separated blocks, each stripped; a text without blank lines is one block."""
    blocks: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current).strip())
            current = []
    if current:
        blocks.append("\n".join(current).strip())
    return [b for b in blocks if b]


def _table_documents(path: Path, seed: int, text_column: str | None) -> Iterator[str]:
    dataset = load_local_table(path, CALIB_SPLIT)
    column = resolve_text_column(list(dataset.column_names), text_column, str(path))
    feature = dataset.features[column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserError(f"{path}: column {column!r} holds {feature}, not text")
    dataset = dataset.select_columns([column])
    order = list(range(dataset.num_rows))
    random.Random(seed).shuffle(order)  # the same seeded permutation calibration.datasets uses
    for start in range(0, len(order), _FETCH_CHUNK):
        for text in dataset[order[start : start + _FETCH_CHUNK]][column]:
            if isinstance(text, str) and text.strip():
                yield text


def resolve_text_column(columns: list[str], text_column: str | None, source: str) -> str:
    if text_column is not None:
        if text_column not in columns:
            raise UserError(f"{source} has no column {text_column!r}; columns: {', '.join(columns)}")
        return text_column
    for candidate in TEXT_COLUMNS:
        if candidate in columns:
            return candidate
    raise UserError(
        f"{source}: no text column among {', '.join(TEXT_COLUMNS)} (columns: {', '.join(columns)}); "
        "name the column to calibrate on (--text-column)"
    )


# ------------------------------------------------------------------------------------------- tokens


def eos_id(tokenizer) -> int:
    value = getattr(tokenizer, "eos_token_id", None)
    if value is None:
        raise UserError("the tokenizer has no EOS token to separate calibration documents")
    return int(value)


def calibration_tokens(
    tokenizer, *, source: str = DEFAULT_SOURCE, seed: int = 0, text_column: str | None = None,
    max_tokens: int | None = None,
) -> list[int]:
    """The token stream: documents in seeded order, EOS between them; stops once ``max_tokens`` are reached."""
    separator = eos_id(tokenizer)
    stream: list[int] = []
    for document in iter_documents(source, seed=seed, text_column=text_column):
        ids = _encode(tokenizer, document)
        if not ids:
            continue
        if stream:
            stream.append(separator)
        stream.extend(ids)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    return stream


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: a long article is not an error here ("sequence length is longer than ..." warnings).
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def calibration_batches(
    tokenizer, *, source: str = DEFAULT_SOURCE, num_samples: int = 32, seq_len: int = 256, seed: int = 0,
    text_column: str | None = None,
) -> "torch.Tensor":
    """``LongTensor [num_samples, seq_len]`` of real tokens cut from the seeded document stream."""
    import torch

    spec = CalibSpec(source, num_samples, seq_len, seed, text_column)  # validates the numbers and the source
    needed = spec.num_tokens
    stream = calibration_tokens(tokenizer, source=source, seed=seed, text_column=text_column, max_tokens=needed)
    if len(stream) < needed:
        raise UserError(
            f"calibration source {source} has only {len(stream)} tokens; {num_samples} samples x {seq_len} tokens "
            f"need {needed}: lower --calib-samples/--calib-seq-len or use a larger source"
        )
    return torch.tensor(stream[:needed], dtype=torch.long).view(num_samples, seq_len)


# --------------------------------------------------------------------------------------------- flags


def add_calib_args(parser, *, standalone: bool = False) -> None:
    """The calibration flags, spelled the same in every CLI; defaults are :class:`CalibSpec`'s own.

    ``standalone`` (``python -m calibration``) adds ``--text-column`` and that CLI's old spellings ``--source``
    and ``--seed``, kept as aliases for a release (elsewhere ``--seed`` is the search's own flag)."""
    d = CalibSpec.__dataclass_fields__
    old = (lambda flag: [flag]) if standalone else (lambda flag: [])
    g = parser.add_argument_group("calibration")
    g.add_argument("--calib-source", *old("--source"), dest="calib_source", default=d["source"].default,
                   help="aclsum (train split) | cnn_dailymail (train) | a text/jsonl/parquet/csv file or folder")
    if standalone:
        g.add_argument("--text-column", default=None, help="column holding the text of a table file (default: auto)")
    g.add_argument("--calib-samples", type=positive_int, default=d["num_samples"].default, help="calibration rows")
    g.add_argument("--calib-seq-len", type=positive_int, default=d["seq_len"].default,
                   help="tokens per calibration row")
    g.add_argument("--calib-seed", *old("--seed"), dest="calib_seed", type=seed_int, default=d["seed"].default,
                   help="which calibration documents are drawn, in which order")


def calib_spec_from_args(args) -> CalibSpec:
    return CalibSpec(source=args.calib_source, num_samples=args.calib_samples, seq_len=args.calib_seq_len,
                     seed=args.calib_seed, text_column=getattr(args, "text_column", None))
