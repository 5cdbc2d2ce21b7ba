"""The `metrics.json` document as pydantic models: what the evaluate stage writes and the report reads.

`{"models": {"base": {...}, "pruned": {...}, "tuned": {...}, ...}, "comparisons": [...], "stage_seconds":
{...}}`: one entry per evaluated model (`evaluate_model`'s result), baselines such as "pruned-random"
included; `comparisons` (when the evaluations stored per-item numbers) the paired comparisons of
`finescope_core.evaluate.paired.comparisons`; other top-level keys pass as they are. Values are
checked strictly (`True` is no count, `"0.5"` no accuracy), and each wrong value reads
`<dotted path>: must be <what>, got <value>`, as `metrics_schema_errors` returns it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
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
OptionalPerplexity = Annotated[Perplexity | None, _not_null("a finite number > 0")]
Count = Annotated[int, Field(strict=True, gt=0), _expect("an integer > 0")]
OptionalCount = Annotated[Count | None, _not_null("an integer > 0")]


class EvalCounts(BaseModel):
    """`n`: how many examples each metric was computed on (after `evaluate.max_examples`)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Count] = Field(init=False)  # a count of any further metric

    perplexity: Count
    chat: OptionalCount = None
    general: OptionalCount = None
    mc: OptionalCount = None
    numeric: OptionalCount = None


FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False), _expect("a finite number")]


class HarnessMetric(BaseModel):
    """One lm-evaluation-harness metric of one task (`finescope_core.evaluate.harness.task_metrics`)."""

    model_config = ConfigDict(extra="forbid")

    value: FiniteNumber
    ci: Annotated[tuple[FiniteNumber, FiniteNumber], _expect("[low, high], two finite numbers")]
    n: Count
    stderr: FiniteNumber | None = None
    """lm-eval's own stderr; None where it gives none (one sample)."""


HarnessTask = dict[str, HarnessMetric]
"""metric name (`acc`, `acc_norm`, `exact_match`, ...) -> that metric."""


class IntervalEstimate(BaseModel):
    """One metric's value with its bootstrap 95 % interval [low, high] over `n` items."""

    model_config = ConfigDict(extra="forbid")

    value: Annotated[float, Field(strict=True, allow_inf_nan=False), _expect("a finite number")]
    low: Annotated[float, Field(strict=True, allow_inf_nan=False), _expect("a finite number")]
    high: Annotated[float, Field(strict=True, allow_inf_nan=False), _expect("a finite number")]
    n: Count

    @model_validator(mode="after")
    def _ordered(self) -> IntervalEstimate:
        if not self.low <= self.value <= self.high:
            raise PydanticCustomError(
                _BAD_VALUE,
                "must satisfy low <= value <= high, got {got}",
                {"got": f"{self.low}, {self.value}, {self.high}"},
            )
        return self


INTERVAL_METRICS = (
    "perplexity",
    "chat_perplexity",
    "general_perplexity",
    "mc_accuracy",
    "mc_accuracy_norm",
    "numeric_exact_match",
)
"""The metrics that carry an interval in `ci` whenever they are present."""


class ModelMetrics(BaseModel):
    """One model's metrics; the accuracies are present when their eval file was given."""

    model_config = ConfigDict(extra="allow")

    perplexity: Perplexity
    """Raw-text perplexity of the domain items."""
    chat_perplexity: OptionalPerplexity = None
    """Perplexity of the domain items' references (+ EOS) after the chat-formatted prompt (as tuned)."""
    general_perplexity: OptionalPerplexity = None
    """Raw-text perplexity of the general, out-of-domain items."""
    parameters: Parameters
    mc_accuracy: OptionalAccuracy = None
    mc_accuracy_norm: OptionalAccuracy = None
    numeric_exact_match: OptionalAccuracy = None
    n: EvalCounts
    ci: dict[str, IntervalEstimate]
    """Bootstrap 95 % interval of every metric present (exactly those), with its value and n."""
    lm_eval: dict[str, HarnessTask] | None = None
    """lm-evaluation-harness results, task -> metric -> value / 95 % CI / n; present when
    `evaluate.lm_eval_tasks` is set."""

    @model_validator(mode="after")
    def _intervals_match(self) -> ModelMetrics:
        present = {m for m in INTERVAL_METRICS if getattr(self, m) is not None}
        if set(self.ci) != present:
            raise PydanticCustomError(
                _BAD_VALUE,
                "ci must hold exactly the metrics present ({want}), got {got}",
                {"want": ", ".join(sorted(present)), "got": ", ".join(sorted(self.ci)) or "none"},
            )
        for name in present:
            if abs(self.ci[name].value - getattr(self, name)) > 1e-9 * max(1.0, abs(getattr(self, name))):
                raise PydanticCustomError(_BAD_VALUE, "ci.{name}.value differs from {name}", {"name": name})
        return self


class ModelsByName(BaseModel):
    """The evaluated models: base, pruned and tuned always; baselines ("pruned-random", ...) as extras."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, ModelMetrics] = Field(init=False)

    base: ModelMetrics
    pruned: ModelMetrics
    tuned: ModelMetrics


class Comparison(BaseModel):
    """A paired comparison of one metric between two models on the same items (`evaluate.paired`):
    ppl(a) / ppl(b) (`ratio`) or a - b (`difference`), with its paired bootstrap 95 % interval over n items;
    `clear` when the interval excludes 1 (ratio) / 0 (difference)."""

    model_config = ConfigDict(extra="forbid")

    a: Annotated[str, Field(strict=True, min_length=1), _expect("a model name")]
    b: Annotated[str, Field(strict=True, min_length=1), _expect("a model name")]
    metric: Annotated[str, Field(strict=True, min_length=1), _expect("a metric name")]
    kind: Annotated[Literal["ratio", "difference"], _expect("'ratio' or 'difference'")]
    value: FiniteNumber
    low: FiniteNumber
    high: FiniteNumber
    n: Count
    clear: Annotated[bool, Field(strict=True), _expect("true or false")]

    @model_validator(mode="after")
    def _consistent(self) -> Comparison:
        if not self.low <= self.value <= self.high:
            raise PydanticCustomError(
                _BAD_VALUE,
                "must satisfy low <= value <= high, got {got}",
                {"got": f"{self.low}, {self.value}, {self.high}"},
            )
        if self.kind == "ratio" and self.low <= 0:
            raise PydanticCustomError(_BAD_VALUE, "a ratio must be > 0, got low {got}", {"got": self.low})
        null = 1.0 if self.kind == "ratio" else 0.0
        if self.clear != (self.low > null or self.high < null):
            raise PydanticCustomError(
                _BAD_VALUE,
                "clear must say whether [{low}, {high}] excludes {null}, got {clear}",
                {"low": self.low, "high": self.high, "null": null, "clear": str(self.clear).lower()},
            )
        return self


class Primary(BaseModel):
    """The run's primary metric (`finescope_core.evaluate.primary`): its name and why it was chosen."""

    model_config = ConfigDict(extra="forbid")

    metric: Annotated[Literal["chat_perplexity", "perplexity"], _expect("'chat_perplexity' or 'perplexity'")]
    why: Annotated[str, Field(strict=True, min_length=1), _expect("a sentence")]


class MetricsDocument(BaseModel):
    """The whole `metrics.json`; `evaluation` (how the eval sets were made), `stage_seconds` and any
    other top-level key are not checked."""

    model_config = ConfigDict(extra="allow")

    models: ModelsByName
    comparisons: Annotated[list[Comparison] | None, _not_null("a list of comparisons")] = None
    """Paired comparisons between models on the same items; left out when no per-item numbers were stored."""
    primary: Annotated[Primary | None, _not_null("an object with metric and why")] = None
    """The metric to read first; every model has it."""

    @model_validator(mode="after")
    def _compared_models_exist(self) -> MetricsDocument:
        names = set(ModelsByName.model_fields) | set(self.models.model_extra or {})
        if self.primary is not None:
            by_name: dict[str, ModelMetrics] = dict(self.models)
            lacking = [n for n in sorted(names) if self.primary.metric not in by_name[n].ci]
            if lacking:
                raise PydanticCustomError(
                    _BAD_VALUE,
                    "primary.metric: {metric} must be measured for every model, not for {lacking}",
                    {"metric": self.primary.metric, "lacking": ", ".join(lacking)},
                )
        for i, c in enumerate(self.comparisons or []):
            unknown = [m for m in (c.a, c.b) if m not in names]
            if unknown:
                raise PydanticCustomError(
                    _BAD_VALUE,
                    "comparisons.{i}: must compare models in models, got {unknown}",
                    {"i": i, "unknown": ", ".join(repr(m) for m in unknown)},
                )
        return self


REQUIRED_MODELS = tuple(ModelsByName.model_fields)
"""Models every metrics.json holds: ("base", "pruned", "tuned")."""


def metrics_schema_errors(metrics: Any) -> list[str]:
    """Problems with the shape of `metrics.json` (see `MetricsDocument`).

    Each model needs `perplexity` (a finite number > 0), `parameters` (an int > 0), `n` and `ci`;
    the other perplexities, when present, are finite numbers > 0, accuracies numbers in [0, 1], counts
    in `n` ints > 0, and `ci` holds an interval {value, low, high, n} with low <= value <= high for
    exactly the metrics present. More models are allowed. Each entry of `comparisons`, when present,
    names two of the models, a kind (`ratio` / `difference`), low <= value <= high (a ratio > 0), n, and
    `clear` exactly when the interval excludes 1 (ratio) / 0 (difference).

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
    if loc == () and err["type"] == _BAD_VALUE:  # a check across sections names its own path
        return err["msg"]
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
