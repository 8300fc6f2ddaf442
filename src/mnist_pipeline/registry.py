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


def register(client, run, model_id: str, dataset: str, variant: str, accuracy: float):
    """Register the logged model `model_id` (once: re-evaluating the same run reuses its
    version), tag the version, and make it the champion if it beats the current one. Returns
    the version and whether it is now the champion."""
    from mlflow.exceptions import MlflowException

    name = model_name(dataset, variant)
    try:
        client.get_registered_model(name)
    except MlflowException:
        _create_registered_model(client, name, dataset, variant)
    existing = [
        v
        for v in client.search_model_versions(f"name = '{name}'")
        if v.source == f"models:/{model_id}"
    ]
    if existing:
        version = existing[0]
    else:
        import mlflow

        # MLflow's own registration: it also links the version to the logged model (the Models
        # tab's "Registered models" column).
        version = mlflow.register_model(f"models:/{model_id}", name)
    tags = run.data.tags
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
    for attempt in range(3):
        champion, best = _champion(client, name)
        promoted = champion is None or (accuracy > best and champion.version != version.version)
        if not promoted:
            break
        try:
            client.set_registered_model_alias(name, ALIAS, version.version)
            break
        except MlflowException:
            if attempt == 2:
                raise
    state = (
        "champion"
        if promoted or (champion and champion.version == version.version)
        else (f"champion stays version {champion.version} ({best:.4f})")
    )
    print(f"{variant}: registered {name} version {version.version} ({state})")
    return version, promoted


def _create_registered_model(client, name: str, dataset: str, variant: str) -> None:
    """Create the registered model; another host creating it at the same moment is fine."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name,
            description=(
                f"{variant} trained on {dataset} by mnist-pipeline. Input: float32 images "
                "(N, 1, 28, 28) in [0, 1]; output: class probabilities (N, 10). The alias "
                f"`{ALIAS}` marks the version with the best test accuracy."
            ),
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _champion(client, name: str):
    """The champion version and its test accuracy, or (None, -1)."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None, -1.0
    return champion, float(champion.tags.get(ACCURACY_TAG, "-1"))
