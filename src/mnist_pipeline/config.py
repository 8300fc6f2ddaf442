"""params.yaml, parsed once at the edge into typed, frozen, validated objects.

Every error names the offending key and what is allowed, as one line (ConfigError, exit 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mnist_pipeline.errors import ConfigError
from mnist_pipeline.models import VARIANTS

DATASETS = ("mnist", "fashion-mnist")
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda", "mps")
KEEP = ("best", "last")


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    mirrors: Mapping[str, tuple[str, ...]]  # dataset -> mirror URLs or folders, tried in order

    @property
    def dataset_mirrors(self) -> tuple[str, ...]:
        return self.mirrors.get(self.dataset, ())


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by every variant's training."""

    seed: int
    device: str
    val_size: int
    keep: str = "best"  # which epoch's weights become the checkpoint: best validation, or last


@dataclass(frozen=True)
class Recipe:
    """One variant's training recipe (and its one model switch)."""

    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    shuffle: bool
    use_dropout: bool = True


@dataclass(frozen=True)
class SearchSpace:
    """What `mnist-pipeline tune` searches over for one variant: the learning rate log-uniformly
    between two bounds, the batch size and the epoch count among choices. The rest of the recipe
    (optimizer, shuffle, dropout) is the variant's own."""

    lr: tuple[float, float]
    batch_size: tuple[int, ...]
    epochs: tuple[int, ...]


@dataclass(frozen=True)
class TuneSection:
    """params.yaml's `tune:` section: a shared search space, and per-variant replacements of any
    of its keys."""

    shared: SearchSpace
    variants: Mapping[str, Mapping[str, Any]]

    def space(self, variant: str) -> SearchSpace:
        return dataclasses.replace(self.shared, **self.variants.get(variant, {}))


@dataclass(frozen=True)
class Params:
    data: DataConfig
    train: TrainConfig
    variants: Mapping[str, Recipe]
    tune: TuneSection | None = None

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


def check_variant(name: str) -> str:
    if name not in VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; choose from: {', '.join(VARIANTS)}")
    return name


# --- field checks: each names the key path and what is allowed ------------------------------


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping of keys to values, got {value!r}")
    return value


def _keys(
    section: Mapping[str, Any], key: str, required: set[str], optional: set[str] | None = None
) -> None:
    if optional is None:
        optional = set()
    unknown = sorted(set(section) - required - optional)
    if unknown:
        allowed = ", ".join(sorted(required | optional))
        raise ConfigError(f"{key}: unknown key {unknown[0]!r} (allowed: {allowed})")
    missing = sorted(required - set(section))
    if missing:
        raise ConfigError(f"{key}: missing key {missing[0]!r}")


def _choice(value: Any, key: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of: {', '.join(allowed)}")
    return value


def _int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key}: must be at least {minimum}, got {value}")
    return value


def _positive_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a positive number, got {value!r}")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{key}: must be a positive number, got {value}")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


# --- sections -------------------------------------------------------------------------------


def parse_data(raw: Any) -> DataConfig:
    section = _mapping(raw, "data")
    _keys(section, "data", {"dataset"}, {"mirrors"})
    dataset = _choice(section["dataset"], "data.dataset", DATASETS)
    mirrors_raw = _mapping(section.get("mirrors") or {}, "data.mirrors")
    mirrors: dict[str, tuple[str, ...]] = {}
    for name, urls in mirrors_raw.items():
        key = f"data.mirrors.{name}"
        _choice(name, f"data.mirrors: key {name!r}", DATASETS)
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
            raise ConfigError(f"{key}: expected a list of URLs or folders, got {urls!r}")
        mirrors[name] = tuple(urls)
    return DataConfig(dataset=dataset, mirrors=mirrors)


def parse_train(raw: Any) -> TrainConfig:
    section = _mapping(raw, "train")
    _keys(section, "train", {"seed", "device", "val_size"}, {"keep"})
    return TrainConfig(
        seed=_int(section["seed"], "train.seed", 0),
        device=_choice(section["device"], "train.device", DEVICES),
        val_size=_int(section["val_size"], "train.val_size", 0),
        keep=_choice(section.get("keep", "best"), "train.keep", KEEP),
    )


_RECIPE_FIELDS = {f.name for f in dataclasses.fields(Recipe)}


def parse_recipe(raw: Any, variant: str) -> Recipe:
    key = f"variants.{variant}"
    section = _mapping(raw, key)
    required = _RECIPE_FIELDS - {"use_dropout"}
    optional = {"use_dropout"} if VARIANTS[variant].dropout else set()
    _keys(section, key, required, optional)
    return Recipe(
        optimizer=_choice(section["optimizer"], f"{key}.optimizer", OPTIMIZERS),
        lr=_positive_float(section["lr"], f"{key}.lr"),
        batch_size=_int(section["batch_size"], f"{key}.batch_size", 1),
        epochs=_int(section["epochs"], f"{key}.epochs", 1),
        shuffle=_bool(section["shuffle"], f"{key}.shuffle"),
        use_dropout=_bool(section.get("use_dropout", True), f"{key}.use_dropout"),
    )


_SPACE_KEYS = {f.name for f in dataclasses.fields(SearchSpace)}


def _lr_bounds(value: Any, key: str) -> tuple[float, float]:
    bounds = _mapping(value, key)
    _keys(bounds, key, {"low", "high"})
    low, high = (
        _positive_float(bounds["low"], f"{key}.low"),
        _positive_float(bounds["high"], f"{key}.high"),
    )
    if not low < high:
        raise ConfigError(f"{key}: low ({low}) must be below high ({high})")
    return low, high


def _int_choices(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of whole numbers, got {value!r}")
    return tuple(sorted({_int(v, f"{key}[{i}]", 1) for i, v in enumerate(value)}))


def _space_values(section: Mapping[str, Any], key: str) -> dict[str, Any]:
    parsers = {"lr": _lr_bounds, "batch_size": _int_choices, "epochs": _int_choices}
    return {name: parsers[name](value, f"{key}.{name}") for name, value in section.items()}


def parse_tune(raw: Any) -> TuneSection:
    section = _mapping(raw, "tune")
    _keys(section, "tune", _SPACE_KEYS, {"variants"})
    shared = SearchSpace(**_space_values({k: section[k] for k in _SPACE_KEYS}, "tune"))
    per_variant = {}
    for name, values in _mapping(section.get("variants") or {}, "tune.variants").items():
        key = f"tune.variants.{name}"
        if name not in VARIANTS:
            raise ConfigError(
                f"{key}: unknown variant {name!r}; choose from: {', '.join(VARIANTS)}"
            )
        values = _mapping(values, key)
        _keys(values, key, set(), _SPACE_KEYS)
        per_variant[name] = _space_values(values, key)
    return TuneSection(shared=shared, variants=per_variant)


def parse_params(raw: Any) -> Params:
    if raw is None:
        raise ConfigError("the file is empty; expected sections data, train and variants")
    top = _mapping(raw, "top level")
    _keys(top, "top level", {"data", "train", "variants"}, {"tune"})
    variants_raw = _mapping(top["variants"], "variants")
    variants = {}
    for name, recipe in variants_raw.items():
        if name not in VARIANTS:
            raise ConfigError(
                f"variants: unknown variant {name!r}; known variants: {', '.join(VARIANTS)} "
                "(a new one also needs an entry in mnist_pipeline/models.py)"
            )
        variants[name] = parse_recipe(recipe, name)
    return Params(
        data=parse_data(top["data"]),
        train=parse_train(top["train"]),
        variants=variants,
        tune=parse_tune(top["tune"]) if "tune" in top else None,
    )


def read_params_file(path: Path) -> dict[str, Any]:
    """The raw mapping in params.yaml, with one-line errors for a missing or malformed file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: not found; run from the project folder or set MNIST_PIPELINE_ROOT"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    return raw


def load_params(path: Path) -> Params:
    raw = read_params_file(path)
    try:
        return parse_params(raw)
    except ConfigError as err:
        raise ConfigError(f"{path.name}: {err}") from None


def with_overrides(params: Params, variant: str, **overrides: Any) -> Params:
    """`params` with some recipe or train values replaced (None = keep), re-validated."""
    recipe = dataclasses.asdict(params.recipe(variant))
    train = dataclasses.asdict(params.train)
    for name, value in overrides.items():
        if value is None:
            continue
        if name in recipe:
            recipe[name] = value
        elif name in train:
            train[name] = value
        else:
            raise ValueError(f"no such setting: {name}")
    if not VARIANTS[variant].dropout and overrides.get("use_dropout") is None:
        recipe.pop("use_dropout")  # (a --use-dropout flag stays, and is refused by parse_recipe)
    variants = dict(params.variants)
    variants[variant] = parse_recipe(recipe, variant)
    return dataclasses.replace(params, train=parse_train(train), variants=variants)
