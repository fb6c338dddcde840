import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import resfuse
from resfuse.errors import ConfigError, InputContractError
from resfuse.models import METHODS, FusionMethod
from resfuse.models.fusion import to_image_grid

SIZES = [(32, 32), (33, 45), (97, 131), (257, 311), (64, 500), (500, 40)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "backbone,stage", [("resnet18", 4), ("resnet34", 3), ("resnet50", 2), ("resnet50", 4)]
)
def test_fused_output_is_exactly_input_size(method: str, backbone: str, stage: int) -> None:
    model = resfuse.build_model(method, backbone=backbone, stage=stage, features=16)
    with torch.inference_mode():
        for h, w in SIZES:
            if min(h, w) < model.min_size:
                continue
            out = model(torch.randn(2, 3, h, w))
            assert out.shape == (2, 3 + 16, h, w)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet101", "resnet152"])
def test_deep_backbones(backbone: str) -> None:
    for method in METHODS:
        model = resfuse.build_model(method, backbone=backbone)
        with torch.inference_mode():
            assert model(torch.randn(1, 3, 75, 53)).shape == (1, 67, 75, 53)


@given(
    method=st.sampled_from(list(METHODS)),
    stage=st.sampled_from([2, 3, 4]),
    h=st.integers(32, 260),
    w=st.integers(32, 260),
    batch=st.integers(1, 3),
)
@example(method="masked", stage=4, h=32, w=32, batch=1)  # the minimum: one stride-32 cell
@example(method="spp", stage=2, h=8, w=17, batch=2)  # stride 8: one cell high, 2 * 8 + 1 wide
@example(method="upsample", stage=4, h=33, w=65, batch=1)  # k * stride + 1: a 1-pixel last cell
@example(method="spp", stage=3, h=600, w=33, batch=1)  # tall
@example(method="masked", stage=3, h=40, w=700, batch=1)  # wide
def test_any_size_at_or_above_minimum(method: str, stage: int, h: int, w: int, batch: int) -> None:
    model = _cached(method, stage)
    with torch.inference_mode():
        assert model(torch.randn(batch, 3, h, w)).shape == (batch, 67, h, w)


_MODELS: dict = {}


def _cached(method: str, stage: int) -> resfuse.FusionModel:
    key = (method, stage)
    if key not in _MODELS:
        _MODELS[key] = resfuse.build_model(method, stage=stage)
    return _MODELS[key]


@pytest.mark.parametrize("method", METHODS)
def test_head_gives_per_pixel_logits_and_grayscale_input(method: str) -> None:
    model = resfuse.build_model(method, in_channels=1, num_classes=4)
    with torch.inference_mode():
        assert model(torch.randn(2, 1, 71, 99)).shape == (2, 4, 71, 99)


@pytest.mark.parametrize("method", ["upsample", "spp"])
def test_image_channels_pass_through_unchanged(method: str) -> None:
    model = resfuse.build_model(method)
    x = torch.randn(1, 3, 80, 90)
    with torch.inference_mode():
        assert torch.equal(model(x)[:, :3], x)


def _aligned_bilinear(n: int, cells: int, stride: int) -> np.ndarray:
    """(n, cells) weights of a bilinear (align_corners=False) upsample by `stride`, cropped to n:
    output pixel y samples the cell grid at (y + 0.5) / stride - 0.5, clamped to the grid."""
    u = np.clip((np.arange(n) + 0.5) / stride - 0.5, 0, cells - 1)
    lo = np.floor(u).astype(int)
    weights = np.zeros((n, cells))
    np.add.at(weights, (np.arange(n), lo), 1 - (u - lo))
    np.add.at(weights, (np.arange(n), np.minimum(lo + 1, cells - 1)), u - lo)
    return weights


def test_masked_gates_image_and_features_with_the_cell_over_each_pixel() -> None:
    # The expected output is built from the module's parameters by hand, not with its `mask`.
    model = resfuse.build_model("masked")
    x = torch.randn(1, 3, 80, 90)
    with torch.inference_mode():
        feats = model.encoder(x)
        out = model(x)[0].numpy()
        projected = model.fusion.project(feats)[0].numpy()
        model_mask = model.fusion.mask(x, feats)[0, 0].numpy()
    assert feats.shape[-2:] == (3, 3)
    gate = model.fusion.gate
    kernel, bias = gate.weight.detach()[:, :, 0, 0].numpy(), gate.bias.item()
    logits = np.einsum("oc,chw->hw", kernel, feats[0].numpy()) + bias
    rows, cols = _aligned_bilinear(80, 3, 32), _aligned_bilinear(90, 3, 32)
    mask = rows @ (1 / (1 + np.exp(-logits))) @ cols.T
    features = np.einsum("yi,cij,xj->cyx", rows, projected, cols) * mask
    expected = np.concatenate([x[0].numpy() * (1 - mask), features])
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(model_mask, mask, atol=1e-6, rtol=0)  # runtime/check uses it


def _changed_pixels(
    fusion: FusionMethod, image: torch.Tensor, feats: torch.Tensor, cell: tuple[int, int]
) -> torch.Tensor:
    """(H, W) map of the output pixels that move when one feature cell moves."""
    bumped = feats.clone()
    bumped[:, :, cell[0], cell[1]] += 1.0
    with torch.inference_mode():
        return (fusion(image, feats) != fusion(image, bumped)).flatten(0, 1).any(dim=0)


@pytest.mark.parametrize("method", ["spp", "masked"])
@pytest.mark.parametrize(
    "stride,size,cell",
    [
        (32, (33, 45), (1, 0)),  # the partial last row of cells: one input row
        (32, (33, 45), (1, 1)),  # the last cell
        (32, (97, 131), (1, 2)),
        (8, (17, 26), (2, 3)),
    ],
)
def test_each_feature_cell_moves_only_its_own_block(
    method: str, stride: int, size: tuple[int, int], cell: tuple[int, int]
) -> None:
    # Cell (i, j) sits over input rows [s*i, s*i + s) and columns [s*j, s*j + s); a bilinear
    # resize on the aligned grid reaches half a cell further each way, no more. A resize straight
    # to H x W moved rows 8..32 of a 33-row image for cell 1, which covers only row 32.
    torch.manual_seed(0)
    fusion = METHODS[method](16, stride, features=8).eval()
    if method == "spp":  # pooled context is global: hold it fixed to see the per-cell path
        with torch.no_grad():
            for branch in fusion.branches:
                branch[0].weight.zero_()
    (h, w), (i, j), half = size, cell, stride // 2
    feats = torch.randn(1, 16, -(-h // stride), -(-w // stride))
    changed = _changed_pixels(fusion, torch.randn(1, 3, h, w), feats, cell)
    expected = torch.zeros(h, w, dtype=torch.bool)
    rows = slice(max(0, stride * i - half), stride * (i + 1) + half)
    expected[rows, max(0, stride * j - half) : stride * (j + 1) + half] = True
    assert torch.equal(changed, expected)


def test_upsample_maps_each_feature_cell_to_its_own_stride_block_then_crops() -> None:
    # Feature cell i covers input rows [32 i, 32 i + 32) (ResNet's ceil rounding puts the partial
    # cell last), so the upsampler must write cell i to exactly those rows and crop the surplus.
    model = resfuse.build_model("upsample")
    x = torch.randn(1, 3, 70, 64)
    with torch.inference_mode():
        feats = model.encoder(x)
        assert feats.shape[-2:] == (3, 2)
        bumped = feats.clone()
        bumped[:, :, 1] += 1.0
        a, b = model.fusion.up(feats), model.fusion.up(bumped)
        changed = (a != b).flatten(0, 1).any(dim=0).any(dim=1).nonzero().flatten()
        assert a.shape[-2:] == (96, 64)  # 32 * ceil(70 / 32)
        assert changed.min() >= 32 and changed.max() < 64
        torch.testing.assert_close(model(x)[:, 3:], a[:, :, :70, :64], atol=0, rtol=0)


@pytest.mark.parametrize(
    "shape,dtype,message",
    [
        ((3, 64, 64), torch.float32, "4-D NCHW"),
        ((1, 4, 64, 64), torch.float32, "expected 3 input channels, got 4"),
        ((1, 64, 64, 3), torch.float32, "channels-last"),
        ((1, 3, 64, 64), torch.float64, "expected dtype float32"),
        ((1, 3, 31, 64), torch.float32, "height 31 is outside the allowed range >= 32"),
        ((1, 3, 64, 8), torch.float32, "width 8"),
        ((0, 3, 64, 64), torch.float32, "batch size 0"),
    ],
)
def test_input_contract_errors(shape: tuple, dtype: torch.dtype, message: str) -> None:
    model = resfuse.build_model("masked")
    with pytest.raises(InputContractError, match=message):
        model(torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"method": "nope"}, "unknown fusion method 'nope'; choose one of upsample, spp, masked"),
        ({"method": "spp", "backbone": "vgg16"}, "unknown backbone 'vgg16'"),
        ({"method": "spp", "stage": 5}, "stage 5 is not supported"),
        ({"method": "spp", "in_channels": 0}, "in_channels must be at least 1"),
        ({"method": "spp", "num_classes": 0}, "num_classes must be at least 1"),
        ({"method": "spp", "levels": (1, 1)}, "SPP levels must be distinct"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resfuse.build_model(**kwargs)


def test_pretrained_without_network_names_the_offline_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # refuse at once, touch no network
    with pytest.raises(ConfigError, match="weights=PATH"):
        resfuse.build_model("masked", pretrained=True)


@pytest.mark.parametrize("stride", [8, 16, 32])
@pytest.mark.parametrize("size", [(1, 1), (32, 32), (33, 65), (97, 131), (5, 700), (257, 311)])
def test_to_image_grid_is_the_aligned_bilinear_resize_cropped(
    stride: int, size: tuple[int, int]
) -> None:
    # PyTorch's own bilinear resize to the stride-aligned grid, then the crop, is the reference
    # for the interpolation-matrix form the models export.
    h, w = size
    x = torch.randn(2, 5, -(-h // stride), -(-w // stride))
    aligned = (x.shape[2] * stride, x.shape[3] * stride)
    up = F.interpolate(x, size=aligned, mode="bilinear", align_corners=False)[:, :, :h, :w]
    got = to_image_grid(x, torch.zeros(2, 3, h, w), stride)
    torch.testing.assert_close(got, up, atol=2e-6, rtol=0)
