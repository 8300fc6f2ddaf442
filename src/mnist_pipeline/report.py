"""The report stage: every variant side by side, from the DVC metrics files, in reports/."""

import json
from pathlib import Path

import pandas as pd

from mnist_pipeline import paths, plots
from mnist_pipeline.config import Params
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.fileio import write_atomic, write_text_atomic


def report(params: Params, root: Path) -> tuple[Path, Path, Path]:
    """One row per variant in params.yaml: its recipe, size and metrics; as Markdown, CSV, chart."""
    rows = []
    for variant, recipe in params.variants.items():
        outputs = paths.pipeline_outputs(root, variant)
        files = {"train": outputs.train_metrics, "test": outputs.test_metrics}
        missing = [str(p.relative_to(root)) for p in files.values() if not p.is_file()]
        if missing:
            raise PipelineError(
                f"no results for {variant} ({', '.join(missing)} missing); run "
                f"`dvc repro evaluate@{variant}` first"
            )
        train, test = (json.loads(p.read_text()) for p in files.values())
        row = {"variant": variant, "params": train["params"]}
        row |= {k: getattr(recipe, k) for k in ("optimizer", "lr", "batch_size", "epochs")}
        row |= {"kept_epoch": train.get("kept_epoch"), "val_accuracy": train.get("val/accuracy")}
        tested = ("test/accuracy", "test/loss", "test/f1_macro")
        row |= {k.replace("/", "_"): test[k] for k in tested}
        rows.append(row)
    table = pd.DataFrame(rows)
    out = paths.report_outputs(root)
    markdown, csv, chart = out
    shown = table.copy()
    for col in ("val_accuracy", "test_accuracy", "test_f1_macro"):
        shown[col] = (shown[col] * 100).map(lambda v: f"{v:.2f}%" if v == v else "")
    shown["test_loss"] = shown["test_loss"].map("{:.4f}".format)
    shown["params"] = shown["params"].map("{:,}".format)
    title = f"# Results: {params.data.dataset}, test set (10,000 images)\n\n"
    write_text_atomic(markdown, title + shown.to_markdown(index=False) + "\n")
    write_text_atomic(csv, table.to_csv(index=False))
    write_atomic(chart, lambda tmp: plots.results(table, tmp, params.data.dataset))
    print(shown.to_markdown(index=False))
    for path in out:
        print(f"wrote {path.relative_to(root)}")
    return out
