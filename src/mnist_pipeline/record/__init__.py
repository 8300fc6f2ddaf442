"""Outputs → MLflow: the record of what the stages wrote, one module per job.

`store` (a run's lifecycle, tags, data inputs), `training`, `evaluation` (and the registry),
`export` (this host's figures, the ONNX forms), `agree` (`sync`), `search` (a search's runs). No
stage module imports this package: the record can always be made again from the outputs.
"""
