"""Contracts of the variant table: exact parameter counts, shapes, heads, the dropout switch."""

import pytest
import torch
from torch import nn

from mnist_pipeline.models import (
    VARIANTS,
    build_model,
    count_parameters,
    logits_view,
    summary_text,
)

# From the SPEC table: the contract.
EXPECTED_PARAMS = {
    "logistic_regression": 7_850,
    "ffn1_sigmoid": 79_510,
    "ffn1_tanh": 79_510,
    "ffn1_relu": 79_510,
    "ffn2_relu": 89_610,
    "ffn3_relu": 99_710,
    "mlp_tanh_sigmoid_softmax": 102_762,
    "mlp_relu_dropout": 102_762,
    "mlp512_relu": 669_706,
}


def test_every_variant_has_a_contract():
    assert set(VARIANTS) == set(EXPECTED_PARAMS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_count(variant):
    assert count_parameters(build_model(variant)) == EXPECTED_PARAMS[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shape_and_head(variant):
    model = build_model(variant).eval()
    out = model(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, 10)
    if variant == "mlp_tanh_sigmoid_softmax":
        assert torch.allclose(out.sum(1), torch.ones(5), atol=1e-5)  # probabilities
        assert isinstance(model[-1], nn.Softmax)
        assert not isinstance(logits_view(model)[-1], nn.Softmax)
    else:
        assert logits_view(model) is model


@pytest.mark.parametrize("variant", VARIANTS)
def test_summary_lists_layers_and_total(variant):
    text = summary_text(build_model(variant))
    assert f"Total params: {EXPECTED_PARAMS[variant]:,}" in text
    assert "Flatten-1" in text


def test_summary_of_the_102762_models():
    text = summary_text(build_model("mlp_tanh_sigmoid_softmax"))
    for layer in ("Linear-2", "75,360", "Tanh-3", "Dropout-4", "24,832", "Sigmoid-6", "2,570"):
        assert layer in text
    assert "Softmax-9" in text


def test_dropout_switch_keeps_parameters():
    on, off = build_model("mlp_relu_dropout"), build_model("mlp_relu_dropout", use_dropout=False)
    assert count_parameters(on) == count_parameters(off) == 102_762
    assert sum(isinstance(m, nn.Dropout) for m in on) == 2
    assert not any(isinstance(m, nn.Dropout) for m in off)
    off.train()
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(off(x), off(x))  # no randomness left in train mode


def test_models_are_plain_torch_modules():
    for variant in VARIANTS:
        for module in build_model(variant).modules():
            assert type(module).__module__.startswith("torch.nn"), module
