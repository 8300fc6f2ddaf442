"""Outputs → MLflow: the one path from what a stage wrote to its MLflow run.

A stage computes and writes its outputs (what DVC tracks) first; then this module turns those
outputs, plus what only the live run knows (timings, system metrics, the host), into the record.
Because the record is made from the outputs, it can be made again from them: `mnist-pipeline sync`
(the `sync` stage, which DVC always runs) calls the same functions for every variant, so the store
is a faithful view of DVC's outputs whatever DVC ran, skipped or restored from its cache.

For each variant's checkpoint (known by its MD5, the run tag `checkpoint.md5`) the store holds one
complete run: the training record (recipe, per-epoch history, summary, logged model), the
evaluation (test metrics, confusion matrix, misclassified examples, a registered version) and the
export (ONNX and int8 logged models). Each part ends by tagging the run with the digest of the
outputs it was made from (`record.evaluation`, `record.export`), so a part is recorded once per
outputs, and a second `sync` adds nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnist_pipeline import paths, tracking
from mnist_pipeline.dataset import file_md5
from mnist_pipeline.errors import PipelineError, first_line

if TYPE_CHECKING:
    from mnist_pipeline.config import DataConfig, Params

CHECKPOINT_TAG = "checkpoint.md5"  # set last: the training record is complete
EVALUATION_TAG = "record.evaluation"  # digest of the evaluation outputs recorded
EXPORT_TAG = "record.export"  # digest of the export outputs recorded
SOURCE_TAG = "record.source"  # "live" (timed as it ran) or "outputs" (rebuilt from DVC outputs)
EXP_NAME_TAG, EXP_BASELINE_TAG = "dvc.exp.name", "dvc.exp.baseline"
PARTS = ("evaluation", "export")
# The checkpoint's test metrics are logged at step 1, the exported forms' at step 0: each logged
# model carries its own `test/accuracy`, and the run's (the latest step) is the checkpoint's,
# which metrics/test/<variant>.json holds.
EVALUATION_STEP, EXPORT_STEP = 1, 0


# --- the store and the run's life -----------------------------------------------------------


@dataclass(frozen=True)
class Store:
    """A tracking store, reachable, with the data set's experiment in it: `mlflow`'s current
    one from here on, which every `tracking.client()` reaches."""

    uri: str
    experiment_id: str
    dataset: str
    root: Path


def open_store(root: Path, dataset: str) -> Store:
    """Check the store answers (fail fast, before any work) and find or create the experiment."""
    import mlflow

    uri = tracking.tracking_uri(root)
    tracking.check_reachable(uri, experiment=tracking.experiment_name(dataset), root=root)
    if moved := tracking.follow_a_moved_project(root):
        print(f"the project moved from {moved}: its local store now keeps artifacts here")
    mlflow.set_tracking_uri(uri)
    experiment_id = tracking.run_experiment_id(dataset, root)
    tracking.describe_experiment(experiment_id, dataset)
    return Store(uri=uri, experiment_id=experiment_id, dataset=dataset, root=root)


@functools.cache
def _parent_run_id() -> str | None:
    """Under `mlflow run`, MLflow has started a run and exported its id: runs recorded here become
    its children. Taken out of the environment once, or `mlflow.start_run` would resume it."""
    return os.environ.pop("MLFLOW_RUN_ID", None)


def run_tags(store: Store, *, variant: str, device: tuple[str, str], one_off: bool) -> dict:
    """The tags every run of a variant carries: where it ran (`device` is (type, model name)),
    and the `shared_tags`."""
    where = {"device": device[0], "device.name": device[1]}
    return tracking.machine_tags() | where | shared_tags(store, variant=variant, one_off=one_off)


def shared_tags(store: Store, *, variant: str, one_off: bool) -> dict[str, str]:
    """The tags of a variant's run that do not depend on the machine: what, from which code,
    data and experiment. A search's trials take the driver's: a node has no project."""
    tags = {
        "variant": variant,
        "git.commit": tracking.git_commit(store.root),
        "data.dataset": store.dataset,
        tracking.RUN_KIND_TAG: "one-off" if one_off else "pipeline",
    }
    if stage := os.environ.get("DVC_STAGE"):
        tags["dvc.stage"] = stage
    # `dvc exp run` (queued or not) names the experiment and its baseline commit for the stages.
    if name := os.environ.get("DVC_EXP_NAME"):
        tags[EXP_NAME_TAG] = name
        tags[EXP_BASELINE_TAG] = os.environ.get("DVC_EXP_BASELINE_REV", "unknown")
    return tags


def run_description(tags: dict, recipe: dict, checksum: str) -> str:
    """The run's description (Markdown, shown on its page), from its tags: variant, recipe,
    data, commit, and the DVC experiment it belongs to (with how to bring it into the
    workspace)."""
    shown = ", ".join(f"{k} {v}" for k, v in recipe.items())
    text = (
        f"**{tags['variant']}** on host `{tags['host']}`.\n\n"
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


@contextlib.contextmanager
def started_run(
    experiment_id: str,
    *,
    name: str,
    tags: dict,
    system_metrics: bool = False,
    parent_run_id: str | None = None,
):
    """A new run `name`, ended FINISHED, FAILED on an error, or KILLED on Ctrl-C or SIGTERM.
    A store that fails at the end is a warning: what matters is saved locally. Its parent is
    `parent_run_id`, else the run `mlflow run` started, if any."""
    import mlflow

    if system_metrics:
        if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
            # MLflow's 10 s default leaves a short run without a curve; 1 s costs nothing visible.
            mlflow.set_system_metrics_sampling_interval(1)
        mlflow.set_system_metrics_samples_before_logging(1)
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=name,
        tags=tags,
        parent_run_id=parent_run_id or _parent_run_id(),
        log_system_metrics=system_metrics,
    )
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except EndRun as end:  # the caller's choice: this status, and nothing raised further
        status = end.status
    except Exception:
        raise
    except BaseException:  # Ctrl-C, SIGTERM
        status = "KILLED"
        raise
    finally:
        try:
            mlflow.end_run(status)
        except Exception:
            print(f"warning: could not mark MLflow run {run.info.run_id} {status}", file=sys.stderr)


class EndRun(Exception):
    """Raised inside `started_run`: end the run with `status` and carry on after the block."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


# --- the training record --------------------------------------------------------------------


@dataclass
class EpochLogger:
    """Logs each epoch's metrics live, in one batched call. If the store fails mid-run, training
    goes on (its results are saved locally) and the first error is kept."""

    error: str | None = None

    def __call__(self, row: dict[str, float], epoch: int) -> None:
        if self.error is not None:
            return
        import mlflow

        try:
            mlflow.log_metrics(row, step=epoch)
        except Exception as err:
            self.error = first_line(err)
            print(
                f"warning: could not log epoch {epoch} to MLflow ({self.error}); "
                "training continues",
                file=sys.stderr,
            )


@dataclass(frozen=True)
class Training:
    """What a training record is made of: the variant's outputs and the data they came from. The
    recipe and settings are the checkpoint's own (a one-off's differ from params.yaml's)."""

    variant: str
    outputs: paths.Outputs
    data: DataConfig

    @property
    def checksum(self) -> str:  # of the data set the checkpoint was trained on
        return self.checkpoint[1].get("data_checksum", "unknown")

    @functools.cached_property
    def checkpoint(self) -> tuple[Any, dict[str, Any]]:
        from mnist_pipeline import checkpoint

        return checkpoint.load(self.outputs.checkpoint, self.variant)

    @property
    def recipe(self) -> dict[str, Any]:
        meta = self.checkpoint[1]
        return {**meta["recipe"], **meta.get("train", {})}

    def datasets(self) -> dict:
        train = self.checkpoint[1].get("train", {})
        return tracking.datasets(
            self.data, self.checksum, val_size=train.get("val_size", 0), seed=train.get("seed", 0)
        )


def log_recipe(
    run_id: str, variant: str, recipe: dict, *, data: DataConfig, checksum: str, extra: dict
) -> None:
    """The recipe (with the training settings) as params, and the data it trained on, of
    content `checksum`, as dataset inputs: known before training. `extra`: what else the run
    knows."""
    from mlflow.entities import Param

    values = {"variant": variant, **recipe, **extra}
    client = tracking.client()
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in values.items()])
    split = {"val_size": recipe.get("val_size", 0), "seed": recipe.get("seed", 0)}
    inputs = tracking.datasets(data, checksum, **split)
    used = ("training", "validation") if split["val_size"] else ("training",)
    tracking.log_datasets(client, run_id, {c: inputs[c] for c in used})


def new_run(store: Store, training: Training, *, recipe: dict, checksum: str, device=None):
    """A new run for `training` with `recipe`, on data of content `checksum`: live (timed, with
    system metrics) on a `torch.device`, or rebuilt from the outputs (`device` None: no timings,
    none invented)."""
    from mnist_pipeline.device import device_name

    live = device is not None
    where = (device.type, device_name(device)) if live else ("unknown", "unknown")
    tags = run_tags(store, variant=training.variant, device=where, one_off=training.outputs.one_off)
    note = run_description(tags, recipe, checksum)
    if not live:
        note += "\n\nRebuilt from the pipeline's outputs by `mnist-pipeline sync`: no timings."
    tags |= {SOURCE_TAG: "live" if live else "outputs", "data.checksum": checksum}
    tags[tracking.NOTE_TAG] = note
    name = tracking.run_name(training.variant)
    return started_run(store.experiment_id, name=name, tags=tags, system_metrics=live)


def log_timings(history: list[dict[str, float]]) -> None:
    """What only a live run knows: how long training took (medians over the epochs: the first
    pays for warm-up; what `compare` shows)."""
    import statistics

    import mlflow

    seconds = [row["time/epoch_seconds"] for row in history]
    mlflow.log_metrics(
        {
            "time/train_seconds": round(sum(seconds), 4),
            "time/median_epoch_seconds": round(statistics.median(seconds), 4),
            "time/median_samples_per_second": round(
                statistics.median(row["time/samples_per_second"] for row in history)
            ),
        }
    )


def record_training(run_id: str, training: Training, *, live: EpochLogger | None = None) -> str:
    """From the outputs, into the active run `run_id`: the summary, the per-epoch history (a live
    run logged it as it went), the logged model (`evaluate` links its test figures to it), and
    last the checkpoint's MD5. Returns the logged model's id."""
    import mlflow

    from mnist_pipeline.logged_model import log_model
    from mnist_pipeline.models import summary_text

    model, meta = training.checkpoint
    kept_epoch = meta.get("epoch")
    client = tracking.client()
    client.log_text(run_id, summary_text(model), "model_summary.txt")
    if live is None:  # a live run logged each epoch as it went
        live = EpochLogger()
        for epoch, row in read_history(training.outputs.history).items():
            live(row, epoch)
        if live.error is not None:
            raise PipelineError(f"{training.variant}: could not record the history ({live.error})")
    if kept_epoch is not None:
        mlflow.log_metric("kept_epoch", kept_epoch, run_id=run_id)
    recipe = meta["recipe"]
    model_id = log_model(model, training.variant, params={"variant": training.variant, **recipe})
    client.set_tag(run_id, CHECKPOINT_TAG, file_md5(training.outputs.checkpoint))
    return model_id


def read_history(path: Path) -> dict[int, dict[str, float]]:
    """The per-epoch rows of a history CSV (plots/train/<variant>.csv): epoch -> metrics."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    header, rows = lines[0].split(","), {}
    for line in lines[1:]:
        values = dict(zip(header, line.split(","), strict=True))
        epoch = int(values.pop("epoch"))
        rows[epoch] = {k: float(v) for k, v in values.items() if v}
    return rows


# --- the evaluation record ------------------------------------------------------------------


def digest(*files: Path | None) -> str | None:
    """One MD5 for a set of output files; None when one of them is missing (not made yet)."""
    if any(f is None or not f.is_file() for f in files):
        return None
    return hashlib.md5("".join(file_md5(f) for f in files).encode()).hexdigest()


def evaluation_digest(outputs: paths.Outputs) -> str | None:
    return digest(outputs.test_metrics, outputs.predictions)


def export_digest(outputs: paths.Outputs) -> str | None:
    if outputs.export_dir is None:
        return None
    return digest(outputs.export_metrics, *(outputs.export_dir / f for f in EXPORT_FILES.values()))


EXPORT_FILES = {"onnx": "model.onnx", "int8": "model.int8.onnx"}


def record_evaluation(store: Store, run, training: Training) -> str:
    """From metrics/test/<variant>.json and the predictions beside it: the test metrics (the
    file's figures, and what the predictions add: macro precision and recall, per class), linked
    to the logged model and the test set; the confusion matrix, per-class table and misclassified
    examples; a registered version. Returns a line saying what was done."""
    from mlflow.entities import Metric

    from mnist_pipeline import metrics, plots, registry
    from mnist_pipeline.dataset import FILES, read_idx

    outputs, client = training.outputs, tracking.client()
    y, pred = metrics.read_predictions(outputs.predictions)
    cm = metrics.confusion(y, pred)
    written = json.loads(outputs.test_metrics.read_text())
    figures = metrics.classification_metrics(cm, written["test/loss"]) | written
    test_set = training.datasets()["evaluation"]
    tracking.log_datasets(client, run.info.run_id, {"evaluation": test_set})
    model_id = tracking.logged_model_id(run, training.variant)
    now = int(time.time() * 1000)
    shown = {k: round(v, 6) for k, v in figures.items() if not k.startswith("test/accuracy_class_")}
    linked = {
        "model_id": model_id,
        "dataset_name": test_set.name,
        "dataset_digest": test_set.digest,
    }
    logged = [Metric(k, v, now, EVALUATION_STEP, **linked) for k, v in shown.items()]
    client.log_batch(run.info.run_id, metrics=logged)
    images = read_idx(paths.data_dir(store.root, store.dataset) / FILES[2])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "test_metrics.json").write_text(json.dumps(figures, indent=2))
        (folder / "per_class.csv").write_text(metrics.per_class_csv(cm))
        rows = (",".join(str(v) for v in row) for row in cm.tolist())
        (folder / "confusion_matrix.csv").write_text("\n".join(rows) + "\n")
        plots.confusion_matrix(cm, folder / "confusion_matrix.png", title=training.variant)
        plots.misclassified(images, y, pred, folder / "misclassified.png", title=training.variant)
        client.log_artifacts(run.info.run_id, tmp, artifact_path="evaluation")
    line = "evaluation recorded"
    if model_id is not None:
        accuracy = figures["test/accuracy"]
        line += "; " + registry.register(
            client,
            run,
            model_id,
            dataset=store.dataset,
            variant=training.variant,
            accuracy=accuracy,
        )
    client.set_tag(run.info.run_id, EVALUATION_TAG, evaluation_digest(outputs))
    return line


# --- the export record ----------------------------------------------------------------------


def record_export(store: Store, run, training: Training, live: dict | None = None) -> str:
    """From exports/<variant>/ and metrics/export/<variant>.json: both ONNX forms as logged models
    of the run, each with its test accuracy (as `test/accuracy`, like the checkpoint's model) and
    size linked. `live`: what only a live export measured (the benchmark: latencies, the machine),
    MLflow's alone."""
    import mlflow

    outputs, run_id = training.outputs, run.info.run_id
    recorded = run.data.tags.get(EXPORT_TAG) == export_digest(outputs)
    model_ids = {"torch": tracking.logged_model_id(run, training.variant)}
    for form, name in EXPORT_FILES.items():
        found = tracking.logged_model_id(run, f"{training.variant}-{form}")
        model_ids[form] = found if recorded and found else _log_onnx(run, training, form, name)
    figures = json.loads(outputs.export_metrics.read_text())
    test_set = training.datasets()["evaluation"]
    now = int(time.time() * 1000)
    # A millisecond apart: two forms of equal accuracy at one time would be one point sent twice
    # (the store refuses the second as a duplicate).
    for offset, (form, model_id) in enumerate(model_ids.items()):
        values = {k.split("/", 1)[1]: v for k, v in figures.items() if k.startswith(f"{form}/")}
        measured = (live or {}).get("forms", {}).get(form, {})
        values |= {k: v for k, v in measured.items() if "latency" in k}
        logged = {f"export/{form}/{k}": float(v) for k, v in values.items()}
        if form != "torch" and not recorded:
            logged["test/accuracy"] = float(values["accuracy"])
        if recorded:
            logged = {k: v for k, v in logged.items() if "latency" in k}
        mlflow.log_metrics(
            logged,
            step=EXPORT_STEP,
            timestamp=now + offset,
            run_id=run_id,
            model_id=model_id,
            dataset=test_set,
        )
    client = tracking.client()
    if live:
        client.log_dict(run_id, live, "export/benchmark.json")
    client.set_tag(run_id, EXPORT_TAG, export_digest(outputs))
    return "latencies recorded" if recorded else f"logged models {training.variant}-onnx, -int8"


def _log_onnx(run, training: Training, form: str, file: str) -> str:
    """Log one ONNX form as a logged model of `run` (its experiment, its outputs); its id.

    Created first and then filled (not `log_model` under the run): logging under a run links
    every unlinked step-0 metric of the run (training times, system metrics) to the new model,
    and the export's figures are linked to their own form's model only, after this."""
    import mlflow.onnx
    import numpy as np
    import onnx
    import onnxruntime as ort
    from mlflow.entities import LoggedModelOutput

    from mnist_pipeline.logged_model import signature
    from mnist_pipeline.models import INPUT_SHAPE

    name = f"{training.variant}-{form}"
    model = onnx.load(training.outputs.export_dir / file)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    logged = mlflow.initialize_logged_model(
        name=name,
        source_run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        params=run.data.params | {"export.form": form, "export.opset": str(opset)},
        model_type="onnx",
    )
    mlflow.onnx.log_model(
        model,
        name=name,
        model_id=logged.model_id,
        signature=signature(),
        input_example=np.zeros((2, *INPUT_SHAPE), dtype=np.float32),
        save_as_external_data=False,  # one file, as in exports/
        onnx_execution_providers=["CPUExecutionProvider"],
        # Stated: inferring requirements loads the model in a fresh environment (seconds).
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={ort.__version__}"],
    )
    tracking.client().log_outputs(run.info.run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


# --- agreement: one complete run per checkpoint ----------------------------------------------


def agree(store: Store, training: Training, *, parts=PARTS, live_export=None) -> list[str]:
    """Make the store hold one complete run for the checkpoint in `training.outputs`: find the
    run that trained it (rebuild one from the outputs if there is none) and record each of
    `parts` whose outputs exist and are not recorded yet. Returns what was done (nothing, when
    the store already agrees)."""
    outputs = training.outputs
    md5 = file_md5(outputs.checkpoint)
    wanted = {
        tag: value
        for part, tag, value in (
            ("evaluation", EVALUATION_TAG, evaluation_digest(outputs)),
            ("export", EXPORT_TAG, export_digest(outputs)),
        )
        if part in parts and value is not None
    }
    runs = training_runs(store.experiment_id, md5)
    complete = [r for r in runs if all(r.data.tags.get(t) == v for t, v in wanted.items())]
    if complete and live_export is None:
        return []
    done = []
    run = (complete or runs or [None])[0]
    if run is None:
        run = rebuild(store, training)
        done.append(f"rebuilt run {run.info.run_id} from the outputs")
    tags = run.data.tags
    if wanted.get(EVALUATION_TAG) not in (None, tags.get(EVALUATION_TAG)):
        done.append(record_evaluation(store, run, training))
    if EXPORT_TAG in wanted and (live_export or wanted[EXPORT_TAG] != tags.get(EXPORT_TAG)):
        done.append(record_export(store, run, training, live_export))
    return done


def rebuild(store: Store, training: Training):
    """A run for a checkpoint no run in this store trained (a fresh store, a store that failed
    mid-run, outputs from DVC's cache or a colleague): the recipe, per-epoch history, summary and
    model from the outputs, tagged `record.source=outputs`."""
    from mnist_pipeline.models import count_parameters

    with new_run(store, training, recipe=training.recipe, checksum=training.checksum) as run:
        log_recipe(
            run.info.run_id,
            training.variant,
            training.recipe,
            data=training.data,
            checksum=training.checksum,
            extra={"num_params": count_parameters(training.checkpoint[0])},
        )
        record_training(run.info.run_id, training)
    return tracking.client().get_run(run.info.run_id)


def training_runs(experiment_id: str, checkpoint_md5: str) -> list:
    """The completely logged runs that trained a checkpoint with these bytes: this host's first,
    then the newest. Two CPU hosts with one recipe write the same bytes, and each host's record
    belongs in its own run."""
    runs = tracking.client().search_runs(
        [experiment_id],
        filter_string=f"tags.`{CHECKPOINT_TAG}` = '{checkpoint_md5}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    return sorted(runs, key=lambda run: run.data.tags.get("host") != tracking.host_label())


# --- sync: every variant's outputs, at the end of each `dvc repro` ---------------------------

RECEIPT_TAG = "mnist_pipeline.synced"  # on the experiment: the outputs last found in agreement


def sync(params: Params, root: Path, *, verify: bool = False) -> int:
    """Make the store agree with every variant's pipeline outputs. Cheap when it already does:
    the outputs' fingerprint is compared with the one the last sync left on the experiment
    (on the local SQLite store, read without starting MLflow); `verify` looks at every run.
    Returns the number of variants whose record changed."""
    trainings = [
        Training(variant, paths.pipeline_outputs(root, variant), params.data)
        for variant in params.variants
        if paths.checkpoint_path(root, variant).is_file()
    ]
    uri = tracking.tracking_uri(root)
    name = tracking.experiment_name(params.data.dataset)
    fingerprint = _fingerprint(trainings, name)
    if not verify and _receipt(uri, name) == fingerprint:
        print(f"sync: {uri} agrees with the outputs of {len(trainings)} variants; nothing to do")
        return 0
    store = open_store(root, params.data.dataset)
    changed = 0
    for training in trainings:
        done = agree(store, training)
        changed += bool(done)
        for line in done:
            print(f"{training.variant}: {line}")
    tracking.client().set_experiment_tag(store.experiment_id, RECEIPT_TAG, fingerprint)
    print(f"sync: {uri} agrees with the outputs of {len(trainings)} variants ({changed} recorded)")
    return changed


def _fingerprint(trainings: list[Training], experiment: str) -> str:
    state = [
        (
            t.variant,
            file_md5(t.outputs.checkpoint),
            evaluation_digest(t.outputs),
            export_digest(t.outputs),
        )
        for t in trainings
    ]
    return hashlib.md5(json.dumps([experiment, state]).encode()).hexdigest()


def _receipt(uri: str, experiment: str) -> str | None:
    """The fingerprint the last sync left on `experiment`, read straight from a local SQLite
    store (importing MLflow costs 2-3 s, more than a no-op `dvc repro` may); None elsewhere, or
    whenever anything is unexpected: the full check then runs."""
    import sqlite3
    from urllib.parse import unquote

    if not uri.startswith("sqlite:///") or os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return None
    path = Path(unquote(uri[len("sqlite:///") :]))
    if not path.is_file():
        return None
    query = (
        "SELECT t.value FROM experiment_tags t JOIN experiments e"
        " ON e.experiment_id = t.experiment_id"
        " WHERE e.name = ? AND e.lifecycle_stage = 'active' AND t.key = ?"
    )
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            row = db.execute(query, (experiment, RECEIPT_TAG)).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


# --- a search (`mnist-pipeline tune`): a parent run, a child run per trial ----------------------

OUTCOME_TAG = "tune.outcome"  # completed | stopped-early | diverged | failed | retried
TRIAL_TAG = "tune.trial_id"
SEARCH_KIND = "search"  # the run.kind of a search's parent run


@contextlib.contextmanager
def search_run(store: Store, variant: str, description: dict[str, str]):
    """The search's parent run: its parameters (space, algorithm, scheduler) logged first."""
    from mlflow.entities import Param

    tags = run_tags(store, variant=variant, device=("ray", "cluster"), one_off=True)
    tags[tracking.RUN_KIND_TAG] = SEARCH_KIND
    with started_run(store.experiment_id, name=tracking.run_name(variant), tags=tags) as run:
        params = [Param(k, v) for k, v in description.items()]
        tracking.client().log_batch(run.info.run_id, params=params)
        yield run


def set_outcome(run_id: str, outcome: str, note: str = "") -> None:
    tracking.client().set_tag(run_id, OUTCOME_TAG, outcome)
    if note:
        tracking.client().set_tag(run_id, f"{OUTCOME_TAG}.note", first_line(note, limit=400))


def end_trial_run(experiment_id: str, trial_id: str, how: tuple[str, str]) -> str:
    """End the runs of trial `trial_id` still RUNNING (their process stopped, or died, before it
    could) with `how` = (outcome, status); return the outcome of its latest run."""
    client = tracking.client()
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{TRIAL_TAG}` = '{trial_id}'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if OUTCOME_TAG not in run.data.tags:
            client.set_tag(run.info.run_id, OUTCOME_TAG, how[0])
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, how[1])
    if not runs:
        return how[0]
    latest = client.get_run(runs[0].info.run_id)
    return latest.data.tags.get(OUTCOME_TAG, how[0])


def end_running_trials(experiment_id: str, parent_run_id: str, how: tuple[str, str]) -> None:
    """End the search's trial runs still RUNNING with `how` = (outcome, status)."""
    client = tracking.client()
    running = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    for run in client.search_runs([experiment_id], running):
        client.set_tag(run.info.run_id, OUTCOME_TAG, how[0])
        client.set_terminated(run.info.run_id, how[1])


def log_trial_model(run_id: str, model, variant: str, recipe: dict) -> str:
    """The best trial's kept weights as a logged model on its run; the run keeps its status."""
    import mlflow

    from mnist_pipeline.logged_model import log_model

    client = tracking.client()
    status = client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id, nested=True):
        model_id = log_model(model, variant, params={"variant": variant, **recipe})
    client.set_terminated(run_id, status)
    return model_id


def end_search(run_id: str, counts: dict[str, int], *, best: dict | None, accuracy=None) -> None:
    """The search's outcome on its parent run: trial counts, the best recipe and accuracy."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    metrics = [Metric(f"trials/{k}", v, now, 0) for k, v in counts.items()]
    if accuracy is not None:
        metrics.append(Metric("best/val_accuracy", accuracy, now, 0))
    params = [Param(k, str(v)) for k, v in (best or {}).items()]
    tracking.client().log_batch(run_id, metrics=metrics, params=params)
