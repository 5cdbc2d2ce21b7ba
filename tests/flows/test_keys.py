"""Cache keys cannot go stale: changing any config field changes the key of every stage that reads it,
and of no other stage; and every field is either read by a stage or listed with the reason it is not."""

from typing import Any, Literal, get_args, get_origin

import pytest
import torch
from pydantic import BaseModel, ValidationError

from finescope_core.config import FinescopeConfig
from finescope_core.curate import hooked_layers
from finescope_core.data import Record
from finescope_core.report import ReportSettings
from tasks.activations import activations_key, shard_key, shard_plan
from tasks.codes import codes_key
from tasks.context import RunContext
from tasks.data import records_key
from tasks.evaluate import evaluation_key
from tasks.finetune import tuned_key
from tasks.keys import UNKEYED, key_models
from tasks.prune import pruned_key
from tasks.recover import recovered_key
from tasks.report import report_key
from tasks.retrieve import curated_key, sentence_key
from tasks.sae import sae_groups, sae_key, sae_layers_key
from tasks.saliency import saliency_key
from tasks.teacher import distilled_key

BASE = FinescopeConfig(seeds=["s.jsonl"], corpus=["c.jsonl"])
MODEL_LAYERS = 12
ROWS = 10_000


def stage_keys(cfg: FinescopeConfig) -> dict[str, str]:
    """Every stage's key for `cfg`, on fixed input hashes, built by the functions the tasks call."""
    layers = hooked_layers(MODEL_LAYERS, cfg.curate)
    groups = [[layers[i] for i in g] for g in sae_groups(len(layers), cfg.orchestration.sae_layers_per_task)]
    record = [Record(id="r", text="t", fields={"id": "r", "text": "t"}, origin="x:1")]
    specs = [
        records_key("corpus", "c"),
        records_key("seeds", "s"),
        saliency_key(cfg.curate, RunContext.of(cfg), "m", "c", layers),
        activations_key(cfg.curate, RunContext.of(cfg), "m", "c", layers, "sal"),
        sae_key(cfg.curate, RunContext.of(cfg), "a", "sal"),
        curated_key(cfg.curate, RunContext.of(cfg), "c", "s", ["a", "b"], "sae"),
        sentence_key("c"),
        codes_key(cfg.curate, RunContext.of(cfg), "shard", "sae"),
        pruned_key(cfg.prune, RunContext.of(cfg), "m", "t"),
        recovered_key(cfg.recover, cfg.finetune, RunContext.of(cfg), "p", "teacher", "pool"),
        distilled_key(cfg.teacher, RunContext.of(cfg), "teacher", record),
        tuned_key(cfg.finetune, RunContext.of(cfg), "p", "d", "teacher"),
        evaluation_key(cfg.evaluate, RunContext.of(cfg), "m", {"domain": ["x"]}),
        report_key(ReportSettings.of(cfg), {"models": {}}, "cur", "p"),
    ]
    keys = {s.stage: s.key for s in specs}
    # Fanned-out stages: the keys of all their parts.
    keys["activation-shards"] = "+".join(
        shard_key(cfg.curate, RunContext.of(cfg), "m", "c", layers, "sal", start, stop).key
        for start, stop in shard_plan(ROWS, cfg.curate.shard_size)
    )
    keys["sae-layers"] = "+".join(
        sae_layers_key(cfg.curate, RunContext.of(cfg), "a", "sal", g).key for g in groups
    )
    return keys


def leaf_fields(model: type[BaseModel] = FinescopeConfig, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += leaf_fields(info.annotation, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", info.annotation))
    return out


def _get(cfg: BaseModel, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _candidates(annotation: Any, value: Any) -> list[Any]:
    """Valid-looking other values of a field, tried in order until the config accepts one."""
    if get_origin(annotation) is Literal:
        return [a for a in get_args(annotation) if a != value]
    args = [a for a in get_args(annotation) if a is not type(None)]
    literals = [a for a in args if get_origin(a) is Literal]
    if literals and len(args) > 1:  # a number or a keyword, e.g. int | Literal["auto"]
        return [a for a in (*get_args(literals[0]), 128, 64) if a != value]
    if get_origin(annotation) is list or (args and get_origin(args[0]) is list):
        inner = get_args(args[0] if args and get_origin(args[0]) is list else annotation)
        if inner and get_origin(inner[0]) is Literal:
            return [[a] for a in get_args(inner[0]) if [a] != value]
        return [[0, 1], ["x.jsonl"], (value or [])[:-1] or ["q_proj"]]
    if value is None and args:
        return {int: [1, 2], float: [0.5], bool: [True]}.get(args[0], ["x", "org/other", "http://h:1"])
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1]
    if isinstance(value, float):
        return [value * 0.5, value * 0.5 + 0.1, value + 0.1]
    return [f"{value}-x" if value else "x", "org/other", "http://h:1", "abc"]


PREFERRED = {"device": ["cpu" if torch.cuda.is_available() else "cuda"]}
"""Values tried first: `auto` resolves to one of the others here, and a key holds the resolved device kind."""


def changed(dotted: str, annotation: Any) -> tuple[Any, FinescopeConfig]:
    current = _get(BASE, dotted)
    raw = BASE.model_dump(mode="json")
    for value in [v for v in PREFERRED.get(dotted, []) + _candidates(annotation, current) if v != current]:
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
        try:
            return value, FinescopeConfig.model_validate(raw)
        except ValidationError:
            continue
    raise AssertionError(f"no valid other value found for {dotted}")


def readers(dotted: str) -> set[str]:
    return {
        m.STAGE for m in key_models() if any(dotted == r or dotted.startswith(r + ".") for r in m.reads())
    }


def unkeyed(dotted: str) -> bool:
    return any(dotted == u or dotted.startswith(u + ".") for u in UNKEYED)


FIELDS = leaf_fields()


@pytest.mark.parametrize(("dotted", "annotation"), FIELDS, ids=[f for f, _ in FIELDS])
def test_changing_a_field_changes_exactly_the_keys_of_the_stages_that_read_it(dotted, annotation):
    value, cfg = changed(dotted, annotation)
    before, after = stage_keys(BASE), stage_keys(cfg)
    moved = {stage for stage in before if before[stage] != after[stage]}
    assert moved == readers(dotted), f"{dotted} -> {value!r}"


@pytest.mark.parametrize(("dotted", "annotation"), FIELDS, ids=[f for f, _ in FIELDS])
def test_every_field_is_read_by_a_stage_or_says_why_not(dotted, annotation):
    assert bool(readers(dotted)) != unkeyed(dotted), (
        f"{dotted}: read by {sorted(readers(dotted))} and listed in tasks.keys.UNKEYED: {unkeyed(dotted)}"
    )


def test_every_key_field_comes_from_the_config_or_is_derived():
    for model in key_models():
        fields = set(model.model_fields) - {"inputs"}
        derived = fields - set(model.CONFIG)
        allowed = {"layers", "start", "stop", "device", "dtype"}
        assert derived <= allowed, f"{model.__name__}: {sorted(derived)} come from nowhere"
        for dotted in model.CONFIG.values():
            _get(BASE, dotted)  # names a real config field


def test_every_key_model_names_the_code_that_implements_it():
    """Each stage's key hashes its implementation: the listed modules exist, and the closure reaches beyond
    the task module into the library."""
    from finescope_core.code_identity import module_closure, module_file

    for model in key_models():
        assert model.CODE, f"{model.__name__}: no CODE modules"
        for name in model.CODE:
            module_file(name)  # raises for a module that does not exist
        closure = module_closure((model.__module__, *model.CODE))
        assert any(m.startswith("finescope_core.") for m in closure), model.__name__
