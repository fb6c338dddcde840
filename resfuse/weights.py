"""Reading and writing weights safely: safetensors, or torch.load with weights_only=True only."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from resfuse.errors import WeightsError

if TYPE_CHECKING:
    from resfuse.models import FusionModel

_NESTED_KEYS = ("state_dict", "model_state_dict", "model")  # common checkpoint layouts


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if blocked is None:
            raise WeightsError(
                f"cannot read {path} as a PyTorch state dict (not a torch.save file?); pass a "
                f".safetensors file or one written by torch.save(model.state_dict(), path)"
            ) from exc
        raise WeightsError(
            f"{path} holds pickled Python objects ({blocked.group(1)}) that safe loading "
            f"refuses; resfuse never unpickles arbitrary code: re-save only the tensors with "
            f"torch.save(model.state_dict(), path), or as .safetensors"
        ) from exc
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "no detail"
        raise WeightsError(
            f"cannot read {path} as a PyTorch state dict ({type(exc).__name__}: {detail}); "
            f"pass a .safetensors file or one written by torch.save(model.state_dict(), path)"
        ) from exc
    return _as_state_dict(obj, path)


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


def load_weights_into(model: FusionModel, path: str | Path) -> None:
    """Load a whole fusion model's weights, or a torchvision ResNet's into the encoder."""
    state = read_state_dict(path)
    if not any(k.startswith(("encoder.", "fusion.", "head.")) for k in state):
        _load_backbone(model, state, path)
        return
    fix = (
        "build the model with the method, backbone, stage, in_channels and num_classes "
        "the weights were trained with"
    )
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = " ".join(str(exc).split())[:240]
        raise WeightsError(f"{path} does not fit this model ({detail}); {fix}") from exc
    problems = [*result.missing_keys, *result.unexpected_keys]
    if problems:
        raise WeightsError(
            f"{path} does not fit this model: {len(result.missing_keys)} missing and "
            f"{len(result.unexpected_keys)} unexpected keys (first: {problems[:3]}); {fix}"
        )


def _load_backbone(model: FusionModel, state: dict[str, torch.Tensor], path: str | Path) -> None:
    try:
        model.encoder.load_torchvision_state(state)
    except RuntimeError as exc:
        raise WeightsError(
            f"{path} is neither a resfuse fusion model nor a matching torchvision ResNet "
            f"state dict: {str(exc).splitlines()[0][:200]}"
        ) from exc
    except (ValueError, IndexError) as exc:
        raise WeightsError(f"{path} has keys that are not a torchvision ResNet's: {exc}") from exc


def save_weights(model: nn.Module, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path))
