"""params.yaml as DVC reads and writes it: `dvc exp run -S key=value` (DVC's `apply_overrides`,
through `dvc.utils.serialize.modify_yaml`: a ruamel.yaml round trip that also rebuilds every list)
changes the line of the value it sets and no other, so an experiment's diff of params.yaml shows
what the experiment changed; and it writes the value the way the pipeline then reads it."""

from __future__ import annotations

import pytest
from dvc.utils.hydra import apply_overrides
from dvc.utils.serialize import modify_yaml

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


def test_dvc_writes_params_yaml_back_byte_for_byte(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(committed_params_text())
    with modify_yaml(path):
        pass
    assert path.read_text() == committed_params_text()


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("variants.ffn1_relu.lr=0.05", "    lr: 0.05"),
        ("variants.mlp_relu_dropout.use_dropout=false", "    use_dropout: false"),
        ("train.val_size=0", "  val_size: 0               # held out of the 60,000 training"),
        ("data.dataset=fashion-mnist", "  dataset: fashion-mnist    # mnist | fashion-mnist"),
        ("tune.variants.mlp512_relu.lr.high=0.02", "        high: 0.02"),
    ],
)
def test_dvc_set_param_changes_one_line(tmp_path, override, line):
    path = tmp_path / "params.yaml"
    before = committed_params_text()
    path.write_text(before)
    apply_overrides(path, [override])  # what `dvc exp run -S override` does to the file

    after = path.read_text()
    changed = [b for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) == 1 and changed[0].startswith(line), changed
    load_params(path)  # and it still parses
