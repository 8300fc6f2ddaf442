"""A reproducible, tracked training workflow for MNIST-family classifiers: DVC runs it, MLflow
records it. Nothing happens at import time. The modules, in the order the data flows:

- `download` fetches the IDX files; `dataset` checks and loads them.
- `train` runs `loop` on a `models` variant and writes a `checkpoint`.
- `evaluate` scores it on the test set (`metrics`).
- `export` writes its ONNX and int8 forms.
- `report` tables and charts every variant (`plots`; `plots_page` for `dvc plots show`).
- `record/` turns those outputs into MLflow runs: `sync` (`record.agree`) at the end of
  `dvc repro`, with `measure` (this host's figures), `tracking` (the store) and `host`.
- `compare` reads the store across hosts; `tune` searches a recipe on Ray Tune (`trial`).

Below them: `config` (params.yaml, typed) and `params_file` (`tune --apply`'s edit of it),
`paths`, `device`, `fileio`, `signals`, `errors`. Above them: `cli` parses the command line and
`commands` runs a stage, then its record; `warm` (the `mnist-pipeline` script) runs a stage
command in a fork of `warm_process`, which has its libraries loaded already.
"""

__version__ = "0.1.0"
