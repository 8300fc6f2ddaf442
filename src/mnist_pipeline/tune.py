"""The search: a variant's recipe searched on Ray Tune, a parent run with a child run per trial.

Optuna's TPE proposes recipes from the `tune:` space, ASHA stops the trials that fall behind; a
trial writes no DVC output. Ray is imported inside: the flags and params.yaml are checked first."""

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist_pipeline import paths
from mnist_pipeline.config import Params, Recipe, SearchSpace
from mnist_pipeline.dataset import Dataset, load_dataset
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.models import build_model
from mnist_pipeline.record import search as record
from mnist_pipeline.record import store as runs
from mnist_pipeline.trial import (
    DIVERGED,
    METRIC,
    MODE,
    RUN_ID_KEY,
    TrialJob,
    recipe_for,
    run_trial,
    tensor_digest,
)


@dataclass(frozen=True)
class TuneOptions:
    samples: int = 8
    max_concurrent: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    address: str | None = None  # None: RAY_ADDRESS, else Ray on this machine
    max_failures: int = 2
    early_stopping: bool = True
    storage: Path | None = None
    seed: int | None = None  # Optuna's sampler; default train.seed


def tune(params: Params, variant: str, root: Path, options: TuneOptions) -> Recipe:
    """The best recipe for `variant`; interrupted, the runs end KILLED, the best so far recorded."""
    space = params.search_space(variant)
    store = runs.open_store(root, params.data.dataset)  # fails fast: before any work
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    # On a cluster, every node logs to the store: a file on this machine is not one it can.
    if address and address != "local" and store.uri.split(":", 1)[0] in ("sqlite", "file", ""):
        raise PipelineError(
            f"the tracking store {store.uri} is a file on this machine, which the cluster's other "
            "nodes cannot write to; set MLFLOW_TRACKING_URI to a tracking server all nodes "
            "reach (docs/tune.md)"
        )
    data = load_dataset(root, params.data.dataset)
    split = {"val_size": params.train.val_size, "seed": params.train.seed}
    inputs = runs.training_inputs(params.data, data.checksum, **split)
    description = _describe(space, options, variant)
    with _ray(address, store.uri), record.search_run(store, variant, description, inputs) as parent:
        tags, digest = record.search_tags(store, variant, "trial"), tensor_digest(data)
        job = TrialJob(variant, params, store.experiment_id, parent.info.run_id, tags, digest)
        outcomes = _trial_outcomes(store.experiment_id)
        grid = _tuner(job, data, space, options, root, outcomes).fit()  # Ctrl-C: returns early
        if sum(outcomes.counts.values()) >= options.samples:
            return _conclude(grid, job, outcomes.counts)
        interrupted = ("interrupted", "KILLED")
        record.end_running_trials(store.experiment_id, parent.info.run_id, interrupted)
        best = None
        with contextlib.suppress(PipelineError):
            best = _conclude(grid, job, outcomes.counts)
        raise runs.EndRun("KILLED")
    done = f"; the best so far: MLflow run {parent.info.run_id}" if best else ""
    raise PipelineError(f"interrupted after {_counted(outcomes.counts)}{done}", 130)


@contextlib.contextmanager
def _ray(address: str | None, tracking_uri: str) -> Iterator[None]:
    """Join the cluster at `address`, else start Ray here; every worker gets the store's URI."""
    import ray

    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, include_dashboard=False)
    except ConnectionError as err:
        raise PipelineError(
            f"no Ray cluster answers at {address} ({err}); start one with `ray start --head`, "
            "or leave out --address to run Ray on this machine"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def _asha(space: SearchSpace) -> dict[str, int]:
    """ASHA's settings (time unit: one reported epoch), keeping the better half at each rung."""
    return {"grace_period": 1, "reduction_factor": 2, "max_t": max(space.epochs)}


def _describe(space: SearchSpace, options: TuneOptions, variant: str) -> dict[str, str]:
    scheduler = "none (every trial runs all its epochs)"
    if options.early_stopping:
        asha = ", ".join(f"{k}={v}" for k, v in _asha(space).items())
        scheduler = f"ASHA(metric={METRIC}, {asha})"
    return {
        "variant": variant,
        "search.space": json.dumps(dataclasses.asdict(space)),
        "search.algorithm": "optuna TPE (ray.tune.search.optuna.OptunaSearch)",
        "search.scheduler": scheduler,
        "search.samples": str(options.samples),
        "search.max_concurrent": str(options.max_concurrent or "cluster's capacity"),
        "search.resources_per_trial": f"cpu={options.cpus_per_trial} gpu={options.gpus_per_trial}",
        "search.max_failures": str(options.max_failures),
    }


def _tuner(
    job: TrialJob, data: Dataset, space: SearchSpace, options: TuneOptions, root: Path, outcomes
):
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(run_trial, data=data, job=job),
        {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial},
    )
    seed = job.params.train.seed if options.seed is None else options.seed
    search = OptunaSearch(seed=seed)
    if options.max_concurrent:
        search = ConcurrencyLimiter(search, max_concurrent=options.max_concurrent)
    scheduler = ASHAScheduler(**_asha(space)) if options.early_stopping else None
    storage = (options.storage or root / paths.ONE_OFF_DIR / "tune").resolve()
    return ray_tune.Tuner(
        trainable,
        param_space={
            "lr": ray_tune.loguniform(*space.lr),
            "batch_size": ray_tune.choice(list(space.batch_size)),
            "epochs": ray_tune.choice(list(space.epochs)),
        },
        tune_config=ray_tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=search,
            scheduler=scheduler,
            num_samples=options.samples,
            # A free worker takes the next trial: no process to start, no imports (seconds).
            reuse_actors=True,
        ),
        run_config=ray_tune.RunConfig(
            name=f"{job.variant}-{job.parent_run_id[:8]}",
            storage_path=str(storage),
            failure_config=ray_tune.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=ray_tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
            ),
            callbacks=[outcomes],
            verbose=1,
        ),
    )


def _trial_outcomes(experiment_id: str):
    """Counts trials' outcomes; ends the run of one that ASHA stopped or whose node died."""
    from ray import tune as ray_tune

    class Outcomes(ray_tune.Callback):
        counts: dict[str, int] = {}  # noqa: RUF012 (one instance)

        def on_trial_recover(self, iteration, trials, trial, **info):
            self._end(trial, ("retried", "FAILED"), count=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, ("failed", "FAILED"))

        def on_trial_complete(self, iteration, trials, trial, **info):
            # ASHA stops a trial at its last epoch too (max_t), often before it ended its run.
            last = (trial.last_result or {}).get("epoch", 0)
            ran_all = last >= int(trial.config["epochs"])
            self._end(trial, ("completed", "FINISHED") if ran_all else ("stopped-early", "KILLED"))

        def _end(self, trial, how: tuple[str, str], count: bool = True) -> None:
            try:
                outcome = record.end_trial_run(experiment_id, trial.trial_id, how)
            except Exception as err:  # the store: the search goes on
                outcome = how[0]
                print(
                    f"warning: could not end trial {trial.trial_id}'s run: {err}", file=sys.stderr
                )
            if count:
                self.counts[outcome] = self.counts.get(outcome, 0) + 1

    return Outcomes()


def _conclude(grid, job: TrialJob, counts: dict[str, int]) -> Recipe:
    """The best trial's recipe and accuracy on the parent run, its kept weights a logged model."""
    parent_run_id = job.parent_run_id
    best = _best_trial(grid)
    if best is None:
        record.end_search(parent_run_id, counts, best=None)
        raise PipelineError(
            f"{job.variant}: no trial of the search reported a validation accuracy "
            f"({_counted(counts)}); see the runs under {parent_run_id}"
        )
    result, checkpoint, accuracy = best
    recipe = recipe_for(job.params, job.variant, result.config)
    values, run_id = dataclasses.asdict(recipe), result.metrics[RUN_ID_KEY]
    model_id = None
    if checkpoint is not None:
        model = build_model(job.variant, use_dropout=recipe.use_dropout)
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / paths.CHECKPOINT_FILE, map_location="cpu")
        model.load_state_dict(state)
        model_id = record.log_best_model(parent_run_id, model, values)
    chosen = {**values, "run_id": run_id, "model_id": model_id}
    best = {f"best.{k}": v for k, v in chosen.items()}
    record.end_search(parent_run_id, counts, best=best, accuracy=accuracy)
    print(
        f"{job.variant}: best validation accuracy {accuracy:.4f} with lr {recipe.lr:.4g}, "
        f"batch size {recipe.batch_size}, {recipe.epochs} epochs ({_counted(counts)}; "
        f"MLflow run {parent_run_id})"
    )
    return recipe


def _best_trial(grid):
    """(result, checkpoint, accuracy) of the best trial that did not diverge, or None."""
    best = None
    for result in grid:
        if result.metrics is None or METRIC not in result.metrics or result.metrics.get(DIVERGED):
            continue
        saved = result.best_checkpoints or [(None, result.metrics)]
        checkpoint, kept = max(saved, key=lambda c: c[1][METRIC])
        if best is None or kept[METRIC] > best[2]:
            best = (result, checkpoint, float(kept[METRIC]))
    return best


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "no trials"
