"""EfficientNet-Lite0 module: TF "SAME" padding, exact key match with the weight file, BN folding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.efficientnet_lite import EfficientNetLite0, SameConv2d, same_padding
from core.features import lite0_weights_path


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [
        (224, 3, 2, (0, 1)),  # stride 2 on even input: the extra pixel goes after
        (112, 5, 2, (1, 2)),
        (225, 3, 2, (1, 1)),
        (56, 3, 1, (1, 1)),
        (14, 5, 1, (2, 2)),
        (7, 1, 1, (0, 0)),
    ],
)
def test_same_padding_matches_tensorflow_rule(
    size: int, kernel: int, stride: int, expected: tuple[int, int]
) -> None:
    assert same_padding(size, kernel, stride) == expected


@pytest.mark.parametrize(("size", "kernel", "stride"), [(16, 3, 2), (17, 5, 2), (16, 5, 1)])
def test_same_conv_equals_conv_on_explicitly_padded_input(
    size: int, kernel: int, stride: int
) -> None:
    torch.manual_seed(0)
    conv = SameConv2d(3, 4, kernel, stride=stride, bias=False)
    x = torch.randn(2, 3, size, size)
    before, after = same_padding(size, kernel, stride)
    reference = F.conv2d(F.pad(x, (before, after, before, after)), conv.weight, stride=stride)
    out = conv(x)
    assert out.shape[-1] == -(-size // stride)  # ceil(size / stride), as in TensorFlow
    torch.testing.assert_close(out, reference)


def test_module_keys_match_the_weight_file_exactly() -> None:
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    network = EfficientNetLite0()
    assert set(network.state_dict()) == set(state)
    network.load_state_dict(state, strict=True)
    assert len(network._blocks) == 16
    assert network._blocks[0].has_expansion is False
    assert [b.has_residual for b in network._blocks].count(True) == 9


def test_folding_batchnorm_keeps_features_and_input_gradients() -> None:
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    plain = EfficientNetLite0()
    plain.load_state_dict(state)
    plain.eval()
    fused = EfficientNetLite0()
    fused.load_state_dict(state)
    fused.eval().fuse_for_inference()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())

    x = torch.rand(2, 3, 64, 64) * 2 - 1
    x_plain = x.clone().requires_grad_(True)
    x_fused = x.clone().requires_grad_(True)
    features_plain = plain.features(x_plain)
    features_fused = fused.features(x_fused)
    torch.testing.assert_close(features_fused, features_plain, rtol=1e-4, atol=1e-4)
    features_plain.sum().backward()
    features_fused.sum().backward()
    # Elementwise comparison is too strict: rounding can move an activation across a ReLU6 kink.
    relative_error = (x_fused.grad - x_plain.grad).norm() / x_plain.grad.norm()
    assert relative_error < 1e-4


def test_fusing_in_training_mode_is_refused() -> None:
    with pytest.raises(RuntimeError, match="eval"):
        EfficientNetLite0().fuse_for_inference()
