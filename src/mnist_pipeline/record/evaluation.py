"""The evaluation record and the registry."""

import contextlib
import io
import json
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from mnist_pipeline import metrics, paths, plots, tracking
from mnist_pipeline.dataset import FILES, read_idx
from mnist_pipeline.record import store as runs
from mnist_pipeline.record.agree import evaluation_digest
from mnist_pipeline.record.training import CHECKPOINT_TAG, FORM_TAG, Training, as_metrics

EVALUATION_TAG = "record.evaluation"  # digest of the evaluation outputs recorded
ALIAS = "champion"
ACCURACY_TAG = "test_accuracy"
HOSTS_TAG = "hosts"  # a version: every host whose run wrote its checkpoint's bytes
DEVICES_TAG = "devices"  # and the devices they trained on


def read_evaluation(store: runs.Store, training: Training, folder: Path) -> dict[str, float]:
    """The figures of `training`'s evaluation outputs, and its artifacts drawn into `folder`."""
    outputs = training.outputs
    y, pred = metrics.read_predictions(outputs.predictions)
    cm = metrics.confusion(y, pred)
    written = json.loads(outputs.test_metrics.read_text())
    figures = metrics.classification_metrics(cm, written["test/loss"]) | written
    images = read_idx(paths.data_dir(store.root, store.dataset) / FILES[2])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test_metrics.json").write_text(json.dumps(figures, indent=2))
    (folder / "per_class.csv").write_text(metrics.per_class_csv(cm))
    np.savetxt(folder / "confusion_matrix.csv", cm.numpy(), fmt="%d", delimiter=",")
    plots.confusion_matrix(cm, folder / "confusion_matrix.png", title=training.variant)
    plots.misclassified(images, y, pred, folder / "misclassified.png", title=training.variant)
    return figures


def record_evaluation(
    store: runs.Store, run, training: Training, figures: dict, folder: Path
) -> str:
    """Into `run`: the test metrics, the artifacts in `folder`, a registered version; a line."""
    client, run_id = tracking.client(), run.info.run_id
    test_set = training.datasets()["evaluation"]
    runs.log_datasets(run_id, {"evaluation": test_set})
    model_id = logged_model_id(run)
    link = {"model_id": model_id, "dataset_name": test_set.name, "dataset_digest": test_set.digest}
    shown = {k: v for k, v in figures.items() if not k.startswith("test/accuracy_class_")}
    client.log_batch(run_id, metrics=as_metrics(shown, **link))
    client.log_artifacts(run_id, str(folder), artifact_path="evaluation")
    line = "evaluation recorded"
    if model_id is not None:
        line += "; " + register(client, run, model_id, store.dataset, figures["test/accuracy"])
    client.set_tag(run_id, EVALUATION_TAG, evaluation_digest(training.outputs))
    return line


def logged_model_id(run, form: str | None = "torch") -> str | None:
    """The id of the logged model `run` made (of `form`; None: any), or None."""
    where = f"source_run_id = '{run.info.run_id}'"
    where += f" AND tags.`{FORM_TAG}` = '{form}'" if form else ""
    found = mlflow.search_logged_models([run.info.experiment_id], where, output_format="list")
    return found[0].model_id if found else None


def register(client, run, model_id: str, dataset: str, accuracy: float) -> str:
    """The checkpoint bytes' version of `<dataset>-<variant>`, and the champion; a line."""
    tags = run.data.tags
    name = f"{dataset}-{tags['variant']}"
    version = _version(client, name, model_id, tags)
    hosts = _joined(version.tags.get(HOSTS_TAG), tags.get("host", "unknown"))
    devices = _joined(version.tags.get(DEVICES_TAG), tags.get("device", "unknown"))
    values = {
        HOSTS_TAG: ",".join(hosts),
        DEVICES_TAG: ",".join(devices),
        CHECKPOINT_TAG: tags[CHECKPOINT_TAG],
        runs.RUN_KIND_TAG: tags.get(runs.RUN_KIND_TAG, "pipeline"),
        ACCURACY_TAG: f"{accuracy:.6f}",
    }
    for key, value in values.items():
        if version.tags.get(key) != value:
            client.set_model_version_tag(name, version.version, key, value)
    client.update_model_version(name, version.version, _description(tags, accuracy, hosts))
    champion = _promote(client, name, version, accuracy, tags)
    return f"registered {name} version {version.version} ({champion})"


def _joined(listed: str | None, one: str) -> list[str]:
    return sorted({*(listed or "").split(","), one} - {""})


def _promote(client, name: str, version, accuracy: float, tags: dict) -> str:
    """Move the champion alias to a better `version` (the first: not in `dvc exp run`)."""
    experiment = tags.get(runs.EXP_NAME_TAG)
    # Two hosts evaluating at once race to set the alias: the loser looks at the champion again.
    for attempt in range(3):
        champion, best = _champion(client, name)
        beats = champion is not None and accuracy > best and champion.version != version.version
        promoted = experiment is None if champion is None else beats
        if not promoted:
            break
        try:
            client.set_registered_model_alias(name, ALIAS, version.version)
            break
        except MlflowException:
            if attempt == 2:
                raise
    if promoted or (champion and champion.version == version.version):
        return ALIAS
    if champion is None:
        return f"no {ALIAS}: experiment {experiment} waits for the baseline (`dvc repro`)"
    return f"{ALIAS} stays version {champion.version} ({best:.4f})"


def _version(client, name: str, model_id: str, tags: dict):
    """The version of these checkpoint bytes (by its MD5 tag), else a new one of `model_id`."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name,
                description=(
                    f"{tags['variant']} trained on {tags.get('data.dataset')} by mnist-pipeline. "
                    "Input: float32 images (N, 1, 28, 28) in [0, 1]; output: class "
                    f"probabilities (N, 10). The alias {ALIAS} marks the version with the best "
                    "test accuracy; each version is one checkpoint, whichever hosts wrote it."
                ),
            )
        except MlflowException as err:  # another host created it at the same moment: fine
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    md5 = tags[CHECKPOINT_TAG]
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get(CHECKPOINT_TAG) == md5 or version.source == f"models:/{model_id}":
            return version
    # MLflow's registration links the version to the logged model; its stderr repeats our line.
    with contextlib.redirect_stderr(io.StringIO()):
        return mlflow.register_model(f"models:/{model_id}", name)


def _description(tags: dict, accuracy: float, hosts: list[str]) -> str:
    """Plain text: the registry shows a version's description as written."""
    rebuilt = tags.get(runs.SOURCE_TAG) == "outputs"
    source = "rebuilt from the pipeline's outputs" if rebuilt else "trained"
    experiment = f", DVC experiment {tags[runs.EXP_NAME_TAG]}" if runs.EXP_NAME_TAG in tags else ""
    return (
        f"Test accuracy {accuracy:.2%} on the test set. Checkpoint "
        f"{tags[CHECKPOINT_TAG][:12]}, {source} on {', '.join(hosts)} "
        f"({tags.get(runs.RUN_KIND_TAG, 'pipeline')} run{experiment}, commit "
        f"{tags.get('git.commit', 'unknown')[:12]})."
    )


def _champion(client, name: str):
    try:
        champion = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None, -1.0
    return champion, float(champion.tags.get(ACCURACY_TAG, "-1"))
