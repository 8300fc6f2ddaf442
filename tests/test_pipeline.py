"""The real pipeline: `dvc repro` in a temporary git repository holding a copy of the project,
on the tiny data set served as a mirror, two variants shrunk to one short epoch.

The tests share the module's repository, in file order; each leaves it up to date (`dvc status`
clean), but the experiment, the last. What several tests need done to it (a recipe changed, an
identical retrain, an experiment) is done once, by a module fixture, and each test checks its own
part of what came of it."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.conftest import REPO, tiny_params
from tests.helpers import DVC, GIT_IDENTITY, project_repo, ran_stages, sh, up_to_date


def per_variant(*variants: str) -> list[str]:
    """The stages dvc.yaml runs for these variants (train, evaluate, and export if present)."""
    kinds = [k for k in ("train", "evaluate", "export") if k in yaml.safe_load(DVC_YAML)["stages"]]
    return [f"{kind}@{v}" for kind in kinds for v in variants]


DVC_YAML = (REPO / "dvc.yaml").read_text()
# Two variants: each head (logits, softmax), optimizer (SGD, Adam), dropout or none; ffn1_tanh is
# the one changed below, mlp_tanh_sigmoid_softmax the one retrained unchanged. The stages are the
# same for every variant, and each variant costs three stage processes of seconds of start-up.
# Every variant runs through train, evaluate and the registry in test_registry.py; the full table
# in test_full_data.
VARIANTS = ("ffn1_tanh", "mlp_tanh_sigmoid_softmax")
CHANGED, RETRAINED = VARIANTS


def pipeline_params() -> dict:
    params = tiny_params()
    params["variants"] = {k: v for k, v in params["variants"].items() if k in VARIANTS}
    return params


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_mirror):
    """A git + DVC repository with the project copied in, after one full `dvc repro`."""
    repo = tmp_path_factory.mktemp("pipeline")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MNIST_", "DVC_"))}
    env |= GIT_IDENTITY | {
        "MNIST_PIPELINE_WARM": "off",  # no warm process outlives a test (conftest.py)
        "MNIST_MIRROR": str(tiny_mirror.folder),
        "MNIST_CHECKSUMS_FILE": str(tiny_mirror.checksums),
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5",
        "MNIST_PIPELINE_HOST": "pipeline-test",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    project_repo(repo, pipeline_params(), env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "project"], repo, env)
    first = sh([DVC, "repro"], repo, env)
    return repo, env, first


def test_all_stages_run(pipeline):
    repo, _, first = pipeline
    expected = ["download", *per_variant(*VARIANTS), "report", "sync"]
    assert sorted(ran_stages(first)) == sorted(expected)
    for variant in VARIANTS:
        assert (repo / "models" / variant / "model.pt").is_file()
        assert (repo / "plots" / "train" / f"{variant}.csv").is_file()
        assert (repo / "plots" / "predictions" / f"{variant}.csv").is_file()
        test = json.loads((repo / "metrics" / "test" / f"{variant}.json").read_text())
        assert 0 <= test["test/accuracy"] <= 1
    rows = (repo / "reports" / "results.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in rows) == 1 + len(VARIANTS)  # header + variants
    assert (repo / "reports" / "results.png").stat().st_size > 10_000


def test_one_run_per_variant_with_test_metrics(pipeline):
    repo, _, _ = pipeline
    runs = runs_where(repo, "tags.`run.kind` = 'pipeline'")
    assert sorted(r.data.tags["variant"] for r in runs) == sorted(VARIANTS)
    for run in runs:
        variant = run.data.tags["variant"]
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"{variant}@pipeline-test"  # variant and host, at a glance
        assert run.data.tags["run.kind"] == "pipeline"
        assert "test/accuracy" in run.data.metrics
        assert run.data.tags["dvc.stage"] == f"train@{variant}"
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert {"training", "validation", "evaluation"} <= set(inputs)
        assert all(len(ds.digest) == 32 for ds in inputs.values())
        artifacts = {
            a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")
        }
        assert "evaluation/confusion_matrix.png" in artifacts
        assert "evaluation/misclassified.png" in artifacts


def test_the_models_tab_ranks_the_variants_by_test_accuracy(pipeline):
    """Each variant's logged models (the checkpoint's and its ONNX and int8 forms) carry their test
    accuracy under one name (and the test set), so MLflow ranks every form of every variant with
    no set-up; each variant is registered, the first version champion."""
    repo, _, _ = pipeline
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("mnist-pipeline-mnist")
    ranked = mlflow.search_logged_models(
        experiment_ids=[experiment.experiment_id],
        filter_string="metrics.`test/accuracy` >= 0",
        order_by=[{"field_name": "metrics.test/accuracy", "ascending": False}],
        output_format="list",
    )
    forms = [(v, form) for v in VARIANTS for form in ("torch", "onnx", "int8")]
    found = [(m.params["variant"], m.tags["export.form"]) for m in ranked]
    assert sorted(found) == sorted(forms)
    assert all(
        m.name.startswith(f"{v}-{f}@pipeline-test-")
        for m, (v, f) in zip(ranked, found, strict=True)
    )
    accuracy = [{x.key: x for x in m.metrics}["test/accuracy"] for m in ranked]
    assert [a.value for a in accuracy] == sorted((a.value for a in accuracy), reverse=True)
    assert {a.dataset_name for a in accuracy} == {"mnist-test"}
    client = mlflow.MlflowClient()
    for variant in VARIANTS:
        champion = client.get_model_version_by_alias(f"mnist-{variant}", "champion")
        assert champion.tags["hosts"] == "pipeline-test"


def test_metrics_and_plots_show(pipeline):
    repo, env, _ = pipeline
    shown = json.loads(sh([DVC, "metrics", "show", "--json"], repo, env))
    files = next(iter(shown.values()))["data"]
    for variant in VARIANTS:
        assert f"metrics/test/{variant}.json" in files
        assert f"metrics/train/{variant}.json" in files
    shown = sh([DVC, "plots", "show", "-o", str(repo / "dvc_plots")], repo, env)
    assert "failed to load" not in shown
    html = (repo / "dvc_plots" / "index.html").read_text()
    # per variant: its training curves and its confusion matrix, nothing else (test_plots.py)
    assert html.count("vegaEmbed(") == 2 * len(VARIANTS)
    for variant in VARIANTS:
        assert f"{variant}: loss and accuracy" in html and f"{variant}: confusion matrix" in html


@dataclass(frozen=True)
class Changed:
    second: str  # what a second `dvc repro`, with nothing changed, printed
    third: str  # what `dvc repro` printed after CHANGED's lr was changed
    lr: float  # CHANGED's lr before the change


@pytest.fixture(scope="module")
def changed(pipeline) -> Changed:
    """A second `dvc repro`; then one recipe changed (CHANGED's lr) and `dvc repro` again."""
    repo, env, _ = pipeline
    second = sh([DVC, "repro"], repo, env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    before = params["variants"][CHANGED]["lr"]
    params["variants"][CHANGED]["lr"] = before / 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = sh([DVC, "repro"], repo, env)
    return Changed(second, third, before)


def test_a_second_repro_does_nothing(changed):
    assert ran_stages(changed.second) == ["sync"]  # DVC always runs it; it found nothing to record
    assert "nothing to do" in changed.second


def test_one_changed_recipe_reruns_that_variant_only(changed):
    assert sorted(ran_stages(changed.third)) == sorted([*per_variant(CHANGED), "report", "sync"])


def test_going_back_to_an_earlier_recipe_restores_it_from_the_run_cache(pipeline, changed):
    """What switching data sets back and forth relies on: DVC's run cache restores a stage whose
    deps and params it has seen, without running it, as long as no output of the stage is a
    `cache: false` out (plots and metrics may be). Only `report` runs: its committed folder is
    such an out. (The earlier recipe: CHANGED's, which the first `dvc repro` ran.)"""
    repo, env, _ = pipeline
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["variants"][CHANGED]["lr"] = changed.lr
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    back = sh([DVC, "repro"], repo, env)

    restored = [line.split("'")[1] for line in back.splitlines() if "is cached - skipping" in line]
    assert sorted(restored) == sorted(per_variant(CHANGED))
    assert ran_stages(back) == ["report", "sync"]
    assert up_to_date(sh([DVC, "status"], repo, env))


@dataclass(frozen=True)
class Retrained:
    store: Path  # the new store the retrain and the sync after it wrote to
    env: dict[str, str]  # the pipeline's environment, on that store
    forced: str  # what `dvc repro -f train@RETRAINED` printed
    checkpoints: tuple[bytes, bytes]  # RETRAINED's model.pt before and after
    status: str  # `dvc status` after the retrain
    synced: str  # what the `dvc repro` after it printed


@pytest.fixture(scope="module")
def retrained(pipeline) -> Retrained:
    """RETRAINED retrained as on a fresh clone: the same code, data, params and seed, into a new
    store (as `rm mlflow.db` leaves it); then `dvc status`, and `dvc repro`."""
    repo, env, _ = pipeline
    store = repo.with_name(f"{repo.name}-new.db")
    env = env | {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    checkpoint = repo / "models" / RETRAINED / "model.pt"
    before = checkpoint.read_bytes()
    forced = sh([DVC, "repro", "-f", f"train@{RETRAINED}"], repo, env)
    after = checkpoint.read_bytes()
    status = sh([DVC, "status"], repo, env)
    synced = sh([DVC, "repro"], repo, env)
    return Retrained(store, env, forced, (before, after), status, synced)


def test_an_identical_retrain_writes_the_same_checkpoint(retrained):
    before, after = retrained.checkpoints
    assert after == before


def test_an_identical_retrain_reruns_nothing_downstream(retrained):
    """Same code, data, params and seed: the same bytes, so evaluate stays up to date."""
    forced = ran_stages(retrained.forced)
    assert f"train@{RETRAINED}" in forced  # (and its upstream, download)
    assert not [stage for stage in forced if stage.startswith(("evaluate", "report"))]
    assert up_to_date(retrained.status), retrained.status
    assert ran_stages(retrained.synced) == ["sync"]


def store_counts(store: Path) -> dict[str, int]:
    """What a second `dvc repro` must not add to, read from the SQLite store itself."""
    with contextlib.closing(sqlite3.connect(store)) as db:
        return {
            table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("runs", "metrics", "logged_models", "model_versions", "params")
        }


def test_a_new_store_is_made_to_agree_with_the_outputs(pipeline, retrained):
    """As on a fresh clone: a new store, and a retrain that writes the committed bytes, so DVC
    skips evaluate and export. The sync stage completes the timed run with the test record and
    rebuilds the other variants' runs from the outputs; one complete run each, registered."""
    repo, _, _ = pipeline
    mlflow.set_tracking_uri(f"sqlite:///{retrained.store}")
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="tags.`run.kind` = 'pipeline'",
        output_format="list",
    )
    assert sorted(r.data.tags["variant"] for r in runs) == sorted(VARIANTS)
    for run in runs:
        variant = run.data.tags["variant"]
        timed = variant == RETRAINED
        assert run.data.tags["record.source"] == ("live" if timed else "outputs")
        assert ("time/median_epoch_seconds" in run.data.metrics) == timed
        written = json.loads((repo / "metrics" / "test" / f"{variant}.json").read_text())
        assert {k: run.data.metrics[k] for k in written} == written
        assert {"evaluation/confusion_matrix.png", "evaluation/misclassified.png"} <= {
            a.path for a in client.list_artifacts(run.info.run_id, "evaluation")
        }
        champion = client.get_model_version_by_alias(f"mnist-{variant}", "champion")
        assert champion.tags["checkpoint.md5"] == run.data.tags["checkpoint.md5"]
        assert "int8/test/accuracy" in run.data.metrics  # this host measured every form


def test_a_store_that_agrees_gets_nothing_more(pipeline, retrained):
    """After the sync above: another `dvc repro`, and `sync --verify`, record nothing."""
    repo, _, _ = pipeline
    before = store_counts(retrained.store)
    again = sh([DVC, "repro"], repo, retrained.env)
    assert "nothing to do" in again
    verified = sh(
        [str(Path(sys.executable).with_name("mnist-pipeline")), "sync", "--verify"],
        repo,
        retrained.env,
    )
    assert "(0 recorded)" in verified
    assert store_counts(retrained.store) == before


def test_a_second_host_with_the_same_bytes_gets_a_complete_run_and_no_second_version(
    pipeline, retrained
):
    """Another host label retrains RETRAINED into the pipeline's own store and writes the same
    bytes, so DVC skips evaluate and export: `sync` still gives that host's run the evaluation
    and this host's own measurements, and the one registered version names both hosts."""
    repo, env, _ = pipeline
    other = env | {"MNIST_PIPELINE_HOST": "second-host"}
    forced = sh([DVC, "repro", "-f", f"train@{RETRAINED}"], repo, other)
    assert not [s for s in ran_stages(forced) if s.startswith(("evaluate", "export"))]
    assert ran_stages(sh([DVC, "repro"], repo, other)) == ["sync"]
    written = json.loads((repo / "metrics" / "test" / f"{RETRAINED}.json").read_text())
    md5 = runs_where(repo, f"tags.variant = '{RETRAINED}' and tags.host = 'second-host'")[0]
    md5 = md5.data.tags["checkpoint.md5"]
    runs = runs_where(repo, f"tags.`checkpoint.md5` = '{md5}' and tags.`run.kind` = 'pipeline'")
    assert sorted(r.data.tags["host"] for r in runs) == ["pipeline-test", "second-host"]
    client = mlflow.MlflowClient()
    for run in runs:
        assert {k: run.data.metrics[k] for k in written} == written
        assert {"inference/latency_b1_ms", "int8/test/accuracy"} <= set(run.data.metrics)
        assert "evaluation/confusion_matrix.png" in {
            a.path for a in client.list_artifacts(run.info.run_id, "evaluation")
        }
    (version,) = client.search_model_versions(f"name = 'mnist-{RETRAINED}'")
    assert version.tags["hosts"] == "pipeline-test,second-host"


def runs_where(repo: Path, where: str) -> list:
    """The runs in the repository's own store that `where` (an MLflow filter) picks."""
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.search_runs(
        search_all_experiments=True, filter_string=where, output_format="list"
    )


def test_a_one_off_training_leaves_dvc_status_clean(pipeline):
    repo, env, _ = pipeline
    cli = str(Path(sys.executable).with_name("mnist-pipeline"))
    out = sh([cli, "train", "--variant", "ffn1_tanh", "--epochs", "2"], repo, env)
    assert "one-off" in out
    assert (repo / "one-off" / "ffn1_tanh" / "model.pt").is_file()
    assert up_to_date(sh([DVC, "status"], repo, env))
    assert "one-off" not in sh(["git", "status", "--porcelain"], repo, env)  # git-ignored
    (run,) = runs_where(repo, "tags.`run.kind` = 'one-off'")
    assert run.data.tags["variant"] == "ffn1_tanh" and run.data.params["epochs"] == "2"


@dataclass(frozen=True)
class Experiment:
    baseline: str  # the commit the experiment started from
    run: mlflow.entities.Run  # its one run in the repository's store


@pytest.fixture(scope="module")
def experiment(pipeline) -> Experiment:
    """`dvc exp run -n tanh-fast` of one changed recipe, up to `sync` (the changed variant's
    train, evaluate and export, then its record); the queued sweep in test_team.py runs a whole
    pipeline under `dvc exp run`. The module's last: it leaves the report behind."""
    repo, env, _ = pipeline
    baseline = sh(["git", "rev-parse", "HEAD"], repo, env).strip()
    change = f"variants.{CHANGED}.lr=0.3"
    sh([DVC, "exp", "run", "-n", "tanh-fast", "-S", change, "sync"], repo, env)
    (run,) = runs_where(repo, "tags.`dvc.exp.name` = 'tanh-fast' and tags.`run.kind` = 'pipeline'")
    return Experiment(baseline, run)


def test_a_dvc_experiment_names_its_run_and_its_baseline(experiment):
    run = experiment.run
    assert run.data.tags["variant"] == CHANGED and run.data.params["lr"] == "0.3"
    assert run.data.tags["dvc.exp.baseline"] == experiment.baseline
    assert "test/accuracy" in run.data.metrics


def test_the_experiments_run_says_how_to_bring_it_into_the_workspace(experiment):
    assert "dvc exp apply tanh-fast" in experiment.run.data.tags["mlflow.note.content"]


def test_compare_shows_the_experiment_beside_its_baseline(pipeline, experiment):
    repo, env, _ = pipeline
    cli = str(Path(sys.executable).with_name("mnist-pipeline"))
    shown = sh([cli, "compare", "--exp", "tanh-fast", "--variants", CHANGED], repo, env)
    assert "tanh-fast · pipeline-test" in shown and f"baseline {experiment.baseline[:7]}" in shown


@pytest.mark.slow
def test_the_readmes_way_to_read_an_experiment_fits_120_columns(pipeline):
    """The README's `dvc exp diff` and `--keep` table after a one-parameter experiment: every
    line within 120 columns, nothing cut to `…`, the change there to read."""
    repo, env, _ = pipeline
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "results on this machine"], repo, env)
    lines = (REPO / "README.md").read_text().splitlines()
    # the `--keep` table of one experiment's figures, and the experiment the README runs before it
    keep = next(i for i, line in enumerate(lines) if "--keep" in line and "test/accuracy" in line)
    run = next(line for line in reversed(lines[:keep]) if line.startswith("dvc exp run -S"))
    name = shlex.split(run)[shlex.split(run).index("-n") + 1]
    diff = next(line for line in lines if line.startswith(f"dvc exp diff HEAD {name}"))
    # a variant of this repository's
    reads = [line.split("  #")[0].replace("ffn1_relu", "ffn1_tanh") for line in (diff, lines[keep])]
    command = shlex.split(run.split("  #")[0].replace("ffn1_relu", "ffn1_tanh"))
    sh([DVC, *command[1:]], repo, env)

    for read in reads:
        out = sh([DVC, *shlex.split(read)[1:]], repo, env | {"COLUMNS": "120"})
        assert max(len(line) for line in out.splitlines()) <= 120, out
        assert "…" not in out, out
        assert "0.05" in out, out  # the changed lr, and the metrics beside it
