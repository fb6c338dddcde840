"""The PyTorch original, rebuilt from the manifest and its verified weights: the reference."""

from __future__ import annotations

import time
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from resfuse.artifacts import Manifest, load_original
from resfuse.errors import BackendUnavailableError, ConfigError
from resfuse.runtime.backends.base import Option, Phases, Runner, check_count, validate_options
from resfuse.torch_extra import LazyTorch, require_torch

if TYPE_CHECKING:
    import torch
else:  # the registry lists this backend in the base install too; it needs torch once chosen
    torch = LazyTorch("the torch backend (the PyTorch original)")


class TorchRunner(Runner):
    """Option `threads` (int >= 1): torch's intra-op CPU threads. torch.set_num_threads is
    process-wide, so while this runner is active every torch computation in the process uses
    that count; deactivate() puts back the count it found."""

    name = "torch"
    threaded = True
    runs_original = True
    declared = MappingProxyType({"threads": Option("torch's own count", check_count)})

    def __init__(self, manifest: Manifest, device: str = "cpu", **options: Any) -> None:
        require_torch(f"backend {self.name!r}, which runs the PyTorch original,")
        validate_options(self.name, options, self.declared)
        super().__init__(manifest, device, **options)
        self.model: torch.nn.Module | None = None
        self._device = torch.device("cuda" if device == "cuda" else device)
        self._threads_before: int | None = None  # the process's count, while ours is set

    def activate(self) -> None:
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                "device 'cuda' asked for, but this torch has no CUDA device "
                f"(torch {torch.__version__}); use device='cpu' or a CUDA build of torch"
            )
        if self._device.type not in ("cpu", "cuda"):
            raise ConfigError(f"the torch backend runs on 'cpu' or 'cuda', not {self.device!r}")
        self.model = load_original(self.manifest).to(self._device)
        # Set only once the model has loaded: a failed activate() leaves the process as it was.
        threads = self.options.get("threads")
        if threads is not None:
            if self._threads_before is None:  # activated twice: keep the first count found
                self._threads_before = torch.get_num_threads()
            torch.set_num_threads(int(threads))

    def _model(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError("runner used before activate()")
        return self.model

    def infer(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self._model()(torch.from_numpy(x).to(self._device)).cpu().numpy()

    def infer_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Torch in, torch out on the input's device: no host round trip for CUDA tensors."""
        with torch.inference_mode():
            return self._model()(x.to(self._device)).to(x.device)

    def infer_timed(self, x: np.ndarray) -> tuple[np.ndarray, Phases]:
        if self._device.type != "cuda":
            return super().infer_timed(x)
        with torch.inference_mode():
            sync = torch.cuda.synchronize
            sync()
            t0 = time.perf_counter()
            xd = torch.from_numpy(x).to(self._device)
            sync()
            t1 = time.perf_counter()
            yd = self._model()(xd)
            sync()
            t2 = time.perf_counter()
            y = yd.cpu().numpy()
            t3 = time.perf_counter()
        return y, Phases((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)

    def deactivate(self) -> None:
        self.model = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    @property
    def precision(self) -> str:
        return "float32"  # the original, whatever precision the artifact beside it has

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threads": torch.get_num_threads()}


class CompiledTorchRunner(TorchRunner):
    """The original through torch.compile (inductor, default mode), a peer to the exported
    graph. dynamic=False: each new shape's first call compiles a graph specialised to it, so
    latency is that of fixed-shape kernels; the compile (resnet18 on 2 busy cores: 1-2 minutes,
    about 10-30 s when inductor's on-disk cache holds the graph) shows in the first call, never
    in the timed ones. After torch._dynamo.config.recompile_limit shapes (8) torch runs eager."""

    name = "torch-compile"

    @classmethod
    def require_shapes(cls, count: int) -> None:
        """Past its recompile limit torch.compile runs the model eagerly, without a word: the
        torch-compile figures would then be torch's."""
        import torch._dynamo

        limit = torch._dynamo.config.recompile_limit
        if count > limit:
            raise ConfigError(
                f"torch-compile on {count} shapes: torch.compile keeps {limit} graphs per model "
                f"(torch._dynamo.config.recompile_limit) and runs eagerly after that; time at "
                f"most {limit} shapes per run"
            )

    def activate(self) -> None:
        super().activate()
        # torch.compile of a Module returns an OptimizedModule, a Module; its stubs say Callable.
        self.model = cast(torch.nn.Module, torch.compile(self._model(), dynamic=False))
