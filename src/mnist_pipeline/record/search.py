"""A search's runs: a parent per search and a child per trial, the variant under `search.variant`
(grouping by `variant` shows pipeline runs only)."""

import contextlib
import socket

from mlflow.entities import Param

from mnist_pipeline import host, tracking
from mnist_pipeline.errors import first_line
from mnist_pipeline.record import store as runs
from mnist_pipeline.record.training import as_metrics, log_model

OUTCOME_TAG = "tune.outcome"  # completed | stopped-early | diverged | failed | retried
TRIAL_TAG = "tune.trial_id"
VARIANT_TAG = "search.variant"


def search_tags(store: runs.Store, variant: str, kind: str) -> dict[str, str]:
    """A search's runs' tags (`kind`: search or trial): the pipeline's, the variant moved."""
    tags = runs.shared_tags(store, variant=variant, kind=kind)
    tags[VARIANT_TAG] = tags.pop("variant")
    return tags


@contextlib.contextmanager
def search_run(store: runs.Store, variant: str, description: dict[str, str], inputs: dict):
    """The search's parent run, on the driver, its settings and data (`inputs`) logged first."""
    tags = search_tags(store, variant, "search")
    tags |= {"host": host.host_label(), "hostname": socket.gethostname()}
    space = description["search.space"]
    tags[runs.NOTE_TAG] = (
        f"Recipe search for {variant} from host {tags['host']}: {description['search.samples']} "
        f"trials over {space} ({description['search.algorithm']}; "
        f"{description['search.scheduler']}). Each trial is a child run; the best trial's "
        "recipe is `best.*` and its kept weights the logged model of this run."
    )
    name = f"search · {host.run_name(variant)}"
    with runs.started_run(store.experiment_id, name=name, tags=tags) as run:
        params = [Param(k, v) for k, v in description.items()]
        tracking.client().log_batch(run.info.run_id, params=params)
        runs.log_datasets(run.info.run_id, inputs)
        yield run


def set_outcome(run_id: str, outcome: str, note: str = "") -> None:
    tracking.client().set_tag(run_id, OUTCOME_TAG, outcome)
    if note:
        tracking.client().set_tag(run_id, f"{OUTCOME_TAG}.note", first_line(note, limit=400))


def end_trial_run(experiment_id: str, trial_id: str, how: tuple[str, str]) -> str:
    """End trial `trial_id`'s RUNNING runs with `how` = (outcome, status); its latest outcome."""
    client = tracking.client()
    trial = f"tags.`{TRIAL_TAG}` = '{trial_id}'"
    found = client.search_runs([experiment_id], trial, order_by=["attributes.start_time DESC"])
    for run in found:
        outcome = run.data.tags.get(OUTCOME_TAG)
        if outcome is None:
            client.set_tag(run.info.run_id, OUTCOME_TAG, how[0])
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FINISHED" if outcome == "completed" else how[1])
    if not found:
        return how[0]
    latest = client.get_run(found[0].info.run_id)
    return latest.data.tags.get(OUTCOME_TAG, how[0])


def end_running_trials(experiment_id: str, parent_run_id: str, how: tuple[str, str]) -> None:
    client = tracking.client()
    running = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    for run in client.search_runs([experiment_id], running):
        client.set_tag(run.info.run_id, OUTCOME_TAG, how[0])
        client.set_terminated(run.info.run_id, how[1])


def log_best_model(parent_run_id: str, model, recipe: dict) -> str:
    run = tracking.client().get_run(parent_run_id)
    variant = run.data.tags[VARIANT_TAG]
    return log_model(run, model, "torch", {"variant": variant, **recipe})


def end_search(run_id: str, counts: dict[str, int], *, best: dict | None, accuracy=None) -> None:
    figures = {f"trials/{k}": v for k, v in counts.items()}
    if accuracy is not None:
        figures["best/val_accuracy"] = accuracy
    metrics = as_metrics(figures)
    params = [Param(k, str(v)) for k, v in (best or {}).items()]
    tracking.client().log_batch(run_id, metrics=metrics, params=params)
