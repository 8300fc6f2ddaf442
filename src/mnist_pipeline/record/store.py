"""The store and the run lifecycle: experiment, a run's start and end, tags, dataset inputs."""

import contextlib
import functools
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from mnist_pipeline import host, tracking
from mnist_pipeline.config import DataConfig

NOTE_TAG = "mlflow.note.content"  # the UI's "Description" of a run or an experiment
RUN_KIND_TAG = "run.kind"  # pipeline | one-off | form | search | trial
SOURCE_TAG = "record.source"  # "live" (timed as it ran) or "outputs" (rebuilt from DVC outputs)
EXP_NAME_TAG, EXP_BASELINE_TAG = "dvc.exp.name", "dvc.exp.baseline"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # which view the MLflow UI opens the experiment on


@dataclass(frozen=True)
class Store:
    """A reachable tracking store holding the data set's experiment: `mlflow`'s current one."""

    uri: str
    experiment_id: str
    dataset: str
    root: Path


def open_store(root: Path, dataset: str) -> Store:
    """Check the store answers (fail fast, before any work) and find or create the experiment."""
    uri = tracking.tracking_uri(root)
    tracking.check_reachable(uri, experiment=tracking.experiment_name(dataset), root=root)
    if moved := tracking.follow_a_moved_project(root):
        print(f"the project moved from {moved}: its local store now keeps artifacts here")
    mlflow.set_tracking_uri(uri)
    experiment_id = tracking.run_experiment_id(dataset, root)
    describe_experiment(experiment_id, dataset)
    return Store(uri=uri, experiment_id=experiment_id, dataset=dataset, root=root)


def describe_experiment(experiment_id: str, dataset: str) -> None:
    """A description, and the kind that opens MLflow 3's UI on the runs; each set once."""
    experiment = mlflow.get_experiment(experiment_id)
    note = (
        f"MNIST-family classifiers trained by mnist-pipeline on **{dataset}**: one run per "
        "variant per host, named `variant@host`, each with two child runs, one per exported "
        "form (`variant@host · onnx`, `· int8`). Which variant is best: sort the runs by "
        "`test/accuracy`. How hosts compare: search `tags.`run.kind` = 'pipeline'` and group "
        "the runs by the `variant` tag, or `mnist-pipeline compare`. `run.kind` also marks "
        "one-off recipes (`one-off`), a search's run (`search`) and its trials (`trial`); "
        "`record.source=outputs` marks a run rebuilt from the pipeline's outputs (no timings). "
        "Each variant's best model is `models:/<dataset>-<variant>@champion`."
    )
    tags = {EXPERIMENT_KIND_TAG: "custom_model_development", NOTE_TAG: note}
    for key, value in tags.items():
        # Two jobs on a new experiment (a queued sweep) race to set it; the loser's is cosmetic.
        with contextlib.suppress(MlflowException):
            if key not in experiment.tags:
                tracking.client().set_experiment_tag(experiment_id, key, value)


@functools.cache
def mlflow_run_parent() -> str | None:
    """The run `mlflow run` started, taken out of the environment (else start_run resumes it)."""
    return os.environ.pop("MLFLOW_RUN_ID", None)


def shared_tags(store: Store, *, variant: str, kind: str) -> dict[str, str]:
    """A run's tags that do not depend on the machine (a search's trials take the driver's)."""
    tags = {"variant": variant, "git.commit": host.git_commit(store.root)}
    tags |= {"data.dataset": store.dataset, RUN_KIND_TAG: kind}
    if stage := os.environ.get("DVC_STAGE"):
        tags["dvc.stage"] = stage
    if name := os.environ.get("DVC_EXP_NAME"):  # set by `dvc exp run`, queued or not
        tags[EXP_NAME_TAG] = name
        tags[EXP_BASELINE_TAG] = os.environ.get("DVC_EXP_BASELINE_REV", "unknown")
    return tags


def describe_run(tags: dict, recipe: dict, checksum: str) -> str:
    shown = ", ".join(f"{k} {v}" for k, v in recipe.items())
    text = (
        f"**{tags['variant']}** on host `{tags['host']}` ({tags.get('device', 'unknown')}).\n\n"
        f"Recipe: {shown}.\n\n"
        f"Data: {tags['data.dataset']} (checksum `{checksum[:12]}`); "
        f"code: commit `{tags['git.commit'][:12]}`."
    )
    if name := tags.get(EXP_NAME_TAG):
        text += (
            f"\n\nDVC experiment `{name}` on baseline commit `{tags[EXP_BASELINE_TAG][:7]}`: "
            f"`dvc exp show` lists it, `dvc exp apply {name}` brings it into the workspace."
        )
    return text


class EndRun(Exception):
    """Raised inside `started_run`: end the run with `status` and carry on after the block."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


@contextlib.contextmanager
def started_run(experiment_id, *, name: str, tags: dict, system_metrics=False, parent_run_id=None):
    """A run (a child of `parent_run_id` or `mlflow run`'s) ended FINISHED, FAILED or KILLED."""
    if system_metrics:
        if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
            # MLflow's 10 s default leaves a short run without a curve; 1 s costs nothing visible.
            mlflow.set_system_metrics_sampling_interval(1)
        mlflow.set_system_metrics_samples_before_logging(1)
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=name,
        tags=tags,
        parent_run_id=parent_run_id or mlflow_run_parent(),
        log_system_metrics=system_metrics,
    )
    status = "KILLED"  # unless the block ends otherwise: Ctrl-C, SIGTERM
    try:
        yield run
        status = "FINISHED"
    except EndRun as end:  # the caller's choice: this status, and nothing raised further
        status = end.status
    except Exception:
        status = "FAILED"
        raise
    finally:
        try:
            mlflow.end_run(status)
        except Exception:
            print(f"warning: could not mark MLflow run {run.info.run_id} {status}", file=sys.stderr)


def datasets(data: DataConfig, checksum: str, *, val_size: int, seed: int) -> dict:
    """Dataset inputs by context, digests from the content checksum (alike on any host)."""
    dataset = data.dataset
    mirrors = [m for m in data.dataset_mirrors if m.startswith(("http://", "https://"))]
    source = HTTPDatasetSource(mirrors[0] if mirrors else f"https://{dataset}.invalid/")

    def entry(split: str, detail: str) -> MetaDataset:
        digest = hashlib.md5(f"{checksum}/{split}/{detail}".encode()).hexdigest()
        return MetaDataset(source, name=f"{dataset}-{split}", digest=digest)

    split = f"val_size={val_size},seed={seed}"
    found = {"training": entry("train", split), "validation": entry("validation", split)}
    return found | {"evaluation": entry("test", "t10k")}


def training_inputs(data: DataConfig, checksum: str, *, val_size: int, seed: int) -> dict:
    """The dataset inputs a training uses: `training`, and `validation` when there is a split."""
    found = datasets(data, checksum, val_size=val_size, seed=seed)
    return {c: found[c] for c in ("training", "validation") if c == "training" or val_size}


# How a store refuses a second insert of the same key: PostgreSQL (psycopg), SQLite, MySQL.
_DUPLICATE_KEY = ("UniqueViolation", "duplicate key", "UNIQUE constraint failed", "Duplicate entry")


def log_datasets(run_id: str, found: dict, client=None) -> None:
    """Log {context: dataset}; two hosts inserting new data at once break a key: retried."""
    inputs = [
        DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for context, ds in found.items()
    ]
    for attempt in (1, 2, 3):
        try:
            (client or tracking.client()).log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as err:
            if attempt == 3 or not any(key in str(err) for key in _DUPLICATE_KEY):
                raise
            time.sleep(0.1 * attempt)
