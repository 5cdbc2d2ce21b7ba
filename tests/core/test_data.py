import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finescope_core.data import DataError, check_sizes, deduplicate, load_records, seed_copies


def write(path: Path, lines: list[str] | str | bytes) -> str:
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text(lines if isinstance(lines, str) else "\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_text_and_instruction_records_keep_fields_and_ids(tmp_path):
    p = write(tmp_path / "c.jsonl", [
        json.dumps({"id": "a", "text": "hello"}),
        json.dumps({"instruction": "Add", "input": "1 and 2", "output": "3", "extra": 7}),
    ])
    rs = load_records([p], role="corpus")
    assert [r.id for r in rs.records] == ["a", "c-000001"]
    assert rs.records[1].text == "Add\n\n1 and 2\n\n3"
    assert rs.records[1].fields["extra"] == 7 and rs.records[1].fields["id"] == "c-000001"
    assert rs.records[1].reference == "3"


def test_integer_ids_become_strings_in_the_record_and_its_fields(tmp_path):
    p = write(tmp_path / "c.jsonl", [json.dumps({"id": 7, "text": "a"}), json.dumps({"id": "8", "text": "b"})])
    rs = load_records([p], role="corpus")
    assert [r.id for r in rs.records] == ["7", "8"]
    assert [r.fields["id"] for r in rs.records] == ["7", "8"]
    pq.write_table(pa.Table.from_pylist([{"id": 1, "text": "x"}, {"id": 2, "text": "y"}]), tmp_path / "d.parquet")
    assert [r.fields["id"] for r in load_records([str(tmp_path / "d.parquet")], role="corpus").records] == ["1", "2"]
    with pytest.raises(DataError, match="duplicate id '7'"):
        load_records([p, write(tmp_path / "e.jsonl", [json.dumps({"id": "7", "text": "z"})])], role="corpus")


def test_ids_are_stable_and_hash_changes_with_content(tmp_path):
    p = write(tmp_path / "c.txt", ["one", "", "two"])
    a, b = load_records([p], role="corpus"), load_records([p], role="corpus")
    assert [r.id for r in a.records] == ["c-000000", "c-000001"] and a.sha256 == b.sha256
    write(tmp_path / "c.txt", ["one", "three"])
    assert load_records([p], role="corpus").sha256 != a.sha256


def test_parquet_and_hf_dataset_dir(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"text": "x", "id": None}, {"text": "y", "id": "q"}]), tmp_path / "d.parquet")
    assert [r.id for r in load_records([str(tmp_path / "d.parquet")], role="corpus").records] == ["d-000000", "q"]
    import datasets

    datasets.Dataset.from_list([{"instruction": "i1"}, {"instruction": "i2"}]).save_to_disk(str(tmp_path / "hf"))
    rs = load_records([str(tmp_path / "hf")], role="corpus")
    assert rs.texts == ["i1", "i2"]


def test_glob_reads_every_match(tmp_path):
    write(tmp_path / "a.txt", ["1"])
    write(tmp_path / "b.txt", ["2"])
    assert load_records([str(tmp_path / "*.txt")], role="corpus").texts == ["1", "2"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": "broken"\n', "c.jsonl:2: malformed JSON"),
        ('{"text": "ok"}\n["a"]\n', "c.jsonl:2: each line must be a JSON object"),
        ('{"text": "ok"}\n{"prompt": "x"}\n', "c.jsonl:2: record has no 'text' and no 'instruction'"),
        ('{"text": "   "}\n', "c.jsonl:1: the record's text is empty"),
        ('{"text": 3}\n', "c.jsonl:1: field 'text' must be a string"),
        ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "c.jsonl:2: duplicate id 'a' (first at"),
        ('{"id": true, "text": "x"}\n', "'id' must be a non-empty string or integer"),
        ("", "c.jsonl: the file is empty"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    p = write(tmp_path / "c.jsonl", content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_records([p], role="corpus")


def test_non_utf8_missing_and_unsupported_inputs(tmp_path):
    p = write(tmp_path / "c.jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="c.jsonl:2: not valid UTF-8"):
        load_records([p], role="corpus")
    with pytest.raises(DataError, match="no such file"):
        load_records([str(tmp_path / "missing.jsonl")], role="corpus")
    with pytest.raises(DataError, match="unsupported file type .csv"):
        load_records([write(tmp_path / "x.csv", "a,b")], role="corpus")
    with pytest.raises(DataError, match="no seeds given"):
        load_records([], role="seeds")
    with pytest.raises(DataError, match="matches no file"):
        load_records([str(tmp_path / "*.parquet")], role="corpus")


def test_enormous_record_is_refused(tmp_path):
    p = write(tmp_path / "big.txt", "x" * 1_000_001)
    with pytest.raises(DataError, match="big.txt:1: the record is 1,000,001 characters"):
        load_records([p], role="corpus")


def test_deduplicate_and_seed_copies(tmp_path):
    seeds = load_records([write(tmp_path / "s.txt", ["What is 2+2?"])], role="seeds")
    corpus = load_records([write(tmp_path / "c.txt", ["what is  2+2?", "b", "B ", "c"])], role="corpus")
    prepared = deduplicate(corpus)
    assert prepared.corpus.texts == ["what is  2+2?", "b", "c"] and prepared.dropped_duplicates == ["c-000002"]
    assert seed_copies(prepared.corpus, seeds) == [0]
    with pytest.raises(DataError, match="has 3 usable records .* asks for 5"):
        check_sizes(len(prepared.corpus), needed=5, what="curate.final_size")
