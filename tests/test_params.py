"""params.yaml as DVC reads and writes it: `dvc exp run -S key=value` (DVC's `apply_overrides`,
through `dvc.utils.serialize.modify_yaml`, a ruamel.yaml round trip) writes a value the way the
pipeline then reads it."""

from __future__ import annotations

from dvc.utils.hydra import apply_overrides

from mnist_pipeline.config import load_params
from tests.conftest import committed_params_text


def test_a_value_dvc_writes_is_read_as_dvc_reads_it(tmp_path):
    """YAML 1.2, as DVC's ruamel.yaml: `-S variants.ffn1_relu.lr=1e-5` writes `lr: 1e-05`, a
    number to DVC (`dvc params diff` shows 1e-05) where PyYAML's YAML 1.1 reads a string."""
    path = tmp_path / "params.yaml"
    path.write_text(committed_params_text())
    apply_overrides(path, ["variants.ffn1_relu.lr=1e-5"])
    assert "lr: 1e-05" in path.read_text()
    assert load_params(path).recipe("ffn1_relu").lr == 1e-5
