"""The Model Registry: each evaluated model becomes a version of `<dataset>-<variant>`, and the
alias `champion` moves to a version only when its test accuracy beats the champion's.

    models:/mnist-mlp512_relu@champion      # the best mlp512_relu so far, on any host
"""

from __future__ import annotations

from mnist_pipeline import tracking

ALIAS = "champion"
ACCURACY_TAG = "test_accuracy"


def model_name(dataset: str, variant: str) -> str:
    return f"{dataset}-{variant}"


def register(client, run, model_id: str, *, dataset: str, variant: str, accuracy: float) -> str:
    """Register the logged model `model_id` (once: recording the same run again reuses its
    version), describe and tag the version, and make it the champion if it beats the current one.
    A version made under `dvc exp run` never becomes the first champion: the baseline's (the
    pipeline run of a commit) is registered first, so an experiment competes with it. Returns a
    line saying what happened."""
    from mlflow.exceptions import MlflowException

    name = model_name(dataset, variant)
    tags = run.data.tags
    version = _version(client, name, model_id, dataset, variant)
    client.update_model_version(name, version.version, description=_description(tags, accuracy))
    for key, value in {
        "host": tags.get("host", "unknown"),
        "device": tags.get("device", "unknown"),
        "device.name": tags.get("device.name", "unknown"),
        tracking.RUN_KIND_TAG: tags.get(tracking.RUN_KIND_TAG, "pipeline"),
        ACCURACY_TAG: f"{accuracy:.6f}",
    }.items():
        client.set_model_version_tag(name, version.version, key, value)

    # Two hosts evaluating at once may both try to set the alias; the store refuses the second
    # (a unique key), which then looks at the champion again.
    experiment = tags.get("dvc.exp.name")
    for attempt in range(3):
        champion, best = _champion(client, name)
        if champion is None:
            promoted = experiment is None
        else:
            promoted = accuracy > best and champion.version != version.version
        if not promoted:
            break
        try:
            client.set_registered_model_alias(name, ALIAS, version.version)
            break
        except MlflowException:
            if attempt == 2:
                raise
    if promoted or (champion and champion.version == version.version):
        state = ALIAS
    elif champion is None:
        state = f"no {ALIAS}: experiment {experiment} waits for the baseline (`dvc repro`)"
    else:
        state = f"{ALIAS} stays version {champion.version} ({best:.4f})"
    return f"registered {name} version {version.version} ({state})"


def _version(client, name: str, model_id: str, dataset: str, variant: str):
    """The registered version of `model_id`, created (with its registered model) if need be."""
    import contextlib
    import io

    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name,
                description=(
                    f"{variant} trained on {dataset} by mnist-pipeline. Input: float32 images "
                    "(N, 1, 28, 28) in [0, 1]; output: class probabilities (N, 10). The alias "
                    f"`{ALIAS}` marks the version with the best test accuracy."
                ),
            )
        except MlflowException as err:  # another host created it at the same moment: fine
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.source == f"models:/{model_id}":
            return version
    # MLflow's own registration also links the version to the logged model (the Models tab's
    # "Registered models" column); its lines on stderr repeat what `register` returns.
    with contextlib.redirect_stderr(io.StringIO()):
        return mlflow.register_model(f"models:/{model_id}", name)


def _description(tags: dict, accuracy: float) -> str:
    where = f"`{tags.get('host', 'unknown')}` ({tags.get('device', 'unknown')})"
    rebuilt = tags.get("record.source") == "outputs"
    source = "Rebuilt from the pipeline's outputs" if rebuilt else "Trained"
    experiment = f", DVC experiment `{tags['dvc.exp.name']}`" if "dvc.exp.name" in tags else ""
    return (
        f"Test accuracy **{accuracy:.2%}** (10,000 test images). {source} on "
        f"{where}, {tags.get(tracking.RUN_KIND_TAG, 'pipeline')} run{experiment}, commit "
        f"`{tags.get('git.commit', 'unknown')[:12]}`."
    )


def _champion(client, name: str):
    """The champion version and its test accuracy, or (None, -1)."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None, -1.0
    return champion, float(champion.tags.get(ACCURACY_TAG, "-1"))
