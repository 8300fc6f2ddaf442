"""Outputs → MLflow: the record of what the stages wrote, one module per job.

No stage module imports this package: the record can always be made again from the outputs."""
