"""The checkpoint format: save, load, and refuse what is not ours.

Nothing that differs between two runs of one recipe: an identical retrain gives the same bytes,
and DVC re-runs nothing downstream."""

import dataclasses
import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnist_pipeline.config import Recipe
from mnist_pipeline.errors import PipelineError, first_line
from mnist_pipeline.fileio import write_atomic
from mnist_pipeline.models import VARIANTS, build_model

FORMAT = "mnist-pipeline/checkpoint/2"


def save(path: Path, model: nn.Module, variant: str, recipe: Recipe, **extra: Any) -> None:
    """Weights + what rebuilds the model; only tensors and plain values (weights_only loads it)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Plain values made afresh from JSON: pickle writes a value met twice as a reference, so equal
    # values held by one object or by two (a flag equal to params.yaml's) gave different bytes.
    meta = {"variant": variant, "recipe": dataclasses.asdict(recipe), **extra}
    payload = {"format": FORMAT, **json.loads(json.dumps(meta)), "state_dict": state}

    def write(tmp: Path) -> None:
        # Serialised in memory: a full disk is an OSError (torch's writer says "unexpected pos").
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        with tmp.open("wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)


def load(path: Path, variant: str | None = None) -> tuple[nn.Sequential, dict[str, Any]]:
    """The model (in eval mode) and payload of one of our checkpoints; others are refused unrun."""
    if not path.is_file():
        name = variant or "<variant>"
        raise PipelineError(
            f"{path}: no checkpoint; train it first: `mnist-pipeline train --variant {name}` "
            f"(or `dvc repro train@{name}`)"
        )
    refuse = f"{path}: refused to load: not a checkpoint written by mnist-pipeline, or corrupt"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on a pickle it is about to refuse
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Not torch's message: it suggests weights_only=False, i.e. running the file's code.
        raise PipelineError(f"{refuse} (it holds more than tensors and plain values)") from None
    except Exception as err:  # a foreign file fails torch.load in many ways (KeyError included)
        raise PipelineError(f"{refuse} ({first_line(err)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PipelineError(f"{refuse} (missing format marker {FORMAT!r})")
    name = payload.get("variant")
    if name not in VARIANTS or (variant is not None and name != variant):
        raise PipelineError(f"{refuse} (it is for variant {name!r}, expected {variant!r})")
    recipe = payload.get("recipe") or {}
    model = build_model(name, use_dropout=bool(recipe.get("use_dropout", True)))
    try:
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, TypeError) as err:
        raise PipelineError(f"{refuse} (weights do not fit {name}: {str(err)[:200]})") from None
    return model.eval(), payload
