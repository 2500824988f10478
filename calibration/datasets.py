"""Summarization datasets for the accuracy experiments, as ``(id, article, reference)`` samples.

Why this module exists: every experiment must score the *same* articles for a given
``(dataset, split, num_samples, seed)`` on whatever machine it runs, and must work without a network.

* ``aclsum`` (the default) ships its data inside the ``aclsum`` pip package, so it works offline. The package's
  ``__init__`` imports ``sienna``, which we do not install, so the data folder is located with
  ``importlib.util.find_spec`` and read directly, never imported.
* ``cnn_dailymail`` is what TensorRT-LLM's ``examples/summarize.py`` scores; it comes from the Hugging Face Hub
  (or the local ``datasets`` cache when offline).
* Any local copy — a ``.jsonl``/``.json``/``.parquet``/``.csv`` file or a ``save_to_disk`` folder — with
  recognisable columns, so that a machine without the Hub can still run ``cnn_dailymail`` from a copy.

Selection is a seeded permutation of the row indices whose first usable rows are kept, so a larger
``num_samples`` with the same seed extends a smaller one instead of drawing a different set.
"""
from __future__ import annotations

import importlib.util
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from quant.errors import UserError

KNOWN_DATASETS = ("aclsum", "cnn_dailymail")

ACLSUM_SPLITS = ("train", "val", "test")
ACLSUM_SECTIONS = ("abstract", "introduction", "conclusion")
# The order in which the three ACLSum aspect summaries form one reference summary.
_ACLSUM_ASPECTS = ("challenge", "approach", "outcome")

CNN_SPLITS = ("train", "validation", "test")

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# (input, reference) column pairs recognised without --input-column/--reference-column, in order of preference.
_COLUMN_PAIRS = (
    ("article", "highlights"),
    ("document", "summary"),
    ("input", "reference"),
    ("text", "summary"),
)


@dataclass(frozen=True)
class Sample:
    id: str
    article: str
    reference: str


def load_samples(
    name_or_path: str,
    *,
    split: str = "test",
    num_samples: int | None,
    seed: int = 0,
    input_column: str | None = None,
    reference_column: str | None = None,
    aclsum_sections: tuple[str, ...] = ("abstract",),
) -> list[Sample]:
    """Return up to ``num_samples`` samples (all when None) chosen by a permutation seeded with ``seed``.

    ``name_or_path`` is one of :data:`KNOWN_DATASETS` (a known name wins over a file of the same name; write
    ``./aclsum`` for the file) or a local file/folder. ``split`` picks the split of a named dataset or of a
    ``DatasetDict`` folder; a single file is one split and ignores it. Rows with an empty input or reference
    are skipped. Asking for more samples than there are usable rows gives all of them, without failing.
    """
    if num_samples is not None and num_samples < 1:
        raise UserError("--num-samples must be >= 1")
    if name_or_path == "aclsum":
        n_rows, fetch = _aclsum_table(split, aclsum_sections)
        source = f"aclsum {split}"
    else:
        if name_or_path == "cnn_dailymail":
            dataset = _load_cnn_dailymail(split)
            source = f"cnn_dailymail {split}"
        elif Path(name_or_path).exists():
            dataset = load_local_table(Path(name_or_path), split)
            source = name_or_path
        else:
            raise UserError(
                f"unknown dataset {name_or_path!r}: not one of {', '.join(KNOWN_DATASETS)} "
                "and no such file or folder"
            )
        n_rows, fetch = _hf_table(dataset, source, input_column, reference_column)
    return _select(n_rows, fetch, num_samples, seed, source)


def _select(
    n_rows: int, fetch: Callable[[list[int]], list[Sample]], num_samples: int | None, seed: int, source: str
) -> list[Sample]:
    """Walk a seeded permutation of all row indices and keep the first ``num_samples`` usable rows.

    Unusable rows are skipped *after* permuting, so whether a row is kept never depends on ``num_samples``:
    this is what makes a larger selection extend a smaller one with the same seed.
    """
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    wanted = n_rows if num_samples is None else num_samples
    samples: list[Sample] = []
    position = 0
    while len(samples) < wanted and position < n_rows:
        # Fetch only as many rows as still missing, so a small selection from a large split stays cheap.
        chunk = order[position : position + wanted - len(samples)]
        position += len(chunk)
        samples.extend(fetch(chunk))
    if not samples:
        raise UserError(f"{source} has no rows with both an input and a reference")
    return samples


def _usable(text: object) -> bool:
    return isinstance(text, str) and bool(text.strip())


# --------------------------------------------------------------------------------------------- aclsum


def _aclsum_table(split: str, sections: Sequence[str]) -> tuple[int, Callable[[list[int]], list[Sample]]]:
    if split not in ACLSUM_SPLITS:
        raise UserError(f"aclsum has no split {split!r}; splits: {', '.join(ACLSUM_SPLITS)}")
    if not sections:
        raise UserError(f"no aclsum section given; sections: {', '.join(ACLSUM_SECTIONS)}")
    unknown = [s for s in sections if s not in ACLSUM_SECTIONS]
    if unknown:
        raise UserError(f"unknown aclsum section {unknown[0]!r}; sections: {', '.join(ACLSUM_SECTIONS)}")
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the aclsum dataset is not installed; run: pip install --no-deps aclsum==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / "dataset" / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"the aclsum package has no {path}; reinstall it: pip install --no-deps aclsum==0.1.2")
    with path.open(encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    samples = [_aclsum_sample(record, sections) for record in records]

    def fetch(indices: list[int]) -> list[Sample]:
        return [samples[i] for i in indices if _usable(samples[i].article) and _usable(samples[i].reference)]

    return len(samples), fetch


def _aclsum_sample(record: dict, sections: Sequence[str]) -> Sample:
    # Sentences of one section read as a paragraph; a blank line keeps the sections apart for the model.
    article = "\n\n".join(
        " ".join(detokenize(sentence) for sentence in record["sentences"][section])
        for section in sections
        if record["sentences"][section]
    )
    reference = " ".join(record["summary"][aspect].strip() for aspect in _ACLSUM_ASPECTS)
    return Sample(id=str(record["id"]), article=article, reference=reference)


# A token made only of these characters belongs to the word before it: "workflow ." -> "workflow.",
# "( TPGN ):" -> "(TPGN):", "20 %" -> "20%", "etc ..." -> "etc...".
_CLOSING_CHARS = frozenset(",.;:?!%)]}")
_OPENING_CHARS = frozenset("([{")
# Penn-Treebank-style clitics split off their word: "don 't"/"do n't", "model 's", "you 're".
_CLITICS = frozenset({"'s", "'re", "'ve", "'m", "'ll", "'d", "n't"})


def detokenize(text: str) -> str:
    """Undo the space-separated tokenization of the ACLSum sentences.

    ``"However , current Machine Translation ( MT ) systems do n't work ."`` becomes
    ``"However, current Machine Translation (MT) systems don't work."``.

    Conservative by design: only spacing around punctuation is removed; nothing is merged that might have
    been two words. Left alone, because the data is ambiguous there: `` - `` and ``-word`` (en/em dashes
    lost in PDF extraction, e.g. ``NP-hard -the authors``, and ranges like ``2 - 3``), ``/``, ``&``, ``…``.
    Quotes are paired within the text: ``"`` alternately opens and closes when their number is even; with an
    odd number only the unambiguous ones (at an edge, or before closing punctuation) are attached. A lone
    ``'`` after a word ending in ``s`` is a plural possessive (``users ' intentions`` → ``users'``) unless it
    is needed to open a quoted span; other ``'`` pairs are single quotes. Text that is already normal is
    returned unchanged, apart from runs of whitespace becoming one space.
    """
    tokens = text.split()
    if not tokens:
        return ""
    glue_left = [False] * len(tokens)  # no space before token i
    glue_right = [False] * len(tokens)  # no space after token i
    for i, token in enumerate(tokens):
        if all(c in _CLOSING_CHARS for c in token) or token.lower() in _CLITICS:
            glue_left[i] = True
        elif all(c in _OPENING_CHARS for c in token):
            glue_right[i] = True
        elif token == "$" and i + 1 < len(tokens) and tokens[i + 1][:1].isdigit():
            glue_right[i] = True
    _mark_double_quotes(tokens, glue_left, glue_right)
    _mark_single_quotes(tokens, glue_left, glue_right)
    pieces = [tokens[0]]
    for i in range(1, len(tokens)):
        if not (glue_right[i - 1] or glue_left[i]):
            pieces.append(" ")
        pieces.append(tokens[i])
    return "".join(pieces)


def _is_closing(token: str) -> bool:
    return all(c in _CLOSING_CHARS for c in token)


def _mark_double_quotes(tokens: list[str], glue_left: list[bool], glue_right: list[bool]) -> None:
    quotes = [i for i, token in enumerate(tokens) if token == '"']
    if len(quotes) % 2 == 0:
        for k, i in enumerate(quotes):
            (glue_right if k % 2 == 0 else glue_left)[i] = True
        return
    # An odd count means a quotation crosses a sentence boundary, so alternation would pair the wrong quotes.
    last = len(tokens) - 1
    for i in quotes:
        if i == last or _is_closing(tokens[i + 1]):
            glue_left[i] = True
        elif i == 0 or all(c in _OPENING_CHARS for c in tokens[i - 1]):
            glue_right[i] = True


def _mark_single_quotes(tokens: list[str], glue_left: list[bool], glue_right: list[bool]) -> None:
    quotes = [i for i, token in enumerate(tokens) if token == "'"]
    inside = False
    for k, i in enumerate(quotes):
        after = len(quotes) - k - 1
        if inside:
            glue_left[i] = True
            inside = False
        elif i > 0 and tokens[i - 1][-1] in "sS" and after % 2 == 0:
            glue_left[i] = True  # plural possessive; any quotes after it still pair up
        elif after:
            glue_right[i] = True
            inside = True
        # else: a lone apostrophe that is neither; leave its spaces rather than guess.


# ------------------------------------------------------------------------------ Hugging Face datasets


def _load_cnn_dailymail(split: str):
    if split not in CNN_SPLITS:
        raise UserError(f"cnn_dailymail has no split {split!r}; splits: {', '.join(CNN_SPLITS)}")
    import datasets  # deferred: importing it takes about a second, and aclsum never needs it

    try:
        return datasets.load_dataset("abisee/cnn_dailymail", "3.0.0", split=split)
    except Exception as exc:  # network, Hub and cache failures all come out as assorted exception types
        raise UserError(
            f"could not load cnn_dailymail from the Hugging Face Hub ({_one_line(exc)}); "
            "pass a local copy instead: a .jsonl/.json/.parquet/.csv file or a save_to_disk folder"
        ) from exc


def load_local_table(path: Path, split: str):
    import datasets  # deferred: importing it takes about a second, and aclsum never needs it

    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise UserError(f"{path} is a folder but not one written by datasets' save_to_disk") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{path} has no split {split!r}; splits: {', '.join(loaded)}")
            return loaded[split]
        return loaded
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"cannot read {path}: expected one of {', '.join(_FILE_BUILDERS)} or a save_to_disk folder")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty")
    if builder == "parquet" and _parquet_row_count(path) == 0:
        raise UserError(f"{path} has no rows")  # datasets would only say "BatchSize must be greater than 0"
    if path.suffix.lower() == ".jsonl":
        try:
            return datasets.Dataset.from_list(_read_jsonl(path))
        except UserError:
            raise
        except Exception as exc:  # pyarrow: rows whose fields disagree in type
            raise UserError(f"could not read {path} as json lines: {_one_line(exc)}") from None
    if builder in ("json", "csv"):
        _check_utf8(path)
    try:
        # Read into memory through a throw-away cache folder: a local table leaves nothing in the user's global
        # datasets cache, nor in ours (not even after a parse error).
        with tempfile.TemporaryDirectory(prefix="quant-table-") as tmp:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=tmp,
                                         keep_in_memory=True)
    except ValueError as exc:
        # datasets' way of saying the file parsed but held no rows (a CSV header alone, "[]", blank lines).
        if "corresponds to no data" in str(exc):
            raise UserError(f"{path} has no rows") from None
        raise UserError(f"could not read {path} as {builder}: {_one_line(exc)}") from exc
    except Exception as exc:  # the parser's own error hides under DatasetGenerationError
        raise UserError(f"could not read {path} as {builder}: {_one_line(exc)}") from exc


def _read_jsonl(path: Path) -> list[dict]:
    """One JSON object per line; a bad line is named by its number (datasets only says the file failed)."""
    rows = []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}: line {number} is not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{path}: line {number} is not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object")
            rows.append(row)
    if not rows:
        raise UserError(f"{path} has no rows")
    return rows


def _check_utf8(path: Path) -> None:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}: line {number} is not valid UTF-8") from None


def _parquet_row_count(path: Path) -> int | None:
    """Rows recorded in a Parquet footer; None when the file is not Parquet (datasets then says why)."""
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_metadata(path).num_rows
    except (pyarrow.ArrowException, OSError):
        return None


def _hf_table(
    dataset, source: str, input_column: str | None, reference_column: str | None
) -> tuple[int, Callable[[list[int]], list[Sample]]]:
    columns = list(dataset.column_names)
    input_column, reference_column = _resolve_columns(columns, input_column, reference_column, source)
    for column in (input_column, reference_column):
        feature = dataset.features[column]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise UserError(f"{source}: column {column!r} holds {feature}, not text")
    wanted = [input_column, reference_column] + (["id"] if "id" in columns else [])
    dataset = dataset.select_columns(list(dict.fromkeys(wanted)))

    def fetch(indices: list[int]) -> list[Sample]:
        batch = dataset[indices]  # one Arrow read for the whole chunk, in the order given
        ids = batch["id"] if "id" in batch else [None] * len(indices)
        return [
            Sample(id=str(index if row_id is None else row_id), article=article, reference=reference)
            for index, row_id, article, reference in zip(indices, ids, batch[input_column], batch[reference_column])
            if _usable(article) and _usable(reference)
        ]

    return dataset.num_rows, fetch


def _resolve_columns(
    columns: list[str], input_column: str | None, reference_column: str | None, source: str
) -> tuple[str, str]:
    """Use the columns named by the flags; fill in whichever is missing from the first known pair present."""
    for flag, column in (("--input-column", input_column), ("--reference-column", reference_column)):
        if column is not None and column not in columns:
            raise UserError(f"{source} has no column {column!r} ({flag}); columns: {', '.join(columns)}")
    for known_input, known_reference in _COLUMN_PAIRS:
        candidate = (input_column or known_input, reference_column or known_reference)
        if all(c in columns for c in candidate):
            return candidate
    raise UserError(
        f"{source}: cannot tell which columns hold the input and the reference (columns: {', '.join(columns)}); "
        "pass --input-column and --reference-column"
    )


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line; for a wrapper (datasets' DatasetGenerationError) its direct cause's."""
    exc = exc.__cause__ or exc
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
