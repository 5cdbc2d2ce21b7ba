import json
import re
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
    p = write(
        tmp_path / "c.jsonl",
        [
            json.dumps({"id": "a", "text": "hello"}),
            json.dumps({"instruction": "Add", "input": "1 and 2", "output": "3", "extra": 7}),
        ],
    )
    rs = load_records([p], role="corpus")
    assert [r.id for r in rs.records] == ["a", "c-000001"]
    assert rs.records[1].text == "Add\n\n1 and 2\n\n3"
    assert rs.records[1].fields["extra"] == 7 and rs.records[1].fields["id"] == "c-000001"
    assert rs.records[1].reference == "3"


def test_integer_ids_become_strings_in_the_record_and_its_fields(tmp_path):
    p = write(
        tmp_path / "c.jsonl", [json.dumps({"id": 7, "text": "a"}), json.dumps({"id": "8", "text": "b"})]
    )
    rs = load_records([p], role="corpus")
    assert [r.id for r in rs.records] == ["7", "8"]
    assert [r.fields["id"] for r in rs.records] == ["7", "8"]
    pq.write_table(
        pa.Table.from_pylist([{"id": 1, "text": "x"}, {"id": 2, "text": "y"}]), tmp_path / "d.parquet"
    )
    assert [r.fields["id"] for r in load_records([str(tmp_path / "d.parquet")], role="corpus").records] == [
        "1",
        "2",
    ]
    with pytest.raises(DataError, match="duplicate id '7'"):
        load_records([p, write(tmp_path / "e.jsonl", [json.dumps({"id": "7", "text": "z"})])], role="corpus")


def load_one(tmp_path, record: dict):
    return load_records([write(tmp_path / "c.jsonl", [json.dumps(record)])], role="corpus").records[0]


def test_text_and_instruction_records_give_prompt_and_reference(tmp_path):
    plain = load_one(tmp_path, {"text": "A passage."})
    assert (plain.prompt, plain.reference, plain.text) == (None, None, "A passage.")
    ins = load_one(tmp_path, {"instruction": " Add ", "input": "1 and 2", "output": " 3 "})
    assert (ins.prompt, ins.reference) == ("Add\n\n1 and 2", "3")
    assert load_one(tmp_path, {"instruction": "Add", "output": "  "}).reference is None


def test_messages_record_prompt_is_the_conversation_up_to_the_last_user_turn(tmp_path):
    single = load_one(
        tmp_path,
        {
            "id": 3,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": " What is 2+2? "},
                {"role": "assistant", "content": "4", "weight": 1},
            ],
        },
    )
    assert single.id == "3" and single.fields["id"] == "3"
    assert (single.prompt, single.reference) == ("Be brief.\n\nWhat is 2+2?", "4")
    assert single.text == "Be brief.\n\nWhat is 2+2?\n\n4"
    multi = load_one(
        tmp_path,
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a prime."},
            ]
        },
    )
    assert multi.prompt == "User: Hi\n\nAssistant: Hello!\n\nUser: Name a prime." and multi.reference is None
    assert multi.text == "Hi\n\nHello!\n\nName a prime."


def test_prompt_completion_records_strings_and_conversational(tmp_path):
    pc = load_one(tmp_path, {"prompt": "The sky is", "completion": " blue."})
    assert (pc.prompt, pc.reference, pc.text) == ("The sky is", "blue.", "The sky is\n\nblue.")
    only = load_one(tmp_path, {"prompt": "Tell a joke."})
    assert (only.prompt, only.reference) == ("Tell a joke.", None)
    chat = load_one(
        tmp_path,
        {
            "prompt": [{"role": "user", "content": "Capital of France?"}],
            "completion": [{"role": "assistant", "content": "Paris."}],
        },
    )
    assert (chat.prompt, chat.reference) == ("Capital of France?", "Paris.")


def test_a_text_field_is_the_text_and_the_request_still_comes_from_the_record(tmp_path):
    r = load_one(
        tmp_path,
        {
            "text": "<user>Hi</user><bot>Yo</bot>",
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        },
    )
    assert (r.text, r.prompt, r.reference) == ("<user>Hi</user><bot>Yo</bot>", "Hi", "Yo")


def test_mixed_formats_in_one_parquet_file_arrive_as_nulls_and_still_load(tmp_path):
    rows = [
        {"text": "plain", "instruction": None, "messages": None},
        {"text": None, "instruction": "Add 1 and 2", "messages": None},
        {"text": None, "instruction": None, "messages": [{"role": "user", "content": "Hi"}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    rs = load_records([str(tmp_path / "m.parquet")], role="corpus")
    assert rs.texts == ["plain", "Add 1 and 2", "Hi"] and [r.prompt for r in rs.records] == [
        None,
        "Add 1 and 2",
        "Hi",
    ]


def test_json_array_file_and_jsonl_in_a_json_file(tmp_path):
    items = [{"id": 1, "instruction": "Add 1 and 2", "output": "3"}, {"text": "plain"}]
    rs = load_records([write(tmp_path / "a.json", json.dumps(items, indent=2))], role="corpus")
    assert [r.id for r in rs.records] == ["1", "a-000001"] and rs.texts == ["Add 1 and 2\n\n3", "plain"]
    assert [r.origin for r in rs.records] == [f"{tmp_path}/a.json:item 0", f"{tmp_path}/a.json:item 1"]
    rs = load_records([write(tmp_path / "l.json", [json.dumps(i) for i in items])], role="corpus")
    assert rs.texts == ["Add 1 and 2\n\n3", "plain"] and rs.records[1].origin.endswith("l.json:2")
    rs = load_records([write(tmp_path / "d.json", json.dumps({"data": items}, indent=1))], role="corpus")
    assert rs.texts == ["Add 1 and 2\n\n3", "plain"] and rs.records[0].origin.endswith("d.json:data item 0")
    rs = load_records([write(tmp_path / "one.json", json.dumps(items[0], indent=2))], role="corpus")
    assert rs.texts == ["Add 1 and 2\n\n3"]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": "hi"}, "c.jsonl:1: field 'messages' must be a list of"),
        ({"messages": ["hi"]}, "c.jsonl:1: messages[0] must be an object with 'role' and 'content', got str"),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            "c.jsonl:1: messages[0] has role 'tool'; use 'system', 'user'",
        ),
        ({"messages": [{"content": "x"}]}, "c.jsonl:1: messages[0] has role None"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
            "c.jsonl:1: messages[0] (user): 'content' must be a string, got list; join multi-part",
        ),
        (
            {"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "c.jsonl:1: 'messages' has no user turn",
        ),
        ({"messages": []}, "c.jsonl:1: field 'messages' is empty"),
        (
            {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]},
            "c.jsonl:1: the last user turn (messages[0]) is empty",
        ),
        (
            {"prompt": "x", "completion": 3},
            "c.jsonl:1: 'prompt' and 'completion' must both be strings or both lists",
        ),
        (
            {"prompt": [{"role": "user", "content": "x"}], "completion": "y"},
            "must both be strings or both lists",
        ),
        ({"instruction": "x", "input": 5}, "c.jsonl:1: field 'input' must be a string, got int"),
        ({"body": "x"}, "'prompt' (+ 'completion'); or 'messages' (a list of"),
    ],
)
def test_bad_chat_and_prompt_records_name_file_line_and_fix(tmp_path, record, message):
    p = write(tmp_path / "c.jsonl", [json.dumps(record)])
    with pytest.raises(DataError, match=re.escape(message)):
        load_records([p], role="corpus")


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"text": "a"},\n {"text": "b",}]', "c.json:2:15: malformed JSON (Expecting property name"),
        ('{"text": "a",\n "x": }', "c.json:2:7: malformed JSON"),
        ('[{"text": "a"}, "b"]', "c.json:item 1: each item of the array must be a JSON object, got str"),
        ('[{"text": "a"}]\n[{"text": "b"}]', "c.json:2:1: malformed JSON (Extra data"),
        ('{"text": "a"}\n{"text": "b"\n', "c.json:2: malformed JSON"),
        (
            '{"data": [{"text": "a"}, 3]}',
            "c.json:data item 1: each item of 'data' must be a JSON object, got int",
        ),
        ('"just a string"', "c.json: holds a JSON str; give a JSON array of record objects"),
        (b'[{"text": "a"},\n {"text": "\xff"}]', "c.json:2: not valid UTF-8"),
    ],
)
def test_bad_json_files_name_file_and_line_or_item(tmp_path, content, message):
    p = write(tmp_path / "c.json", content)
    with pytest.raises(DataError, match=re.escape(message)):
        load_records([p], role="corpus")


def test_ids_are_stable_and_hash_changes_with_content(tmp_path):
    p = write(tmp_path / "c.txt", ["one", "", "two"])
    a, b = load_records([p], role="corpus"), load_records([p], role="corpus")
    assert [r.id for r in a.records] == ["c-000000", "c-000001"] and a.sha256 == b.sha256
    write(tmp_path / "c.txt", ["one", "three"])
    assert load_records([p], role="corpus").sha256 != a.sha256


def test_parquet_and_hf_dataset_dir(tmp_path):
    pq.write_table(
        pa.Table.from_pylist([{"text": "x", "id": None}, {"text": "y", "id": "q"}]), tmp_path / "d.parquet"
    )
    assert [r.id for r in load_records([str(tmp_path / "d.parquet")], role="corpus").records] == [
        "d-000000",
        "q",
    ]
    import datasets

    datasets.Dataset.from_list([{"instruction": "i1"}, {"instruction": "i2"}]).save_to_disk(
        str(tmp_path / "hf")
    )
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
        ('{"text": "ok"}\n{"question": "x"}\n', "c.jsonl:2: record has no 'text' and no 'instruction'"),
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
    assert prepared.corpus.texts == ["what is  2+2?", "b", "c"] and prepared.dropped_duplicates == [
        "c-000002"
    ]
    assert seed_copies(prepared.corpus, seeds) == [0]
    with pytest.raises(DataError, match="has 3 usable records .* asks for 5"):
        check_sizes(len(prepared.corpus), needed=5, what="curate.final_size")
