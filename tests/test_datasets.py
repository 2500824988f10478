import csv
import json
import re
from pathlib import Path

import pytest

from calibration.datasets import KNOWN_DATASETS, Sample, detokenize, load_samples
from quant.errors import UserError
from tests.conftest import aclsum_records
from tests.offline import offline_user_error

CNN_ROWS = [
    {"id": "a1", "article": "First article text.", "highlights": "First highlight.\nSecond highlight."},
    {"id": "b2", "article": "Second article text.", "highlights": "Another highlight."},
    {"id": "c3", "article": "", "highlights": "Has no article, so it is skipped."},
    {"id": "d4", "article": "Third article text.", "highlights": "Third highlight."},
]
USABLE_IDS = {"a1", "b2", "d4"}


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """The global datasets cache and the suite's cache point into the test's folder, to show that a local table
    writes into neither."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
    monkeypatch.setenv("QUANT_SUITE_CACHE", str(tmp_path / "suite-cache"))


def test_local_tables_stay_out_of_the_global_datasets_cache(tmp_path):
    for name, body in (("t.csv", "article,highlights\nOne article.,One summary.\n"),
                       ("t.jsonl", '{"article": "One article.", "highlights": "One summary."}\n')):
        (tmp_path / name).write_text(body, encoding="utf-8")
        assert len(load_samples(str(tmp_path / name), num_samples=1)) == 1
    for cache in ("hf_datasets_cache", "suite-cache"):
        assert not (tmp_path / cache).exists() or not any((tmp_path / cache).rglob("*")), cache


def raises_user_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------- aclsum


@pytest.mark.parametrize("split, size", [("train", 100), ("val", 50), ("test", 100)])
def test_aclsum_splits_have_their_published_sizes(split, size):
    samples = load_samples("aclsum", split=split, num_samples=None)
    assert len(samples) == size
    assert len({s.id for s in samples}) == size
    assert all(isinstance(s, Sample) and s.article and s.reference for s in samples)


def test_aclsum_sample_is_the_detokenized_abstract_and_the_three_summaries():
    record = aclsum_records("test")[0]
    (sample,) = [s for s in load_samples("aclsum", num_samples=None) if s.id == record["id"]]
    summary = record["summary"]
    assert sample.reference == f"{summary['challenge']} {summary['approach']} {summary['outcome']}"
    assert sample.article == " ".join(detokenize(s) for s in record["sentences"]["abstract"])
    # E09-1056, whose abstract opens with "Handling terminology is an important matter in a translation workflow ."
    assert sample.article.startswith("Handling terminology is an important matter in a translation workflow. However, ")


def test_aclsum_sections_are_joined_in_the_given_order():
    record = aclsum_records("val")[0]
    (sample,) = [
        s
        for s in load_samples("aclsum", split="val", num_samples=None, aclsum_sections=("conclusion", "abstract"))
        if s.id == record["id"]
    ]
    conclusion, abstract = sample.article.split("\n\n")
    assert conclusion == " ".join(detokenize(s) for s in record["sentences"]["conclusion"])
    assert abstract == " ".join(detokenize(s) for s in record["sentences"]["abstract"])


def test_real_abstracts_have_no_tokenizer_spacing_left():
    text = "\n".join(
        s.article for split in ("train", "val", "test") for s in load_samples("aclsum", split=split, num_samples=None)
    )
    # A space before closing punctuation that ends a word (".816" is a real token and keeps its space).
    assert not re.search(r" [,.;:?!)\]}%](?=\s|$)", text)
    assert not re.search(r"[(\[{] ", text)
    assert " n't" not in text and " 's " not in text


@pytest.mark.parametrize(
    "tokenized, expected",
    [
        (
            "However , current Machine Translation ( MT ) systems do not yet propose anything proactive .",
            "However, current Machine Translation (MT) systems do not yet propose anything proactive.",
        ),
        ("now , we have n't found any paper", "now, we haven't found any paper"),
        ("general MUC-based NER ca n't annotate", "general MUC-based NER can't annotate"),
        ("improve a model 's ability", "improve a model's ability"),
        (
            'the question " What did Alfred Nobel invent ? " and the candidate',
            'the question "What did Alfred Nobel invent?" and the candidate',
        ),
        ("to infuse users ' intentions into", "to infuse users' intentions into"),
        ("an attention weighted ' soft ' aligned input", "an attention weighted 'soft' aligned input"),
        ("as ' dogs ' and", "as 'dogs' and"),
        ("Morin et al . ( 2007 ) , for many", "Morin et al. (2007), for many"),
        ("Generation Network ( TPGN ): it embodies", "Generation Network (TPGN): it embodies"),
        ("by up to 20 % in MRR .", "by up to 20% in MRR."),
        ("nearly $ 1 billion", "nearly $1 billion"),
        ("citations [ 3 ] and { x }", "citations [3] and {x}"),
        # Ranges and dashes lost in PDF extraction stay as they are: they cannot be told apart safely.
        ("( down to 2 - 3 mm )", "(down to 2 - 3 mm)"),
        ("remains NP-hard -the authors", "remains NP-hard -the authors"),
        ("Passage / Sentence Retrieval", "Passage / Sentence Retrieval"),
        # A quotation that starts in the previous sentence: only the unambiguous quote is attached.
        ('" ) , an LM can predict', '"), an LM can predict'),
        ('Clean (text), with "quotes" and users\' things.', 'Clean (text), with "quotes" and users\' things.'),
        ("", ""),
    ],
)
def test_detokenize(tokenized, expected):
    assert detokenize(tokenized) == expected


def test_selection_is_seeded_reproducible_and_prefix_consistent():
    first = load_samples("aclsum", num_samples=10, seed=3)
    assert first == load_samples("aclsum", num_samples=10, seed=3)
    assert load_samples("aclsum", num_samples=25, seed=3)[:10] == first
    assert load_samples("aclsum", num_samples=None, seed=3)[:10] == first
    assert [s.id for s in load_samples("aclsum", num_samples=10, seed=4)] != [s.id for s in first]


def test_more_samples_than_available_gives_all_in_seeded_order():
    everything = load_samples("aclsum", split="val", num_samples=500, seed=1)
    assert len(everything) == 50
    assert everything == load_samples("aclsum", split="val", num_samples=None, seed=1)
    assert everything[:5] == load_samples("aclsum", split="val", num_samples=5, seed=1)


def test_aclsum_bad_split_and_section():
    message = raises_user_error("no split 'validation'", load_samples, "aclsum", split="validation", num_samples=1)
    assert "train, val, test" in message
    raises_user_error(
        "unknown aclsum section 'methods'", load_samples, "aclsum", num_samples=1, aclsum_sections=("methods",)
    )


# ------------------------------------------------------------------------------------- local files


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize(
    "writer, name", [(write_jsonl, "cnn.jsonl"), (write_parquet, "cnn.parquet"), (write_csv, "cnn.csv")]
)
def test_local_file_with_cnn_dailymail_schema_needs_no_column_flags(tmp_path, writer, name):
    path = writer(tmp_path / name, CNN_ROWS)
    samples = load_samples(str(path), num_samples=None)
    assert {s.id for s in samples} == USABLE_IDS  # the row with an empty article is skipped
    by_id = {s.id: s for s in samples}
    assert by_id["a1"] == Sample("a1", "First article text.", "First highlight.\nSecond highlight.")
    assert load_samples(str(path), num_samples=2, seed=5) == load_samples(str(path), num_samples=2, seed=5)


def test_save_to_disk_dataset_dict_picks_the_split(tmp_path):
    import datasets

    folder = tmp_path / "cnn_copy"
    datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_list(CNN_ROWS),
            "train": datasets.Dataset.from_list([{"id": "t", "article": "Train text.", "highlights": "Train."}]),
        }
    ).save_to_disk(str(folder))
    assert {s.id for s in load_samples(str(folder), num_samples=None)} == USABLE_IDS
    assert [s.id for s in load_samples(str(folder), split="train", num_samples=None)] == ["t"]
    message = raises_user_error("no split 'validation'", load_samples, str(folder), split="validation", num_samples=1)
    assert "test" in message and "train" in message


def test_save_to_disk_single_dataset_ignores_split(tmp_path):
    import datasets

    folder = tmp_path / "single"
    datasets.Dataset.from_list(CNN_ROWS).save_to_disk(str(folder))
    assert {s.id for s in load_samples(str(folder), split="anything", num_samples=None)} == USABLE_IDS


def test_other_known_column_pairs_and_row_index_ids(tmp_path):
    rows = [{"document": "Doc zero.", "summary": "Sum zero."}, {"document": "Doc one.", "summary": "Sum one."}]
    samples = load_samples(str(write_jsonl(tmp_path / "xsum.jsonl", rows)), num_samples=None)
    assert sorted(samples, key=lambda s: s.id) == [
        Sample("0", "Doc zero.", "Sum zero."),
        Sample("1", "Doc one.", "Sum one."),
    ]


def test_explicit_columns(tmp_path):
    rows = [{"id": 7, "body": "Body text.", "tldr": "Short.", "summary": "Other."}]
    path = str(write_jsonl(tmp_path / "custom.jsonl", rows))
    explicit = load_samples(path, num_samples=1, input_column="body", reference_column="tldr")
    assert explicit == [Sample("7", "Body text.", "Short.")]
    # With one flag given, the other comes from the known pairs.
    assert load_samples(path, num_samples=1, input_column="body") == [Sample("7", "Body text.", "Other.")]


def test_missing_named_column_is_named(tmp_path):
    path = str(write_jsonl(tmp_path / "cnn.jsonl", CNN_ROWS))
    message = raises_user_error("no column 'story'", load_samples, path, num_samples=1, input_column="story")
    assert "--input-column" in message and "article" in message and "highlights" in message


def test_unrecognised_columns_are_listed(tmp_path):
    path = str(write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}]))
    message = raises_user_error("cannot tell which columns", load_samples, path, num_samples=1)
    assert "question, answer" in message and "--input-column" in message


def test_non_text_column_is_rejected(tmp_path):
    path = str(write_jsonl(tmp_path / "nums.jsonl", [{"article": 1, "highlights": "h"}]))
    raises_user_error("column 'article' holds", load_samples, path, num_samples=1)


@pytest.mark.parametrize(
    "name, content",
    [("empty.jsonl", ""), ("header.csv", "id,article,highlights\n"), ("blank.jsonl", "\n\n")],
)
def test_files_without_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    raises_user_error(r"is empty|has no rows", load_samples, str(path), num_samples=1)


def test_parquet_without_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"article": pa.array([], pa.string()), "highlights": pa.array([], pa.string())}), path)
    raises_user_error("has no rows", load_samples, str(path), num_samples=1)


def test_file_whose_rows_are_all_unusable(tmp_path):
    rows = [
        {"article": "", "highlights": "h"},
        {"article": "a", "highlights": None},
        {"article": "  ", "highlights": "h"},
    ]
    path = str(write_jsonl(tmp_path / "unusable.jsonl", rows))
    raises_user_error("no rows with both an input and a reference", load_samples, path, num_samples=5)


def test_malformed_and_unsupported_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n", encoding="utf-8")
    raises_user_error(r"bad.jsonl: line 1 is not JSON \(Expecting property name", load_samples, str(bad), num_samples=1)
    bad.write_bytes(b'{"article": "caf\xe9", "highlights": "x"}\n')  # Latin-1, not UTF-8
    raises_user_error("bad.jsonl: line 1 is not valid UTF-8", load_samples, str(bad), num_samples=1)
    bad.write_text('{"article": "a", "highlights": "b"}\n[1, 2]\n', encoding="utf-8")
    raises_user_error("bad.jsonl: line 2 is a JSON list, not an object", load_samples, str(bad), num_samples=1)
    csv = tmp_path / "bad.csv"
    csv.write_bytes(b"article,highlights\ncaf\xe9,x\n")
    raises_user_error("bad.csv: line 2 is not valid UTF-8", load_samples, str(csv), num_samples=1)
    other = tmp_path / "data.txt"
    other.write_text("text", encoding="utf-8")
    raises_user_error("cannot read .*data.txt", load_samples, str(other), num_samples=1)
    raises_user_error("not one written by datasets' save_to_disk", load_samples, str(tmp_path), num_samples=1)


# ------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("num_samples", [0, -3])
def test_num_samples_must_be_positive(num_samples):
    raises_user_error("--num-samples must be >= 1", load_samples, "aclsum", num_samples=num_samples)


def test_unknown_dataset_lists_known_names():
    message = raises_user_error("unknown dataset 'xsum'", load_samples, "xsum", num_samples=1)
    assert all(name in message for name in KNOWN_DATASETS)


def test_cnn_dailymail_bad_split():
    raises_user_error("no split 'val'", load_samples, "cnn_dailymail", split="val", num_samples=1)


def test_cnn_dailymail_offline_is_a_user_error(tmp_path, monkeypatch):
    message = offline_user_error(tmp_path, monkeypatch, "from calibration.datasets import load_samples",
                                 "load_samples('cnn_dailymail', num_samples=1)").strip()
    assert "\n" not in message
    assert "could not load cnn_dailymail" in message and "local copy" in message
