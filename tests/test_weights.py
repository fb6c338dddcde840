import argparse
import collections
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import resfuse
from resfuse.errors import WeightsError
from resfuse.weights import guess_config, save_weights


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
    """What a malicious checkpoint would run on unpickling. eval, not print: Ray's progress
    bars replace builtins.print in a process that ran Ray Data, and pickle names the live one."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",))


class _Touch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # os.system: torch blocks the whole module, with other words
        return (os.system, (f"touch {self.marker}",))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)


def test_pickled_object_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save({"weights": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(
        WeightsError, match=r"pickled Python objects \(eval\) that safe loading refuses"
    ):
        resfuse.build_model("masked", weights=tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize(
    "make,refused",
    [
        (lambda tmp: _Net(), r"\S*_Net"),
        (lambda tmp: torchvision.models.resnet18(), "torchvision.models.resnet.ResNet"),
        (lambda tmp: {"best": np.zeros(3)}, r"numpy\S*\._reconstruct"),
        (lambda tmp: {"args": argparse.Namespace(lr=0.1)}, "argparse.Namespace"),
        (lambda tmp: {"w": _Touch(tmp / "ran")}, "posix.system|nt.system"),
    ],
    ids=["custom-module", "torchvision-module", "numpy-array", "namespace", "os-system"],
)
def test_pickled_objects_are_named_and_the_safetensors_fix_given(
    tmp_path: Path, make, refused: str
) -> None:
    torch.save(make(tmp_path), tmp_path / "ckpt.pt")
    with pytest.raises(WeightsError) as info:
        resfuse.build_model("masked", weights=tmp_path / "ckpt.pt")
    message = str(info.value)
    assert re.search(
        rf"holds pickled Python objects \(({refused})\) that safe loading refuses", message
    )
    assert "nothing in it was run" in message and "\n" not in message
    assert 'safetensors.torch.save_file(model.state_dict(), "w.safetensors")' in message
    assert not (tmp_path / "ran").exists()


def test_the_suggested_conversion_gives_loadable_weights(tmp_path: Path) -> None:
    model = resfuse.build_model("spp")
    torch.save(model, tmp_path / "whole.pt")  # a pickled model, as some training scripts save
    with pytest.raises(WeightsError) as info:
        resfuse.build_model("spp", weights=tmp_path / "whole.pt")
    load = re.search(r"model = (torch\.load\('[^']+', weights_only=False\))", str(info.value))
    assert load is not None
    trusted = eval(load[1])  # here the test plays the trusted environment the message names
    save_file(trusted.state_dict(), str(tmp_path / "w.safetensors"))
    _same_output(model, resfuse.build_model("spp", weights=tmp_path / "w.safetensors"))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_is_refused_with_the_fix(tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with warnings.catch_warnings(record=True) as caught:
        with pytest.raises(WeightsError, match=r"TorchScript archive.*torch\.jit\.load\("):
            resfuse.build_model("masked", weights=tmp_path / "scripted.pt")
    assert not [w for w in caught if "dispatching to 'torch.jit.load'" in str(w.message)]


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


@pytest.mark.parametrize(
    "saved,built,options,listed",
    [
        (
            {"method": "masked", "backbone": "resnet50"},
            {"method": "masked"},
            "--backbone resnet50",
            "encoder.layers.0.0.conv1.weight file 64x64x1x1 vs model 64x64x3x3",
        ),
        (
            {"method": "upsample", "backbone": "resnet50", "stage": 2},
            {"method": "upsample", "stage": 2},
            "--backbone resnet50 (or resnet101)",  # layer1 and layer2 of both are the same
            "with other shapes",
        ),
        ({"method": "masked"}, {"method": "spp"}, "--method masked", "2 unexpected (fusion.gate"),
        (
            {"method": "upsample", "stage": 3},
            {"method": "upsample"},
            "--stage 3",
            "missing (encoder.layers.3.0.conv1.weight,",
        ),
        (
            {"method": "spp", "in_channels": 1},
            {"method": "spp"},
            "--in-channels 1",
            "1 with other shapes (encoder.stem.0.weight file 64x1x7x7 vs model 64x3x7x7)",
        ),
        (
            {"method": "masked", "num_classes": 5, "features": 16},
            {"method": "masked"},
            "--num-classes 5 --features 16",
            "fusion.project.0.weight file 16x512x1x1 vs model 64x512x1x1",
        ),
        (
            {"method": "upsample"},
            {"method": "upsample", "num_classes": 2},
            "no --num-classes",
            "7 missing (head.0.0.weight,",
        ),
    ],
)
def test_weights_of_another_configuration_name_the_options_that_fit(
    tmp_path: Path, saved: dict, built: dict, options: str, listed: str
) -> None:
    save_weights(resfuse.build_model(**saved), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="does not fit this model") as info:
        resfuse.build_model(**built, weights=tmp_path / "w.safetensors")
    message = str(info.value)
    assert listed in message
    named = re.search(r"these look like weights of a model built with (.*): pass th", message)
    assert named is not None and named[1] == options  # the options that differ, and only those


@pytest.mark.parametrize(
    "saved,built,options",
    [
        ("resnet50", "resnet18", "--backbone resnet50"),
        ("resnet34", "resnet18", "--backbone resnet34"),  # resnet18's keys are all there too
        ("resnet18", "resnet50", "--backbone resnet18"),
    ],
)
def test_torchvision_weights_of_another_resnet_name_it(
    tmp_path: Path, saved: str, built: str, options: str
) -> None:
    torch.save(getattr(torchvision.models, saved)().state_dict(), tmp_path / "tv.pth")
    with pytest.raises(WeightsError, match="does not fit this model") as info:
        resfuse.build_model("spp", backbone=built, in_channels=1, weights=tmp_path / "tv.pth")
    message = str(info.value)
    assert re.search(r"\(layer1\.[0-9.a-z]+weight[ ,)]", message)  # the file's own key names
    assert message.endswith(f"built with {options}: pass that option")  # not --in-channels


def test_unknown_differences_ask_for_the_training_options(tmp_path: Path) -> None:
    save_weights(resfuse.build_model("spp", levels=(1, 2, 3, 6)), tmp_path / "w.safetensors")
    with pytest.raises(
        WeightsError,
        match=r"2 unexpected \(fusion\.branches\.3\.0\.bias, .* build the model with the "
        r"options the weights were trained with",
    ):
        resfuse.build_model("spp", weights=tmp_path / "w.safetensors")


def test_torchvision_weights_without_batchnorm_counters_load(tmp_path: Path) -> None:
    # Checkpoints from PyTorch < 0.4.1 lack num_batches_tracked; load_state_dict fills it in.
    resnet = torchvision.models.resnet18(weights=None)
    state = {k: v for k, v in resnet.state_dict().items() if "num_batches" not in k}
    torch.save(state, tmp_path / "old.pth")
    model = resfuse.build_model("masked", weights=tmp_path / "old.pth")
    torch.testing.assert_close(model.encoder.stem[0].weight, resnet.conv1.weight)


@pytest.mark.parametrize(
    "config",
    [
        resfuse.ModelConfig("upsample", "resnet34", stage=3, in_channels=1, features=8),
        resfuse.ModelConfig("spp", "resnet50", stage=4, num_classes=3, features=16),
        resfuse.ModelConfig("masked", "resnet18", stage=2, in_channels=4, num_classes=1),
    ],
)
def test_guess_config_reads_every_option_from_the_tensors(config: resfuse.ModelConfig) -> None:
    guess = guess_config(resfuse.FusionModel(config).state_dict())
    assert guess.pop("backbone") == (config.backbone,)
    expected = config.to_dict()
    assert guess == {k: expected[k] for k in guess}
    assert set(expected) - set(guess) == {"backbone", "levels"}  # spp's bins have no weights


def test_foreign_state_dict(tmp_path: Path) -> None:
    torch.save(collections.OrderedDict(fc=torch.zeros(2)), tmp_path / "other.pt")
    with pytest.raises(
        WeightsError, match=r"neither a resfuse fusion model .* nor a torchvision .* begin fc;"
    ):
        resfuse.build_model("masked", weights=tmp_path / "other.pt")
