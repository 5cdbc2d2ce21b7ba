"""The `metrics.json` document as pydantic models: what the evaluate stage writes and the report reads.

`{"models": {"base": {...}, "pruned": {...}, "tuned": {...}, ...}, "stage_seconds": {...}}`: one entry
per evaluated model (`evaluate_model`'s result), baselines such as "pruned-random" included; other
top-level keys pass as they are. Values are checked strictly (`True` is no count, `"0.5"` no accuracy),
and each wrong value reads `<dotted path>: must be <what>, got <value>`, as `metrics_schema_errors`
returns it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

_BAD_VALUE = "metric_value"
"""Error type of a value of the wrong kind or range; its message is already `must be ..., got ...`."""


def _expect(what: str) -> WrapValidator:
    """Report any failure of the wrapped type as `must be <what>, got <value>`, whatever pydantic said."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                _BAD_VALUE, "must be {what}, got {got}", {"what": what, "got": repr(value)}
            ) from None

    return WrapValidator(check)


def _not_null(what: str) -> BeforeValidator:
    """An optional metric is left out when it was not measured; an explicit null is a mistake."""

    def check(value: Any) -> Any:
        if value is None:
            raise PydanticCustomError(_BAD_VALUE, "must be {what}, got None", {"what": what})
        return value

    return BeforeValidator(check)


Perplexity = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False), _expect("a finite number > 0")]
Parameters = Annotated[int, Field(strict=True, gt=0), _expect("an integer > 0")]
Accuracy = Annotated[float, Field(strict=True, ge=0, le=1), _expect("a number in [0, 1]")]
OptionalAccuracy = Annotated[Accuracy | None, _not_null("a number in [0, 1]")]
Count = Annotated[int, Field(strict=True, gt=0), _expect("an integer > 0")]
OptionalCount = Annotated[Count | None, _not_null("an integer > 0")]


class EvalCounts(BaseModel):
    """`n`: how many examples each metric was computed on (after `evaluate.max_examples`)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Count] = Field(init=False)  # a count of any further metric

    perplexity: Count
    mc: OptionalCount = None
    numeric: OptionalCount = None


class ModelMetrics(BaseModel):
    """One model's metrics; the accuracies are present when their eval file was given."""

    model_config = ConfigDict(extra="allow")

    perplexity: Perplexity
    parameters: Parameters
    mc_accuracy: OptionalAccuracy = None
    mc_accuracy_norm: OptionalAccuracy = None
    numeric_exact_match: OptionalAccuracy = None
    n: EvalCounts | None = None


class ModelsByName(BaseModel):
    """The evaluated models: base, pruned and tuned always; baselines ("pruned-random", ...) as extras."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, ModelMetrics] = Field(init=False)

    base: ModelMetrics
    pruned: ModelMetrics
    tuned: ModelMetrics


class MetricsDocument(BaseModel):
    """The whole `metrics.json`; `stage_seconds` and any other top-level key are not checked."""

    model_config = ConfigDict(extra="allow")

    models: ModelsByName


REQUIRED_MODELS = tuple(ModelsByName.model_fields)
"""Models every metrics.json holds: ("base", "pruned", "tuned")."""


def metrics_schema_errors(metrics: Any) -> list[str]:
    """Problems with the shape of `metrics.json` (see `MetricsDocument`).

    Each model needs `perplexity` (a finite number > 0) and `parameters` (an int > 0); accuracies, when
    present, are numbers in [0, 1], and counts in `n` ints > 0. More models are allowed.

    Returns:
        One message per problem, naming the dotted path; empty when the metrics are well formed.
    """
    try:
        MetricsDocument.model_validate(metrics)
    except ValidationError as e:
        return [_message(err) for err in e.errors()]
    return []


def _message(err: ErrorDetails) -> str:
    """`<dotted path>: <what is wrong>` for one pydantic error."""
    loc = tuple(str(part) for part in err["loc"])
    if loc in ((), ("models",)):
        return "metrics: must be an object with a 'models' object"
    path = ".".join(loc)
    if err["type"] == "missing":
        return f"{path}: missing"
    if err["type"] == _BAD_VALUE:
        return f"{path}: {err['msg']}"
    if err["type"] == "model_type":
        return f"{path}: must be an object of metrics" if len(loc) == 2 else f"{path}: must be an object"
    return f"{path}: {err['msg']}, got {err.get('input')!r}"
