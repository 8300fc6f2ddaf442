"""Agreement, rebuild and sync: the store made a faithful view of the pipeline's outputs.

Each part tags a run with its outputs' digest: recorded once. A no-op `sync` compares the outputs'
fingerprint with this host's last without loading MLflow or torch (imported when there is work)."""

import contextlib
import functools
import hashlib
import json
import os
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import unquote

from mnist_pipeline import host, paths, tracking
from mnist_pipeline.config import Params
from mnist_pipeline.dataset import FILES, file_md5, read_idx
from mnist_pipeline.models import count_parameters

RECEIPT_TAG = "mnist_pipeline.synced"  # on the experiment, per host: the outputs last agreed
LATENCY_ENV = "MNIST_PIPELINE_LATENCY"  # "off": measure the forms' accuracy only, not their speed


def outputs_digest(*files: Path | None) -> str | None:
    """One MD5 for a set of output files; None when one of them is missing (not made yet)."""
    if any(f is None or not f.is_file() for f in files):
        return None
    return hashlib.md5("".join(file_md5(f) for f in files).encode()).hexdigest()


def evaluation_digest(outputs: paths.Outputs) -> str | None:
    return outputs_digest(outputs.test_metrics, outputs.predictions)


def measured_digest(outputs: paths.Outputs) -> str | None:
    """A run's `record.measured` tag once its host measured the current exports (and setting)."""
    found = outputs_digest(outputs.export_metrics, outputs.onnx, outputs.int8)
    return None if found is None else found + ("" if latency_on() else ":accuracy-only")


def latency_on() -> bool:
    return os.environ.get(LATENCY_ENV, "on").lower() not in ("off", "0", "no", "false")


def agree(store, training) -> list[str]:
    """Make the store hold complete runs for `training`'s checkpoint; what was done."""
    from mnist_pipeline.record import evaluation, export
    from mnist_pipeline.record.training import CHECKPOINT_TAG

    client, outputs, done = tracking.client(), training.outputs, []
    runs = training_runs(store.experiment_id, training.md5)
    if not runs:
        runs = [rebuild(store, training)]
        done.append(f"rebuilt run {runs[0].info.run_id} from the outputs")
    wanted = evaluation_digest(outputs)
    stale = [r for r in runs if wanted and r.data.tags.get(evaluation.EVALUATION_TAG) != wanted]
    if stale:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            figures = evaluation.read_evaluation(store, training, folder)
            for run in stale:
                line = evaluation.record_evaluation(store, run, training, figures, folder)
                done.append(f"{run.info.run_name}: {line}")
    wanted, here = measured_digest(outputs), host.host_label()
    mine = [r for r in runs if wanted and r.data.tags.get("host") == here]
    mine = [r for r in mine if CHECKPOINT_TAG in r.data.tags]
    mine = [r for r in mine if r.data.tags.get(export.MEASURED_TAG) != wanted]
    if mine:
        measured = export.measure(training, _test_set(store.root, store.dataset))
        for run in mine:
            line = export.record_export(store, client.get_run(run.info.run_id), training, measured)
            done.append(f"{run.info.run_name}: {line}")
    return done


def rebuild(store, training):
    """A run, made from the outputs, for a checkpoint no run in this store trained."""
    from mnist_pipeline.record import training as record

    recipe, checksum = training.recipe, training.checksum
    with record.new_run(store, training, recipe=recipe, checksum=checksum) as run:
        extra = {"num_params": count_parameters(training.checkpoint[0])}
        record.log_recipe(run.info.run_id, training.variant, training.data, recipe, checksum, extra)
    record.record_training(run.info.run_id, training)
    return tracking.client().get_run(run.info.run_id)


def training_runs(experiment_id: str, checkpoint_md5: str) -> list:
    """The complete runs that trained these checkpoint bytes, this host's first, then newest."""
    found = f"tags.`checkpoint.md5` = '{checkpoint_md5}' and attributes.status = 'FINISHED'"
    newest = ["attributes.start_time DESC"]
    runs = tracking.client().search_runs([experiment_id], filter_string=found, order_by=newest)
    return sorted(runs, key=lambda run: run.data.tags.get("host") != host.host_label())


@functools.cache
def _test_set(root: Path, dataset: str):
    """The test images (float32, CPU) and labels (numpy), read once a process."""
    import torch

    from mnist_pipeline.device import as_float

    folder = paths.data_dir(root, dataset)
    x = as_float(read_idx(folder / FILES[2]), torch.device("cpu"))
    return x, read_idx(folder / FILES[3]).long().numpy()


def sync(params: Params, root: Path, *, verify: bool = False) -> int:
    """Make the store agree with every variant's outputs; how many variants' records changed."""
    outputs = {v: paths.pipeline_outputs(root, v) for v in params.variants}
    outputs = {v: o for v, o in outputs.items() if o.checkpoint.is_file()}
    uri = tracking.tracking_uri(root)
    name = tracking.experiment_name(params.data.dataset)
    fingerprint = _fingerprint(outputs, name)
    if not verify and _receipt(uri, name) == fingerprint:
        print(f"sync: {uri} agrees with the outputs of {len(outputs)} variants; nothing to do")
        return 0
    from mnist_pipeline.record.store import open_store  # MLflow: there is work to do
    from mnist_pipeline.record.training import Training

    store = open_store(root, params.data.dataset)
    changed = 0
    for variant, found in outputs.items():
        done = agree(store, Training(variant, found, params.data))
        changed += bool(done)
        for line in done:
            print(f"{variant}: {line}")
    _leave_receipt(store.experiment_id, fingerprint)
    print(f"sync: {uri} agrees with the outputs of {len(outputs)} variants ({changed} recorded)")
    return changed


def _leave_receipt(experiment_id: str, fingerprint: str) -> None:
    """Two syncs on one host may both insert the receipt: the one refused tries again."""
    from mlflow.exceptions import MlflowException

    for attempt in (1, 2):
        try:
            return tracking.client().set_experiment_tag(experiment_id, _receipt_key(), fingerprint)
        except MlflowException:
            if attempt == 2:
                raise


def _receipt_key() -> str:
    """One receipt per host: each host measures its own figures."""
    return f"{RECEIPT_TAG}.{hashlib.md5(host.host_label().encode()).hexdigest()[:12]}"


def _fingerprint(outputs: dict[str, paths.Outputs], experiment: str) -> str:
    state = [
        (v, file_md5(o.checkpoint), evaluation_digest(o), measured_digest(o))
        for v, o in outputs.items()
    ]
    return hashlib.md5(json.dumps([experiment, host.host_label(), state]).encode()).hexdigest()


def _receipt(uri: str, experiment: str) -> str | None:
    """This host's last fingerprint from a local SQLite store, without MLflow (slow to import)."""
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
            row = db.execute(query, (experiment, _receipt_key())).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None
