"""Outputs → MLflow: the record of what the stages wrote, one module per job.

`store` (the store, a run's lifecycle, tags, data inputs), `training` (the live run and the
training record), `evaluation` (test metrics, artifacts, the registry), `export` (this host's
figures and the ONNX forms), `agree` (agreement, rebuild and `sync`), `search` (a search's runs).
No stage module imports this package: a stage writes its outputs; `commands` or `sync` records
them, so the record can always be made again from the outputs.
"""
