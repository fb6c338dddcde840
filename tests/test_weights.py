import collections
from pathlib import Path

import pytest
import torch
import torchvision

import resfuse
from resfuse.errors import WeightsError
from resfuse.weights import save_weights


def _same_output(a: resfuse.FusionModel, b: resfuse.FusionModel) -> None:
    x = torch.randn(1, a.config.in_channels, 64, 96)
    with torch.inference_mode():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_safetensors_round_trip(tmp_path: Path) -> None:
    model = resfuse.build_model("spp")
    save_weights(model, tmp_path / "w.safetensors")
    _same_output(model, resfuse.build_model("spp", weights=tmp_path / "w.safetensors"))


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_torch_state_dict_and_common_checkpoint_layouts(tmp_path: Path, wrap: str | None) -> None:
    model = resfuse.build_model("masked")
    state = model.state_dict()
    torch.save({wrap: state, "epoch": 3} if wrap else state, tmp_path / "w.pt")
    _same_output(model, resfuse.build_model("masked", weights=tmp_path / "w.pt"))


def test_dataparallel_prefix_is_stripped(tmp_path: Path) -> None:
    model = resfuse.build_model("masked")
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "w.pt")
    _same_output(model, resfuse.build_model("masked", weights=tmp_path / "w.pt"))


@pytest.mark.parametrize("in_channels", [3, 1])
def test_torchvision_backbone_state_dict_loads_into_encoder(
    tmp_path: Path, in_channels: int
) -> None:
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model = resfuse.build_model(
        "upsample", stage=3, in_channels=in_channels, weights=tmp_path / "resnet18.pth"
    )
    got = model.encoder.layers[2][0].conv1.weight
    torch.testing.assert_close(got, resnet.layer3[0].conv1.weight)
    stem = model.encoder.stem[0].weight
    expected = resnet.conv1.weight if in_channels == 3 else resnet.conv1.weight.sum(1, keepdim=True)
    torch.testing.assert_close(stem, expected)


class _Payload:
    def __reduce__(self):  # what a malicious checkpoint would run on unpickling
        return (print, ("unpickled!",))


def test_pickled_object_is_refused_without_running_it(tmp_path: Path, capsys) -> None:
    torch.save({"weights": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(
        WeightsError, match=r"pickled Python objects \(print\) that safe loading refuses"
    ):
        resfuse.build_model("masked", weights=tmp_path / "evil.pt")
    assert "unpickled!" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "content,name,message",
    [
        (None, "missing.pt", "does not exist"),
        (b"not a checkpoint", "junk.pt", "cannot read"),
        (b"\x00\x01garbage", "junk.safetensors", "cannot read .* as safetensors"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes | None, name: str, message: str) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        resfuse.build_model("masked", weights=tmp_path / name)


def test_not_a_state_dict(tmp_path: Path) -> None:
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        resfuse.build_model("masked", weights=tmp_path / "list.pt")


def test_weights_of_another_configuration_name_the_fix(tmp_path: Path) -> None:
    save_weights(resfuse.build_model("masked", num_classes=3), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="unexpected keys .* build the model with"):
        resfuse.build_model("masked", weights=tmp_path / "w.safetensors")
    save_weights(resfuse.build_model("masked", features=8), tmp_path / "w8.safetensors")
    with pytest.raises(WeightsError, match="does not fit this model"):
        resfuse.build_model("masked", weights=tmp_path / "w8.safetensors")


def test_foreign_state_dict(tmp_path: Path) -> None:
    torch.save(collections.OrderedDict(fc=torch.zeros(2)), tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="neither a resfuse fusion model nor"):
        resfuse.build_model("masked", weights=tmp_path / "other.pt")
