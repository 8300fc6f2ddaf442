"""params.yaml parsed, once at the edge, into typed frozen objects that pydantic validates.

Each error is one line naming the key, its value and what is allowed (ConfigError, exit 2)."""

import dataclasses
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails
from ruamel.yaml import YAML, YAMLError

from mnist_pipeline.errors import ConfigError
from mnist_pipeline.models import VARIANTS

Dataset = Literal["mnist", "fashion-mnist"]
# strict: YAML's `epochs: "5"` or `lr: yes` is a mistake, not something to coerce
Count = Annotated[int, Field(strict=True, ge=1)]
NonNegative = Annotated[int, Field(strict=True, ge=0)]
PositiveFloat = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
Choices = Annotated[
    tuple[Count, ...], Field(min_length=1), AfterValidator(lambda v: tuple(sorted(set(v))))
]
Mirrors = Annotated[  # a lone string is a one-mirror list
    tuple[Annotated[str, Field(min_length=1)], ...],
    Field(min_length=1),
    BeforeValidator(lambda v: [v] if isinstance(v, str) else v),
]
# `mirrors:` or `variants:` with every entry commented out is an empty mapping.
_EMPTY_IF_NONE = BeforeValidator(lambda v: {} if v is None else v)


def _known_keys(data: Any, allowed: Iterable[str]) -> Any:
    """pydantic's extra="forbid" refuses an unknown key without saying which keys are allowed."""
    if isinstance(data, Mapping) and (unknown := sorted(set(data) - set(allowed))):
        raise ValueError(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return data


@dataclass(frozen=True)
class _Section:
    @model_validator(mode="before")
    @classmethod
    def _only_fields(cls, data: Any) -> Any:
        return _known_keys(data, tuple(f.name for f in dataclasses.fields(cls)))


@dataclass(frozen=True)
class DataConfig(_Section):
    dataset: Dataset
    # dataset -> mirror URLs or folders, tried in order
    mirrors: Annotated[dict[Dataset, Mirrors], _EMPTY_IF_NONE] = Field(default_factory=dict)

    @property
    def dataset_mirrors(self) -> tuple[str, ...]:
        return self.mirrors.get(self.dataset, ())


@dataclass(frozen=True)
class TrainConfig(_Section):
    seed: NonNegative
    device: Literal["auto", "cpu", "cuda", "mps"]
    val_size: NonNegative
    keep: Literal["best", "last"] = "best"  # the checkpoint's epoch: best validation, or last


@dataclass(frozen=True)
class Recipe(_Section):
    optimizer: Literal["sgd", "adam"]
    lr: PositiveFloat
    batch_size: Count
    epochs: Count
    shuffle: StrictBool
    use_dropout: StrictBool = True


# A variant whose architecture has no dropout has no use_dropout to switch.
_FIXED_RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(Recipe) if f.name != "use_dropout")


class LogRange(NamedTuple):
    low: PositiveFloat
    high: PositiveFloat


def _lr_bounds(value: Any) -> Any:
    """tune's lr is written {low: ..., high: ...}: a bare pair would hide which bound is which."""
    if isinstance(value, Mapping):
        return _known_keys(value, LogRange._fields)
    if isinstance(value, LogRange):
        return value
    raise ValueError(f"expected a mapping with low and high, got {value!r}")


def _low_below_high(bounds: LogRange) -> LogRange:
    if not bounds.low < bounds.high:
        raise ValueError(f"low ({bounds.low}) must be below high ({bounds.high})")
    return bounds


LrBounds = Annotated[LogRange, BeforeValidator(_lr_bounds), AfterValidator(_low_below_high)]


@dataclass(frozen=True)
class SearchSpace(_Section):
    """What `tune` searches for one variant: lr log-uniformly, batch size and epochs by choice."""

    lr: LrBounds
    batch_size: Choices
    epochs: Choices


@dataclass(frozen=True)
class SpaceReplacement(_Section):
    lr: LrBounds | None = None
    batch_size: Choices | None = None
    epochs: Choices | None = None


def check_variant(name: str, error: type[Exception] = ConfigError) -> str:
    """`name`, if models.py defines it (`error`: ValueError inside a pydantic validator)."""
    if name not in VARIANTS:
        raise error(f"unknown variant {name!r}; choose from: {', '.join(VARIANTS)}")
    return name


_Variant = Annotated[str, AfterValidator(lambda name: check_variant(name, ValueError))]


@dataclass(frozen=True)
class TuneSection(SearchSpace):
    """The shared search space, and per-variant replacements of its keys (SpaceReplacement)."""

    variants: Annotated[dict[_Variant, SpaceReplacement], _EMPTY_IF_NONE] = Field(
        default_factory=dict
    )

    def space(self, variant: str) -> SearchSpace:
        own = self.variants.get(variant, SpaceReplacement())
        replaced = {k: v for k, v in dataclasses.asdict(own).items() if v is not None}
        return dataclasses.replace(SearchSpace(self.lr, self.batch_size, self.epochs), **replaced)


@dataclass(frozen=True)
class Params(_Section):
    data: DataConfig
    train: TrainConfig
    variants: dict[str, Recipe]
    tune: TuneSection | None = None

    @field_validator("variants", mode="before")
    @classmethod
    def _recipes_fit_their_models(cls, variants: Any) -> Any:
        """A recipe only for a variant models.py defines; use_dropout only where it has dropout."""
        if not isinstance(variants, Mapping):
            return variants  # pydantic's own check says what it is instead
        for name, recipe in variants.items():
            if name not in VARIANTS:
                raise ValueError(
                    f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)} "
                    "(a new one also needs an entry in mnist_pipeline/models.py)"
                )
            if not VARIANTS[name].dropout:
                try:
                    _known_keys(recipe, _FIXED_RECIPE_KEYS)
                except ValueError as err:  # at variants.<name>, as the recipe's own error
                    error = {"type": "value_error", "loc": (name,), "ctx": {"error": err}}
                    raise ValidationError.from_exception_data(
                        "Params", [{**error, "input": recipe}]
                    ) from None
        return variants

    def search_space(self, variant: str) -> SearchSpace:
        self.recipe(variant)
        if self.tune is None:
            raise ConfigError(
                "params.yaml has no 'tune:' section; add one with lr: {low: ..., high: ...}, "
                "batch_size: [...] and epochs: [...] (docs/tune.md)"
            )
        return self.tune.space(variant)

    def recipe(self, variant: str) -> Recipe:
        check_variant(variant)
        if variant not in self.variants:
            raise ConfigError(
                f"variant {variant!r} has no recipe under 'variants:' in params.yaml; "
                f"add one (recipes present: {', '.join(self.variants)})"
            )
        return self.variants[variant]


_SAYS = {  # pydantic's error type -> what is allowed, in params.yaml's words
    "dataclass_type": "expected a mapping of keys to values, got {value!r}",
    "dict_type": "expected a mapping of keys to values, got {value!r}",
    "int_type": "expected a whole number, got {value!r}",
    "greater_than_equal": "must be at least {ge}, got {value}",
    "float_type": "expected a positive number, got {value!r}",
    "greater_than": "must be a positive number, got {value}",  # only lr (gt=0) has a bound above
    "finite_number": "must be a positive number, got {value}",
    "bool_type": "expected true or false, got {value!r}",
    "literal_error": "{value!r} is not one of: {choices}",
    "tuple_type": "expected a non-empty list, got {value!r}",
    "too_short": "expected a non-empty list, got {value!r}",
    "string_type": "expected text, got {value!r}",
    "string_too_short": "must not be empty",
}


def _where(loc: tuple[str | int, ...]) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc if p != "[key]")
    return path.lstrip(".") or "top level"


def _one_line(error: ErrorDetails) -> str:
    """`key.path: what is wrong`; for a missing key, the path of the mapping that lacks it."""
    loc, kind, value, ctx = error["loc"], error["type"], error["input"], error.get("ctx", {})
    if kind == "missing":
        return f"{_where(loc[:-1])}: missing key {loc[-1]!r}"
    if kind == "value_error":  # this module's validators: their message says it all
        return f"{_where(loc)}: {ctx['error']}"
    if kind in _SAYS:
        choices = ", ".join(re.findall(r"'([^']*)'", ctx.get("expected", "")))
        return f"{_where(loc)}: " + _SAYS[kind].format(value=value, choices=choices, **ctx)
    return f"{_where(loc)}: {error['msg']} (got {value!r})"


_PARAMS = TypeAdapter(Params)


def parse_params(raw: Any) -> Params:
    if raw is None:
        raise ConfigError("the file is empty; expected sections data, train and variants")
    try:
        return _PARAMS.validate_python(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err.errors()[0])) from None


def safe_load(text: str, path: Path) -> Any:
    """YAML 1.2, as DVC reads it: `dvc exp run -S lr=1e-5` writes `1e-05`, a string to PyYAML."""
    try:
        return YAML(typ="safe").load(text)
    except YAMLError as err:  # its own message spans several lines
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None


def load_params(path: Path) -> Params:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: not found; run from the project folder or set MNIST_PIPELINE_ROOT"
        ) from None
    try:
        return parse_params(safe_load(text, path))
    except ConfigError as err:
        raise ConfigError(f"{path.name}: {err}") from None


def with_overrides(params: Params, variant: str, **overrides: Any) -> Params:
    """`params` with some recipe or train values replaced (None = keep), re-validated."""
    recipe = dataclasses.asdict(params.recipe(variant))
    train = dataclasses.asdict(params.train)
    for name, value in overrides.items():
        if value is None:
            continue
        if name not in recipe and name not in train:
            raise ValueError(f"no such setting: {name}")
        (recipe if name in recipe else train)[name] = value
    if not VARIANTS[variant].dropout and overrides.get("use_dropout") is None:
        recipe.pop("use_dropout")  # (a --use-dropout flag stays, and is refused as a key)
    # The untouched sections go in as they are (validated already); errors name params.yaml's keys.
    variants = {**params.variants, variant: recipe}
    fields = {"data": params.data, "train": train, "variants": variants, "tune": params.tune}
    return parse_params(fields)
