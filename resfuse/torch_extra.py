"""PyTorch is an extra: the base install runs artifacts without it (resfuse.runtime,
resfuse-predict, resfuse-serve on ONNX Runtime, OpenVINO); what builds or runs the PyTorch model
asks for it here first, so that its absence is one line naming the extra, not a traceback."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeGuard

from resfuse.errors import BackendUnavailableError

if TYPE_CHECKING:
    import torch

EXTRA = "pip install 'resfuse[export]'"


class TorchMissingError(BackendUnavailableError, ImportError):
    """Something that needs PyTorch was asked for in an install without it. An ImportError too,
    so that code which treats an absent optional module as absent still does."""


def has_torch() -> bool:
    """Whether torch can be imported here, without importing it (which takes seconds)."""
    try:
        return "torch" in sys.modules or importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a finder that refuses it, a half-removed install
        return False


def require_torch(what: str) -> None:
    """Raise TorchMissingError, naming `what` needs torch and the extra that brings it, when
    torch is not installed."""
    if not has_torch():
        raise TorchMissingError(
            f"{what} needs PyTorch, which this install of resfuse does not have (the base "
            f"install runs artifacts only); install the export extra: {EXTRA}"
        )


class LazyTorch(ModuleType):
    """torch, imported on first attribute access (Polygraphy's lazy_import): a module that needs
    torch only in some calls imports in an install without it."""

    def __init__(self, what: str) -> None:
        super().__init__("torch")
        self._what = what

    def __getattr__(self, name: str) -> Any:
        require_torch(self._what)
        return getattr(importlib.import_module("torch"), name)


def is_tensor(x: object) -> TypeGuard[torch.Tensor]:
    """Whether `x` is a torch tensor, without importing torch: none exists before torch is."""
    module = sys.modules.get("torch")
    return module is not None and isinstance(x, module.Tensor)
