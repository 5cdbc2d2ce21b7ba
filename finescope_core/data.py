"""Data in: JSONL / JSON / Parquet / .txt / HF `save_to_disk` directories, local or any fsspec URI.

Every record keeps its original fields (and `id`, always a string, assigned stably when missing) so
that outputs can carry the user's records unchanged. Validation happens here, before any model work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from finescope_core.formats import REQUEST_FIELDS, DataError, iter_raw

MAX_TEXT_CHARS = 1_000_000
"""A record longer than this is refused: it is almost always a broken file (one giant line)."""
INSTRUCTION_FIELDS = ("instruction", "input", "output")
CHAT_ROLES = ("system", "user", "assistant")
RECORD_SHAPES = (
    "give each record 'text'; or 'instruction' (+ 'input', 'output'); or 'prompt' (+ 'completion'); "
    'or \'messages\' (a list of {"role": "system"|"user"|"assistant", "content": ...} turns)'
)
"""The supported record formats, as error messages list them."""


@dataclass(frozen=True)
class Record:
    """One input record: its id, the text the model reads, and the original fields.

    Consumers read a record only through `text`, `prompt` and `reference`, whatever its format.
    """

    id: str
    text: str
    """What curation embeds: `text`, else every part of the record (request and answer) joined."""
    fields: dict[str, Any]
    origin: str
    """Where it came from, as `file:line` (or `file:row N`), for error messages."""

    @property
    def prompt(self) -> str | None:
        """The user's request (what a teacher answers), or None for a plain `text` record.

        Empty when an instruction record's instruction and input (or a prompt) are blank.
        """
        return record_parts(self.fields, self.origin).prompt

    @property
    def reference(self) -> str | None:
        """The reference answer (`output`, `completion`, final assistant turns), if any and not blank."""
        return record_parts(self.fields, self.origin).reference


@dataclass
class RecordSet:
    """Validated records from one or more inputs, with a content hash over ids and texts."""

    records: list[Record]
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.records]

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for r in self.records:
            h.update(json.dumps([r.id, r.text, r.fields], sort_keys=True, default=str).encode())
            h.update(b"\n")
        return h.hexdigest()


@dataclass(frozen=True)
class RecordParts:
    """A record's request, reference answer and text, whatever its format."""

    prompt: str | None
    reference: str | None
    text: str


def record_parts(fields: dict[str, Any], origin: str) -> RecordParts:
    """Request, reference and text of a record in any supported format.

    A `text` field is always the text; the request and reference come from the first of `messages`,
    `instruction` and `prompt` present, so a record may carry both a text and a request. A null field
    counts as absent: Parquet and HF datasets fill every column, so mixed formats arrive as nulls.

    Raises:
        DataError: none of the supported fields, or a present one of the wrong shape.
    """
    shape = next((name for name in REQUEST_FIELDS if fields.get(name) is not None), None)
    has_text = "text" in fields and (fields["text"] is not None or shape is None)
    if shape is None and not has_text:
        found = ", ".join(sorted(fields)) or "none"
        raise DataError(
            f"{origin}: record has no 'text' and no 'instruction', 'prompt' or 'messages' field "
            f"(fields found: {found}); {RECORD_SHAPES}"
        )
    if shape == "messages":
        parts = _from_turns(_turns(fields["messages"], "messages", origin), "messages", origin)
    elif shape == "instruction":
        parts = _from_instruction(fields, origin)
    elif shape == "prompt":
        parts = _from_prompt(fields, origin)
    else:
        parts = RecordParts(None, None, "")
    if not has_text:
        return parts
    text = fields["text"]
    if not isinstance(text, str):
        raise DataError(f"{origin}: field 'text' must be a string, got {type(text).__name__}")
    return RecordParts(parts.prompt, parts.reference, text)


def _string_field(fields: dict[str, Any], name: str, origin: str) -> str | None:
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{origin}: field {name!r} must be a string, got {type(value).__name__}")
    return value.strip() if value is not None else None


def _join(*parts: str | None) -> str:
    return "\n\n".join(p for p in parts if p)


def _from_instruction(fields: dict[str, Any], origin: str) -> RecordParts:
    instruction, input_, output = (_string_field(fields, name, origin) for name in INSTRUCTION_FIELDS)
    return RecordParts(_join(instruction, input_), output or None, _join(instruction, input_, output))


def _from_prompt(fields: dict[str, Any], origin: str) -> RecordParts:
    """TRL's prompt-completion record: two strings, or two lists of chat turns (conversational)."""
    prompt, completion = fields["prompt"], fields.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list | None):
        turns = _turns(prompt, "prompt", origin) + _turns(completion or [], "completion", origin)
        return _from_turns(turns, "prompt", origin)
    if not isinstance(prompt, str) or not isinstance(completion, str | None):
        raise DataError(
            f"{origin}: 'prompt' and 'completion' must both be strings or both lists of chat turns, got "
            f"{type(prompt).__name__} and {type(completion).__name__}"
        )
    prompt, completion = prompt.strip(), (completion or "").strip()
    return RecordParts(prompt, completion or None, _join(prompt, completion))


Turn = tuple[str, str]
"""(role, content) of one chat turn."""


def _turns(value: Any, name: str, origin: str) -> list[Turn]:
    """Validated (role, content) turns of a chat field (`messages`, or a conversational prompt)."""
    if not isinstance(value, list):
        raise DataError(
            f'{origin}: field {name!r} must be a list of {{"role": ..., "content": ...}} turns, '
            f"got {type(value).__name__}"
        )
    turns = []
    for i, turn in enumerate(value):
        where = f"{origin}: {name}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where} must be an object with 'role' and 'content', got {type(turn).__name__}")
        role, content = turn.get("role"), turn.get("content")
        if role not in CHAT_ROLES:
            raise DataError(
                f"{where} has role {role!r}; use 'system', 'user' or 'assistant' (drop tool turns, or fold "
                "what they say into a user or assistant turn)"
            )
        if not isinstance(content, str):
            raise DataError(
                f"{where} ({role}): 'content' must be a string, got {type(content).__name__}; join "
                "multi-part content into one string"
            )
        turns.append((role, content.strip()))
    return turns


def _from_turns(turns: list[Turn], name: str, origin: str) -> RecordParts:
    """Request: the conversation up to its last user turn; reference: the assistant turns after it.

    The teacher and the student take one user turn (`teacher.format_prompt`), so system turns come
    first as plain paragraphs and earlier turns of a longer conversation as a labelled transcript.
    """
    if not turns:
        raise DataError(
            f"{origin}: field {name!r} is empty; give at least one user turn or remove the record"
        )
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    if not users:
        raise DataError(
            f"{origin}: {name!r} has no user turn, so there is no request; add one or remove the record"
        )
    last = users[-1]
    if not turns[last][1]:
        raise DataError(
            f"{origin}: the last user turn ({name}[{last}]) is empty; fill it in or remove the record"
        )
    system = [content for role, content in turns[: last + 1] if role == "system"]
    dialogue = [(role, content) for role, content in turns[: last + 1] if role != "system" and content]
    if len(dialogue) == 1:
        request = [dialogue[0][1]]
    else:
        request = [f"{role.capitalize()}: {content}" for role, content in dialogue]
    reference = _join(*(content for role, content in turns[last + 1 :] if role == "assistant"))
    return RecordParts(_join(*system, *request), reference or None, _join(*(content for _, content in turns)))


def shown_text(fields: dict[str, Any]) -> str:
    """What a table of records shows for one (curated.jsonl row or input fields): its text, else its
    request."""
    text = fields.get("text")
    if isinstance(text, str):
        return text
    try:
        return record_parts(fields, "").prompt or ""
    except DataError:  # a row written by another version: show nothing rather than fail a report
        return ""


def record_text(fields: dict[str, Any], origin: str) -> str:
    """The text a model reads for a record (see `record_parts`), validated.

    Raises:
        DataError: none of the supported fields, wrong types or shapes, empty or enormous text.
    """
    text = record_parts(fields, origin).text
    if not text.strip():
        raise DataError(f"{origin}: the record's text is empty; remove the record or fill it in")
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(
            f"{origin}: the record is {len(text):,} characters (limit {MAX_TEXT_CHARS:,}); "
            "is the file one giant line? split it into records"
        )
    return text


def load_records(
    uris: Sequence[str], *, role: str, storage_options: dict[str, Any] | None = None
) -> RecordSet:
    """Read and validate all records behind `uris`.

    Args:
        uris: files, globs, HF dataset dirs; local paths or fsspec URIs.
        role: what these inputs are ("seeds", "corpus"), used in error messages.

    Raises:
        DataError: missing/empty/malformed inputs, bad records, duplicate ids — naming file and line.
    """
    if not uris:
        raise DataError(f"no {role} given; list at least one file under `{role}:` in the config")
    records: list[Record] = []
    seen: dict[str, str] = {}
    for uri in uris:
        count_before = len(records)
        for index, (fields, origin, stem) in enumerate(iter_raw(uri, storage_options)):
            records.append(_make_record(fields, origin, f"{stem}-{index:06d}", seen))
        if len(records) == count_before:
            raise DataError(
                f"{uri}: contains no records ({role}); add records or remove it from `{role}:` in the config"
            )
    return RecordSet(records=records, sources=list(uris))


def _make_record(fields: dict[str, Any], origin: str, default_id: str, seen: dict[str, str]) -> Record:
    text = record_text(fields, origin)
    raw_id = fields.get("id")
    if raw_id is None:
        rid = default_id
    elif isinstance(raw_id, str | int) and not isinstance(raw_id, bool) and str(raw_id).strip():
        rid = str(raw_id)
    else:
        raise DataError(f"{origin}: 'id' must be a non-empty string or integer, got {raw_id!r}")
    # The id is a string everywhere from here on (fields, outputs, look-ups): integer ids are the norm in
    # JSONL and HF exports, and an int in the fields would not match `Record.id` when read back.
    fields = {"id": rid, **fields} if raw_id is None else {**fields, "id": rid}
    if rid in seen:
        raise DataError(
            f"{origin}: duplicate id {rid!r} (first at {seen[rid]}); ids must be unique across all inputs"
        )
    seen[rid] = origin
    return Record(id=rid, text=text, fields=fields, origin=origin)


def normalise_text(text: str) -> str:
    """Whitespace- and case-insensitive form used to spot exact duplicates."""
    return " ".join(text.split()).casefold()


@dataclass(frozen=True)
class PreparedCorpus:
    """The corpus with exact duplicates taken out (the first copy stays), and the ids taken out."""

    corpus: RecordSet
    dropped_duplicates: list[str]


def deduplicate(corpus: RecordSet) -> PreparedCorpus:
    """Remove exact duplicates (whitespace- and case-insensitive); independent of any seeds."""
    seen: set[str] = set()
    kept: list[Record] = []
    duplicates: list[str] = []
    for r in corpus.records:
        key = normalise_text(r.text)
        if key in seen:
            duplicates.append(r.id)
        else:
            seen.add(key)
            kept.append(r)
    return PreparedCorpus(RecordSet(kept, corpus.sources), duplicates)


def seed_copies(corpus: RecordSet, seeds: RecordSet) -> list[int]:
    """Rows of corpus records whose text is a seed's: they must never be "retrieved"."""
    seed_texts = {normalise_text(r.text) for r in seeds.records}
    return [i for i, r in enumerate(corpus.records) if normalise_text(r.text) in seed_texts]


def check_sizes(usable: int, *, needed: int, what: str) -> None:
    """Refuse a corpus with fewer usable records than a stage asks for."""
    if usable < needed:
        raise DataError(
            f"the corpus has {usable} usable records (after removing duplicates, copies of seeds and "
            f"records held out for evaluation) but {what} asks for {needed}; lower {what} or add corpus "
            "records"
        )
