"""`tune --apply`: a recipe written into params.yaml as `dvc exp run -S` does, all else kept."""

import dataclasses
import io
from collections.abc import Mapping
from pathlib import Path

from ruamel.yaml import YAML

from mnist_pipeline.config import Recipe, parse_params, safe_load
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.fileio import write_text_atomic


def apply_recipe(path: Path, variant: str, recipe: Recipe) -> None:
    """Write `recipe`'s lr (4 digits), batch size and epochs if the edit parses back to them."""
    rt = YAML()  # set as DVC sets it (dvc/utils/serialize/_yaml.py): `exp run -S` keeps the layout
    rt.default_flow_style = False
    document = rt.load(path.read_text(encoding="utf-8"))
    entry = (document.get("variants") or {}).get(variant)
    if not isinstance(entry, Mapping):
        raise PipelineError(f"{path.name}: variants.{variant} not found; add its recipe first")
    lr = float(f"{recipe.lr:.4g}")
    entry["lr"], entry["batch_size"], entry["epochs"] = lr, recipe.batch_size, recipe.epochs
    stream = io.StringIO()
    rt.dump(document, stream)
    text = stream.getvalue()
    if parse_params(safe_load(text, path)).recipe(variant) != dataclasses.replace(recipe, lr=lr):
        raise PipelineError(f"{path.name}: could not edit variants.{variant} in place")
    write_text_atomic(path, text)
    print(
        f"{variant}: params.yaml now has lr {lr:.4g}, batch_size {recipe.batch_size}, "
        f"epochs {recipe.epochs}; `dvc repro` trains it as the pipeline's recipe"
    )
