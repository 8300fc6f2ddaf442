"""The export record: this host's figures of the three forms, and the ONNX forms as child runs.

The training run holds torch's figures under SHARED_NAMES and the others' prefixed (`int8/...`);
a form's child run holds its own under SHARED_NAMES, so the Models tab lines the forms up."""

import json

from mlflow.entities import Param

from mnist_pipeline import host, tracking
from mnist_pipeline.device import resolve_device
from mnist_pipeline.export import QUANTISATION
from mnist_pipeline.models import inference_model
from mnist_pipeline.record import store as runs
from mnist_pipeline.record.agree import latency_on, measured_digest
from mnist_pipeline.record.evaluation import logged_model_id
from mnist_pipeline.record.training import FORM_TAG, Training, as_metrics, log_model

MEASURED_TAG = "record.measured"  # the export outputs this run's host measured
ONNX_FORMS = ("onnx", "int8")
SHARED_NAMES = {  # a form's figure -> the name every form shares
    "accuracy": "test/accuracy",
    "accuracy_b1": "test/accuracy_b1",
    "latency_b1_ms": "inference/latency_b1_ms",
    "latency_b1_p95_ms": "inference/latency_b1_p95_ms",
    "throughput_b256": "inference/throughput_b256",
}


def measure(training: Training, test) -> dict:
    """This host's figures for the checkpoint's three forms on the test set `test` = (x, y)."""
    from mnist_pipeline import measure as host_figures

    outputs = training.outputs
    models = {"onnx": outputs.onnx.read_bytes(), "int8": outputs.int8.read_bytes()}
    device = resolve_device("auto")
    served = inference_model(training.checkpoint[0])
    figures = host_figures.measure(served, models, *test, device, latency=latency_on())
    return {"forms": figures, "conditions": host_figures.conditions(device)}


def record_export(store: runs.Store, run, training: Training, measured: dict) -> str:
    """Into this host's `run`: every form's figures, and a child run per ONNX form (made once)."""
    client, run_id = tracking.client(), run.info.run_id
    test_set = training.datasets()["evaluation"]
    sizes = json.loads(training.outputs.export_metrics.read_text())
    forms = measured["forms"]
    model_ids = {"torch": logged_model_id(run)}
    children = _form_runs(store, run, training)
    model_ids |= {form: model_id for form, (_, model_id) in children.items()}
    metrics = []
    for form in ("torch", *ONNX_FORMS):
        figures = forms.get(form, {})
        shared = {SHARED_NAMES[k]: v for k, v in figures.items() if k in SHARED_NAMES}
        shared["model/size_bytes"] = sizes[f"{form}/bytes"]
        link = {"dataset_name": test_set.name, "dataset_digest": test_set.digest}
        linked = as_metrics(shared, model_id=model_ids[form], **link)
        if form == "torch":
            metrics += linked
            continue
        metrics += as_metrics({f"{form}/{k}": v for k, v in shared.items()})
        client.log_batch(children[form][0], metrics=linked)
    client.log_batch(run_id, metrics=metrics)
    client.log_dict(run_id, measured, "inference/measured.json")
    client.set_tag(run_id, MEASURED_TAG, measured_digest(training.outputs))
    shown = ", ".join(f"{f} {_line(forms.get(f, {}))}" for f in ("torch", *ONNX_FORMS))
    return f"measured on {host.host_label()}: {shown}"


def _line(figures: dict) -> str:
    parts = []
    if "accuracy" in figures:
        parts.append(f"{figures['accuracy']:.4f}")
    if "latency_b1_ms" in figures:
        parts.append(f"{figures['latency_b1_ms']:.3f} ms/b1")
        parts.append(f"{figures['throughput_b256']:,.0f} img/s at b256")
    return " ".join(parts) or "-"


def _form_runs(store: runs.Store, run, training: Training) -> dict:
    """{form: (child run id, logged model id)} for the ONNX forms: found, or made."""
    client = tracking.client()
    found = client.search_runs(
        [run.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and tags.`{runs.RUN_KIND_TAG}` = 'form'",
    )
    children = {}
    for child in found:
        form, model_id = child.data.tags.get(FORM_TAG), logged_model_id(child, form=None)
        if form in ONNX_FORMS and model_id:
            children[form] = (child.info.run_id, model_id)
    for form in ONNX_FORMS:
        if form not in children:
            children[form] = _form_run(store, run, training, form)
    return children


def _form_run(store: runs.Store, run, training: Training, form: str) -> tuple[str, str]:
    """A finished child run of `run` holding the ONNX form's logged model."""
    import onnx

    client, tags = tracking.client(), run.data.tags
    path = training.outputs.onnx if form == "onnx" else training.outputs.int8
    model = onnx.load(path)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    params = {"variant": training.variant, "export.form": form, "export.opset": opset}
    if form == "int8":
        params |= {f"quantisation.{k}": v for k, v in QUANTISATION.items()}
    child_tags = {k: v for k, v in tags.items() if k.startswith(("host", "cpu.", "git.", "data."))}
    note = (
        f"The {form} form of {run.info.run_name} (ONNX Runtime, CPU), exported from its "
        f"checkpoint `{training.md5[:12]}`: its logged model, and the figures of it that "
        f"host `{tags.get('host')}` measured."
    )
    child_tags |= {"mlflow.parentRunId": run.info.run_id, runs.RUN_KIND_TAG: "form"}
    child_tags |= {FORM_TAG: form, "device": "cpu", runs.NOTE_TAG: note}
    name = f"{run.info.run_name} · {form}"
    child = client.create_run(run.info.experiment_id, run_name=name, tags=child_tags)
    client.log_batch(child.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    model_id = log_model(child, model, form, params, named_after=run)
    client.set_terminated(child.info.run_id, "FINISHED")
    return child.info.run_id, model_id
