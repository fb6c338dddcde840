"""A fusion method is one class and a registry line: the method below is defined and registered
here, in no module of resfuse, and it builds, exports with its option in the manifest, passes
the manifest's validation and round-trips its weights."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import resfuse
from resfuse.artifacts import read_manifest
from resfuse.errors import ConfigError, ManifestError
from resfuse.export.pipeline import ExportOptions, export_artifact
from resfuse.models import METHODS, FusionMethod, ModelConfig, register_method
from resfuse.models.fusion import Option, conv_bn_relu, to_image_grid
from resfuse.weights import guess_config, save_weights


def _width(value: object) -> int:
    if type(value) is not int or value < 1:
        raise ConfigError(f"squeeze width must be a positive integer, got {value!r}")
    return value


class SqueezeFusion(FusionMethod):
    """Squeeze the features to `width` channels, project them to `features`, bring them to the
    image's H x W and join them to the image."""

    options = {"width": Option(4, _width)}
    state_prefix = "squeeze."

    def __init__(
        self, feature_channels: int, stride: int, features: int = 64, width: int = 4
    ) -> None:
        super().__init__(feature_channels, stride, features)
        self.squeeze = nn.Conv2d(feature_channels, _width(width), 1)
        self.project = conv_bn_relu(width, features)

    def forward(self, image: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        fused = to_image_grid(self.project(self.squeeze(feats)), image, self.stride)
        return torch.cat([image, fused], dim=1)


@pytest.fixture
def squeeze() -> Iterator[None]:
    register_method("squeeze")(SqueezeFusion)
    try:
        yield
    finally:
        del METHODS["squeeze"]


CONFIG = {"method": "squeeze", "stage": 2, "features": 8, "width": 3}


def test_it_builds_with_its_option_and_passes_the_image(squeeze: None) -> None:
    model = resfuse.build_model(**CONFIG)
    assert isinstance(model.fusion, SqueezeFusion) and model.fusion.squeeze.out_channels == 3
    x = torch.randn(2, 3, 37, 50)
    with torch.inference_mode():
        out = model(x)
    assert out.shape == (2, 3 + 8, 37, 50)
    assert torch.equal(out[:, :3], x)  # passes_image, the default


def test_its_option_is_checked_and_exported_in_the_config(squeeze: None) -> None:
    with pytest.raises(ConfigError, match="squeeze width must be a positive integer, got 0"):
        resfuse.build_model("squeeze", width=0)
    config = ModelConfig(**CONFIG)
    assert config.method_options == {"width": 3}
    assert config.to_dict()["width"] == 3 and ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig("spp").method_options == {"levels": (1, 2, 4)}  # spp takes no width


def test_it_exports_and_its_manifest_validates(squeeze: None, tmp_path: Path) -> None:
    config = ModelConfig(**CONFIG)
    result = export_artifact(config, tmp_path, ExportOptions(max_size=64, max_batch=1))
    manifest = read_manifest(result.manifest_path)
    assert manifest.data["model"]["width"] == 3 and manifest.config == config
    original = resfuse.load_original(str(result.manifest_path))
    assert original.fusion.squeeze.out_channels == 3
    data = json.loads(result.manifest_path.read_text())
    data["model"]["width"] = 0
    result.manifest_path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"field 'model\.width' does not fit: squeeze width"):
        read_manifest(result.manifest_path)


def test_its_weights_round_trip_and_name_it(squeeze: None, tmp_path: Path) -> None:
    model = resfuse.build_model(**CONFIG)
    save_weights(model, tmp_path / "w.safetensors")
    loaded = resfuse.build_model(**CONFIG, weights=tmp_path / "w.safetensors")
    x = torch.randn(1, 3, 40, 56)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    guess = guess_config(model.state_dict())
    assert (guess["method"], guess["features"], guess["stage"]) == ("squeeze", 8, 2)
    with pytest.raises(resfuse.WeightsError, match="built with --method squeeze: pass that"):
        resfuse.build_model("spp", stage=2, features=8, weights=tmp_path / "w.safetensors")


def test_it_is_gone_once_removed() -> None:
    # the fixture's clean-up: no method, and no option, of this file stays registered
    assert "squeeze" not in METHODS and "width" not in ModelConfig("spp").to_dict()
