"""Each command below the command line: run the stage, then record it in MLflow.

Each imports its stage inside (torch, MLflow, ONNX): a command pays only for what it uses."""

from pathlib import Path

from mnist_pipeline import paths, signals
from mnist_pipeline.config import Params, check_variant, with_overrides
from mnist_pipeline.errors import ConfigError, PipelineError
from mnist_pipeline.models import count_parameters
from mnist_pipeline.params_file import apply_recipe

SYNC_HINT = "MLflow records it at the end of `dvc repro` (or `mnist-pipeline sync`)"


def download(params: Params, root: Path) -> None:
    from mnist_pipeline.download import download

    download(params.data, root)


def train(params: Params, root: Path, variant: str, **overrides) -> str:
    """Train `variant` in a live MLflow run (a one-off if `overrides` change it); the run's id."""
    from mnist_pipeline import train as stage
    from mnist_pipeline.device import resolve_device
    from mnist_pipeline.record import store as runs
    from mnist_pipeline.record import training as record

    recipe = with_overrides(params, check_variant(variant), **overrides)
    outputs = paths.outputs_for(root, variant, one_off=recipe != params)
    resolve_device(recipe.train.device)  # a device this host lacks: before the store is touched
    store = runs.open_store(root, params.data.dataset)  # fails fast: before any work
    job = stage.prepare(recipe, variant, root, outputs)
    training = record.Training(variant, outputs, params.data)
    extra = {"device_resolved": job.device.type, "dataset": job.data.name}
    extra |= {"train_size": len(job.setup.train.y), "num_params": count_parameters(job.setup.model)}
    values, checksum = job.values, job.data.checksum
    with signals.between_steps():
        with record.new_run(
            store, training, recipe=values, checksum=checksum, device=job.device
        ) as run:
            record.log_recipe(run.info.run_id, variant, params.data, values, checksum, extra)
            log_epoch = record.EpochLogger(run.info.run_id)
            fitted = stage.run(job, log_epoch)
            _check_logged(log_epoch.error, variant, outputs, root, store.uri)
            record.log_timings(run.info.run_id, fitted.history)
        record.record_training(run.info.run_id, training, live=True)
        if signals.received():
            print(f"{variant}: a signal came while saving; the run is done")
    where = outputs.checkpoint.relative_to(root)
    print(f"{variant}: MLflow run {run.info.run_id} ({run.info.run_name}), {where}")
    if outputs.one_off:
        print(
            f"{variant}: a one-off recipe: the pipeline's outputs are unchanged; score it with "
            f"`mnist-pipeline evaluate --variant {variant} --one-off`"
        )
    return run.info.run_id


def _check_logged(error: str | None, variant: str, outputs, root: Path, uri: str) -> None:
    """A store that failed mid-run: the results are saved; say how to record them."""
    if error is None:
        return
    saved = ", ".join(str(p.relative_to(root)) for p in (outputs.checkpoint, outputs.train_metrics))
    again = f"evaluate --variant {variant} --one-off" if outputs.one_off else "sync"
    raise PipelineError(
        f"{variant}: the tracking store at {uri} failed during training ({error}); training "
        f"finished and its results are saved ({saved}). When the store takes them again (it "
        f"answers, or accepts this account), `mnist-pipeline {again}` records them (or re-run "
        "the training)"
    )


def evaluate(params: Params, root: Path, variant: str, one_off: bool = False) -> None:
    """Score the pipeline's checkpoint (or the one-off's, which is recorded at once)."""
    from mnist_pipeline.evaluate import evaluate

    outputs = paths.outputs_for(root, check_variant(variant), one_off=one_off)
    if not one_off:
        evaluate(params, variant, root, outputs)
        print(f"{variant}: {SYNC_HINT}")
        return
    from mnist_pipeline.record import agree, store, training

    found = store.open_store(root, params.data.dataset)  # fails fast: before any work
    evaluate(params, variant, root, outputs)
    for line in agree.agree(found, training.Training(variant, outputs, params.data)):
        print(f"{variant}: {line}")


def export(params: Params, root: Path, variant: str) -> None:
    from mnist_pipeline.export import export

    export(check_variant(variant), paths.pipeline_outputs(root, variant))
    print(f"{variant}: {SYNC_HINT}, with what this host measures of each form")


def report(params: Params, root: Path) -> None:
    from mnist_pipeline.report import report

    report(params, root)


def sync(params: Params, root: Path, verify: bool = False) -> None:
    from mnist_pipeline.record.agree import sync

    sync(params, root, verify=verify)


def compare(params: Params, root: Path, *, exp, all_runs, csv, markdown, chart, **options) -> None:
    """`options`: experiment, variants, hosts, one_off (`compare.compare`'s)."""
    from mnist_pipeline.compare import compare

    paths_out = {"csv_path": csv, "markdown_path": markdown, "chart_path": chart}
    compare(params, root, dvc_exp=exp, latest_only=not all_runs, **paths_out, **options)


def tune(
    params: Params, root: Path, variant: str, *, apply: bool, params_file: Path, **options
) -> None:
    """Search `variant`'s recipe (`options`: TuneOptions'); `apply`: the best into `params_file`."""
    from mnist_pipeline.tune import TuneOptions, tune

    for flag, least in {"samples": 1, "max_concurrent": 1, "max_failures": 0}.items():
        if options.get(flag) is not None and options[flag] < least:
            name = flag.replace("_", "-")
            raise ConfigError(f"--{name}: must be at least {least}, got {options[flag]}")
    if options["cpus_per_trial"] <= 0 or options["gpus_per_trial"] < 0:
        raise ConfigError("--cpus-per-trial must be above 0 and --gpus-per-trial at least 0")
    params.search_space(check_variant(variant))  # a bad or missing tune: section, before Ray
    early_stopping = not options.pop("no_early_stopping")
    best = tune(params, variant, root, TuneOptions(**options, early_stopping=early_stopping))
    if apply:
        apply_recipe(params_file, variant, best)
