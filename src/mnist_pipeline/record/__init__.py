"""Outputs → MLflow: the record of what the stages wrote, one module per job.

- `store`: the store and the run lifecycle (the experiment, a run's start, end and status, the
  tags and description every run carries, the data as dataset inputs);
- `training`: the training record (a live run around the training, then from the outputs the
  summary, the logged model and the checkpoint's MD5);
- `evaluation`: the evaluation record and the registry (test metrics, confusion matrix,
  misclassified examples; a version per checkpoint, the `champion` alias);
- `export`: the export record (what this host measured of the three forms; each ONNX form a
  child run with its logged model);
- `agree`: agreement, rebuild and sync (every run of the current checkpoints complete);
- `search`: a search's parent run and trial runs.

No stage module imports this package: a stage computes and writes its outputs; `commands` then
records them, or `sync` does, so the record can always be made again from the outputs.
"""
