"""Reading and writing weights safely: safetensors, or torch.load with weights_only=True only.

Weights that do not fit a model (FusionModel.load_weights) are refused with what differs,
computed by comparing the state dicts (`check_fit`), and with the options that would fit where
the tensors tell them (`guess_config`).
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resfuse.errors import WeightsError
from resfuse.models.fusion import METHODS
from resfuse.models.spec import BACKBONES

_NESTED_KEYS = ("state_dict", "model_state_dict", "model")  # common checkpoint layouts
# torch names the global it refused: "Unsupported global: GLOBAL __main__.Net was not an allowed
# global" or, for sys/os/posix/nt, "Trying to load unsupported GLOBAL posix.system whose module".
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _as_state_dict(_torch_load(path), path)


def _torch_load(path: Path) -> object:
    """torch.load with weights_only=True; there is no fallback to unsafe unpickling."""
    try:
        with warnings.catch_warnings():  # torch says it dispatches to torch.jit.load; it refuses
            warnings.filterwarnings("ignore", "'torch.load' received a zip file that looks like")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _REFUSED_GLOBAL.search(str(exc))
        if refused is None:
            raise WeightsError(
                f"cannot read {path} as a PyTorch state dict (not a torch.save file?); pass a "
                f".safetensors file or one written by torch.save(model.state_dict(), path)"
            ) from exc
        raise WeightsError(
            f"{path} holds pickled Python objects ({refused[1]}) that safe loading refuses, so "
            f"nothing in it was run; {_convert(f'torch.load({str(path)!r}, weights_only=False)')}"
        ) from exc
    except Exception as exc:
        if "TorchScript" in str(exc):  # torch.jit.save archives hold code as well as tensors
            raise WeightsError(
                f"{path} is a TorchScript archive, which holds code that resfuse does not "
                f"load; {_convert(f'torch.jit.load({str(path)!r})')}"
            ) from exc
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "no detail"
        raise WeightsError(
            f"cannot read {path} as a PyTorch state dict ({type(exc).__name__}: {detail}); "
            f"pass a .safetensors file or one written by torch.save(model.state_dict(), path)"
        ) from exc


def _convert(load: str) -> str:
    return (
        f"convert it to safetensors once, in an environment you trust: model = {load}; "
        f'safetensors.torch.save_file(model.state_dict(), "w.safetensors"), then pass '
        f"w.safetensors"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(
            f"cannot read {path} as safetensors ({exc}); is the file complete?"
        ) from exc


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"{path} does not hold a state dict (a mapping of names to tensors); "
            f"save one with torch.save(model.state_dict(), path)"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel prefixes


def check_fit(
    path: str | Path, own: dict[str, torch.Tensor], given: dict[str, torch.Tensor], hint: str
) -> None:
    """Refuse weights whose keys or shapes differ from the model's, naming a few of each."""
    found = {
        "with other shapes": [
            f"{k} file {_dims(given[k])} vs model {_dims(v)}"
            for k, v in own.items()
            if k in given and given[k].shape != v.shape
        ],
        # BatchNorm counters absent from old checkpoints are filled in by load_state_dict
        "missing": [k for k in own if k not in given and not k.endswith(".num_batches_tracked")],
        "unexpected": [k for k in given if k not in own],
    }
    for items in found.values():  # name weights first, BatchNorm counters last
        items.sort(key=lambda k: k.endswith(".num_batches_tracked"))
    listed = [
        f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
        for what, items in found.items()
        if items
    ]
    if listed:
        raise WeightsError(f"{path} does not fit this model: {'; '.join(listed)}; {hint}")


def _dims(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def options_hint(state: dict[str, torch.Tensor], config: Mapping[str, Any]) -> str:
    """The options, in CLI form, where the tensors say that the model that wrote them differs
    from `config` (a ModelConfig's to_dict)."""
    flags = []
    for field, value in guess_config(state).items():
        flag = f"--{field.replace('_', '-')}"
        if field == "backbone" and config["backbone"] not in value:
            flags.append(f"{flag} {value[0]}" + "".join(f" (or {v})" for v in value[1:]))
        elif field != "backbone" and value != config[field]:
            flags.append(f"{flag} {value}" if value is not None else f"no {flag}")
    if not flags:
        return (
            f"build the model with the options the weights were trained with ({', '.join(config)})"
        )
    options = "those options" if len(flags) > 1 else "that option"
    return f"these look like weights of a model built with {' '.join(flags)}: pass {options}"


# layer i's block b: encoder.layers.{i-1}.{b}. in a fusion model, layer{i}.{b}. in torchvision's
_BLOCK_KEY = re.compile(r"(?:encoder\.layers\.(\d+)|layer(\d+))\.(\d+)\.")


def guess_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ModelConfig fields that a state dict's tensors determine. `backbone` is a tuple of
    names: a cut after layer 2 cannot tell resnet50 from resnet101. A torchvision ResNet's state
    dict tells only the backbone: any stage reads it, and its stem is adapted to in_channels."""
    guess: dict[str, Any] = {}
    blocks, widths = _layer_shapes(state)
    if backbones := _backbones(blocks, widths):
        guess["backbone"] = backbones
    if any(k.startswith("encoder.layers.") for k in state) and blocks:
        guess["stage"] = len(blocks)
    stem = state.get("encoder.stem.0.weight")
    if stem is not None and stem.dim() == 4:
        guess["in_channels"] = stem.shape[1]
    fusion = {k.removeprefix("fusion."): v for k, v in state.items() if k.startswith("fusion.")}
    methods = [
        name
        for name, method in METHODS.items()
        if any(k.startswith(method.state_prefix) for k in fusion)
    ]
    if len(methods) == 1:
        guess["method"] = methods[0]
        head = state.get("head.1.weight")  # the head's last conv: one output per class
        guess["num_classes"] = head.shape[0] if head is not None and head.dim() else None
        features = METHODS[methods[0]].features_in(fusion)
        if features is not None:
            guess["features"] = features
    return guess


def _layer_shapes(state: dict[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """Blocks and output width (widest conv) of layer1, layer2, ... as far as they are present."""
    blocks: dict[int, int] = {}
    widths: dict[int, int] = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            continue
        layer = int(match[1]) + 1 if match[1] is not None else int(match[2])
        blocks[layer] = max(blocks.get(layer, 0), int(match[3]) + 1)
        if value.dim() == 4:
            widths[layer] = max(widths.get(layer, 0), value.shape[0])
    layers = range(1, len(blocks) + 1)
    if sorted(blocks) != list(layers) or len(blocks) > 4:
        return [], []
    return [blocks[i] for i in layers], [widths.get(i, 0) for i in layers]


def _backbones(blocks: list[int], widths: list[int]) -> tuple[str, ...]:
    n = len(blocks)
    return tuple(
        name
        for name, spec in BACKBONES.items()
        if n and list(spec.blocks[:n]) == blocks and list(spec.widths[:n]) == widths
    )


def save_weights(model: nn.Module, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path))
