"""TensorRT: an engine that resfuse built and cached (resfuse.export.engines), run on a CUDA GPU,
by TensorRT 10/11 or TensorRT-RTX (option `flavour`; default: the one installed).

An artifact is built into an engine on first use (resfuse.export.engines, imported only then),
or found in the engine cache; an engine's sidecar manifest loads as it is. Only plan bytes that
were verified against their sidecar are deserialised, and a plan with host code only when
trusted; a TensorRT-RTX plan is first asked whether it can run on this GPU
(Runtime.get_engine_validity). Each call picks the first profile
whose range holds the input; each profile has its own execution context and CUDA stream, made
on first use, and one lock: TensorRT runs one context per profile at a time, and everything
done on a context (its set-up, a graph's warm call and capture) runs under that lock. Every
context is user-managed: it is given the activation memory of its own profile
(get_device_memory_size_for_profile_v2), not the largest shape of every profile, and not
profile 0's first (a new context starts on profile 0; see docs/tensorrt.md). torch CUDA tensors
go in and come out without a copy when they are contiguous float32 at a 256-byte aligned
address (else they are copied once): their addresses are bound and execute_async_v3 runs on the
context's stream after the work queued on the caller's stream, which then waits for it (no host
synchronisation). torch does the CUDA work (memory, streams, graphs): no pycuda or cuda-python.

With cuda_graphs=True every input shape gets its own context, with memory sized for that shape,
and a CUDA graph captured after one warm call and replayed; the input is copied into the
graph's fixed buffer and the output out of it (two device copies). At most max_graphs shapes
stay captured; the least recently used is freed once its queued work is done. TensorRT-RTX
plans are built with REQUIRE_USER_ALLOCATION (no allocation inside execute_async_v3, so they can
be captured); their graph contexts compile each shape's kernels EAGERly in the warm call (RTX's
LAZY default would leave a generic fallback kernel captured) and are asked is_stream_capturable
before capture. A TensorRT-RTX engine compiles its kernels on first use on this GPU and keeps
them in a runtime cache beside the engine, one per GPU, driver and version (runtime_cache_name),
written when the runner is deactivated.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from resfuse import engine_manifest, tensorrt_env
from resfuse.artifacts import Manifest, manifest_path_for, replace_file
from resfuse.engine_manifest import Engine, EngineRecord
from resfuse.errors import (
    ArtifactWriteError,
    BackendUnavailableError,
    ConfigError,
    EngineError,
    ManifestError,
    ModelLoadError,
)
from resfuse.profiles import Profile, parse_profile, profile_for, validate_profiles
from resfuse.runtime.backends.base import (
    Claim,
    Option,
    Phases,
    Runner,
    check_count,
    check_flag,
    check_path,
    validate_options,
)
from resfuse.torch_extra import LazyTorch

if TYPE_CHECKING:
    import tensorrt as trt
    import torch
else:  # torch holds the CUDA memory; the base install lists this backend without torch
    torch = LazyTorch("the tensorrt backend (torch holds its CUDA memory)")

MAX_GRAPHS = 8  # captured shapes kept: each holds a context, activation memory and buffers
OPTIONS = MappingProxyType(
    {
        "flavour": Option("tensorrt or tensorrt-rtx (default: the one installed; both: tensorrt)"),
        "profiles": Option(
            "Profiles or 'MIN:OPT:MAX' strings (default: the manifest's ranges, capped)"
        ),
        "builder_level": Option("builder optimisation level 0-5 (default 3)"),
        "compute_capabilities": Option(
            "tensorrt-rtx: targets such as '8.6,8.9' (default: this GPU)"
        ),
        "cache_dir": Option("engine cache folder (default ~/.cache/resfuse/engines)", check_path),
        "rebuild": Option(
            "build when no cached engine runs here (default True; False refuses instead)",
            check_flag,
        ),
        "cuda_graphs": Option(
            "capture a CUDA graph per input shape and replay it (default False)", check_flag
        ),
        "max_graphs": Option(
            f"with cuda_graphs: most input shapes kept captured, the least recently used freed "
            f"(default {MAX_GRAPHS})",
            check_count,
        ),
        "trust_host_code": Option(
            "build and run version-compatible plans, with host code (default False)", check_flag
        ),
        "engine": Option(
            "an engine's sidecar manifest to run, built from this artifact (load() sets it)",
            check_path,
        ),
    }
)
_BUILD_OPTIONS = ("profiles", "builder_level", "compute_capabilities", "cache_dir", "rebuild")
DEVICE = "cuda"
ALIGNMENT = 256  # bytes: TensorRT refuses tensor addresses that are not aligned to this


@dataclass
class _Slot:
    """One execution context of profile `index` (with `shape`: of that shape only, replayed
    from a CUDA graph), its stream and its profile's lock. The context, the activation memory
    it owns and, for a graph, the fixed input, output and graph are made on first use under
    `lock`; `closed` once freed (evicted or deactivated): a caller that fetched the slot before
    must fetch it again."""

    index: int
    shape: tuple[int, ...] | None
    stream: torch.cuda.Stream
    lock: threading.Lock
    context: Any = None
    memory: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    closed: bool = False


T = TypeVar("T")


class GraphSlots(Generic[T]):
    """At most `limit` slots by key, the least recently used evicted first: a server that sees
    every H x W would otherwise keep a context, its memory, fixed buffers and a graph for each
    one until it runs out of GPU memory. Not thread-safe: the runner holds its lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots: OrderedDict[Any, T] = OrderedDict()

    def get(self, key: Any, make: Callable[[], T]) -> tuple[T, list[T]]:
        """The slot of `key` (made by make() if absent), now the most recently used, and the
        slots evicted to stay within the limit (the caller frees them)."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = make()
        self._slots.move_to_end(key)
        evicted = []
        while len(self._slots) > self.limit:
            evicted.append(self._slots.popitem(last=False)[1])
        return slot, evicted

    def keys(self) -> list[Any]:
        return list(self._slots)

    def values(self) -> list[T]:
        return list(self._slots.values())

    def pop_all(self) -> list[T]:
        slots = list(self._slots.values())
        self._slots.clear()
        return slots


class TensorRTRunner(Runner):
    """Options: see OPTIONS. Device: "cuda", torch's current CUDA device when activated (pick
    the GPU with CUDA_VISIBLE_DEVICES)."""

    name = "tensorrt"
    declared = OPTIONS

    @classmethod
    def claim(cls, path: str | Path) -> Claim | None:
        """An engine's sidecar manifest or plan: run as built, under the artifact beside it."""
        engine = engine_artifact(path)
        if engine is None:
            return None
        sidecar, source = engine
        return Claim(cls.name, "a TensorRT engine", sidecar, source, {"engine": sidecar})

    def __init__(self, manifest: Manifest, device: str = DEVICE, **options: Any) -> None:
        _check_options(options, device)
        tensorrt_env.check_tensorrt_target(manifest)
        flavour = options.get("flavour")
        self.flavour = None if flavour is None else tensorrt_env.flavour(flavour)
        self.targets = _targets(options.get("compute_capabilities"))
        profiles = options.get("profiles")
        self.profiles = None if profiles is None else _profiles(profiles)
        if self.profiles is not None:
            validate_profiles(self.profiles, manifest)
        self.settings = engine_manifest.BuildSettings(
            builder_level=options.get("builder_level", 3),
            trust_host_code=options.get("trust_host_code", False),
        )
        self.settings.validate()
        if self.flavour is not None:
            self.settings.check_flavour(self.flavour)
        super().__init__(manifest, device, **options)
        self.record: EngineRecord | None = None
        self.engine: trt.ICudaEngine | None = None
        self._runtime: trt.Runtime | None = None
        self._runtime_cache: Any = None  # TensorRT-RTX: kernels compiled on this GPU
        self._lib: Any = None
        self._slots: dict[int, _Slot] = {}  # one per profile, without CUDA graphs
        self._graphs: GraphSlots[_Slot] = GraphSlots(_max_graphs(options.get("max_graphs")))
        self._locks: dict[int, threading.Lock] = {}
        self._slots_lock = threading.Lock()
        self._device = torch.device(DEVICE)
        self._io = (manifest.input_name, manifest.data["output"]["name"])

    def activate(self) -> None:
        given = self.options.get("engine")
        record = None if given is None else engine_manifest.read_record(given)
        entry = (  # a built engine runs on the flavour that built it
            tensorrt_env.flavour(record.environment.flavour)
            if record
            else self.flavour or tensorrt_env.default_flavour()
        )
        lib = tensorrt_env.import_flavour(entry)
        require_user_memory(lib)
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"the tensorrt backend needs a CUDA GPU, and torch {torch.__version__} sees none; "
                f"install a CUDA build of torch and check nvidia-smi and CUDA_VISIBLE_DEVICES"
            )
        here = tensorrt_env.current_environment(entry.name)
        trusted = bool(self.options.get("trust_host_code", False))
        engine = self._engine(entry, here, trusted, record)
        record = engine.record
        _require_source(record, self.manifest)
        runtime = lib.Runtime(lib.Logger(lib.Logger.WARNING))
        runtime.engine_host_code_allowed = record.host_code  # refused above when untrusted
        if entry.targets:
            _require_valid(lib, runtime, engine)
        deserialised = runtime.deserialize_cuda_engine(engine.plan)
        if deserialised is None:
            raise EngineError(
                f"TensorRT could not deserialise {record.path.name} (its log above says why); "
                f"rebuild it with resfuse-build {record.source_manifest}"
            )
        self._io = self._io_names(lib, deserialised, record)
        self._device = torch.device(DEVICE, torch.cuda.current_device())
        self.record, self.engine, self._runtime = record, deserialised, runtime
        self._lib = lib
        if entry.targets:
            self._runtime_cache = _load_runtime_cache(deserialised, self._cache_path())

    def _engine(
        self,
        entry: tensorrt_env.Flavour,
        here: tensorrt_env.BuildEnvironment,
        trusted: bool,
        given: EngineRecord | None,
    ) -> Engine:
        """The verified engine: the one given, or the cached (or newly built) one; either way
        checked against this machine, the field that differs named."""
        if given is not None:
            return engine_manifest.verify(given, here, allow_host_code=trusted)
        from resfuse.export import engines  # the runtime needs export only to build

        built = engines.find_or_build(
            self.manifest,
            self.profiles,
            self.settings,
            self.options.get("cache_dir"),
            rebuild=self.options.get("rebuild", True),
            engine=entry.name,
            targets=self.targets,
            env=here if entry.needs_gpu_to_build else None,
        )
        engine_manifest.require_runs_here(built.record, here, allow_host_code=trusted)
        return built  # its plan bytes were checked as it was found or built

    def _cache_path(self) -> Path:
        assert self.record is not None
        from resfuse.runtime.cudart import cuda_driver_version

        here = tensorrt_env.current_environment(self.record.environment.flavour)
        name = runtime_cache_name(self.record.path.stem, here, cuda_driver_version())
        return self.record.path.with_name(name)

    def _io_names(self, lib: Any, engine: trt.ICudaEngine, record: EngineRecord) -> tuple[str, str]:
        """(input, output): one float32 input named as in the manifest (the profiles were set
        on it), one float32 output, and the profiles the sidecar records; anything else is not
        an engine of this artifact."""
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == lib.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        typed = all(engine.get_tensor_dtype(n) == lib.float32 for n in names)
        profiles = engine.num_optimization_profiles
        expected = inputs == [self.manifest.input_name] and len(outputs) == 1
        if not (expected and typed and profiles == len(record.profiles)):
            raise ModelLoadError(
                f"{record.path.name} has inputs {inputs}, outputs {outputs} (all float32: "
                f"{typed}) and {profiles} profiles; resfuse expects one float32 input "
                f"{self.manifest.input_name!r}, one float32 output and the "
                f"{len(record.profiles)} profiles its manifest records; rebuild it with "
                f"resfuse-build {record.source_manifest}"
            )
        return inputs[0], outputs[0]

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.infer_tensor(torch.from_numpy(x)).numpy()

    def infer_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """A contiguous, aligned float32 tensor already on the engine's GPU runs in place (no
        copy) and its output stays there; any other is copied once and its output copied back
        to its device."""
        with torch.cuda.device(self._device):
            out = self._run(bindable(x, self._device))
        return out.to(x.device)

    def infer_timed(self, x: np.ndarray) -> tuple[np.ndarray, Phases]:
        """Host-to-device copy, compute and device-to-host copy, each timed between device
        synchronisations."""
        sync = torch.cuda.synchronize
        with torch.cuda.device(self._device):
            sync()
            t0 = time.perf_counter()
            xd = bindable(torch.from_numpy(x), self._device)
            sync()
            t1 = time.perf_counter()
            yd = self._run(xd)
            sync()
            t2 = time.perf_counter()
            y = yd.cpu().numpy()
            t3 = time.perf_counter()
        return y, Phases((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """x: bindable (see `bindable`) on the engine's GPU. The work is queued after what the
        caller's stream has queued, and the caller's stream waits for it: no host
        synchronisation. Everything done on a context, its first-use set-up and a graph's
        warm call and capture included, runs under its profile's lock."""
        if self.record is None:
            raise RuntimeError("runner used before activate()")
        shape = tuple(x.shape)
        index = profile_for(self.record.profiles, shape)
        graphs = self.options.get("cuda_graphs", False)
        caller = torch.cuda.current_stream(self._device)
        while True:
            slot = self._slot(index, shape if graphs else None)
            with slot.lock:
                if slot.closed:
                    continue  # evicted between the lookup and the lock: fetch its successor
                slot.stream.wait_stream(caller)  # set-up and run queue after the caller's work
                if slot.context is None:
                    self._prepare(slot)
                out = self._output(slot, shape)  # allocated in the caller's stream order
                slot.stream.wait_stream(caller)
                with torch.cuda.stream(slot.stream):
                    if slot.graph is not None:
                        slot.input.copy_(x)  # type: ignore[union-attr]
                        slot.graph.replay()
                        out.copy_(slot.output)  # type: ignore[arg-type]
                    else:
                        self._execute(slot.context, slot.stream, x, out)
                # x and out were allocated in the caller's stream order, and that order now
                # waits for the engine: the caching allocator cannot hand their blocks out early.
                caller.wait_stream(slot.stream)
                return out

    def _output(self, slot: _Slot, shape: tuple[int, ...]) -> torch.Tensor:
        if slot.output is not None:
            return torch.empty_like(slot.output)
        return self._shaped_output(slot.context, shape)

    def _shaped_output(self, context: Any, shape: tuple[int, ...]) -> torch.Tensor:
        """The context set to input `shape`, and an empty output of the shape that gives."""
        self._set_shape(context, shape)
        return self._empty_output(context)

    def _set_shape(self, context: Any, shape: tuple[int, ...]) -> None:
        if not context.set_input_shape(self._io[0], shape):
            raise EngineError(f"TensorRT refused input shape {shape} (its log above says why)")

    def _empty_output(self, context: Any) -> torch.Tensor:
        dims = context.get_tensor_shape(self._io[1])
        out_shape = tuple(dims[i] for i in range(len(dims)))
        return torch.empty(out_shape, dtype=torch.float32, device=self._device)

    def _execute(
        self, context: Any, stream: torch.cuda.Stream, x: torch.Tensor, out: torch.Tensor
    ) -> None:
        bind(context, self._io[0], x)
        bind(context, self._io[1], out)
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineError(
                f"TensorRT failed to run {self.record.path.name if self.record else 'the engine'} "
                f"on shape {tuple(x.shape)} (its log above says why)"
            )

    def _slot(self, index: int, shape: tuple[int, ...] | None) -> _Slot:
        """The slot of profile `index` (and, with CUDA graphs, of `shape`); graph slots are
        bounded by max_graphs, the least recently used freed once its queued work is done."""
        lock = self._locks.setdefault(index, threading.Lock())  # dict.setdefault is atomic

        def make() -> _Slot:
            return _Slot(index, shape, torch.cuda.Stream(self._device), lock)

        evicted: list[_Slot] = []
        with self._slots_lock:
            if shape is None:
                slot = self._slots.get(index) or make()
                self._slots[index] = slot
            else:
                slot, evicted = self._graphs.get((index, shape), make)
        for old in evicted:
            _close(old)  # outside _slots_lock: it waits for the old slot's profile lock
        return slot

    def _prepare(self, slot: _Slot) -> None:
        """Called under slot.lock, once: the context on the slot's profile and the activation
        memory it owns (user-managed: TensorRT-RTX plans require it, and a context made
        ON_PROFILE_CHANGE starts on profile 0, whose memory it may allocate before it is
        switched: see docs/tensorrt.md); for a graph slot, its fixed buffers and the graph,
        captured after one warm call. Everything is queued on the slot's stream."""
        assert self.engine is not None
        context = self._context(graph=slot.shape is not None)
        _select_profile(context, slot.index, slot.stream)
        with torch.cuda.stream(slot.stream):
            if slot.shape is None:
                size = self.engine.get_device_memory_size_for_profile_v2(slot.index)
                slot.memory = _give_memory(context, max(size, 1), self._device)
            else:
                self._prepare_graph(slot, context, slot.shape)
        slot.context = context

    def _prepare_graph(self, slot: _Slot, context: Any, shape: tuple[int, ...]) -> None:
        self._set_shape(context, shape)
        size = context.update_device_memory_size_for_shapes()
        if size <= 0:  # NvInferRuntime.h: 0 on error
            raise EngineError(
                f"TensorRT could not size the activation memory for shape {shape} "
                f"(update_device_memory_size_for_shapes returned {size}; its log above says "
                f"why); load the engine with cuda_graphs=False"
            )
        out = self._empty_output(context)
        memory = _give_memory(context, size, self._device)
        x = torch.zeros(shape, dtype=torch.float32, device=self._device)
        slot.graph = self._capture(context, slot.stream, x, out)
        slot.memory, slot.input, slot.output = memory, x, out

    def _context(self, graph: bool) -> trt.IExecutionContext:
        assert self.engine is not None
        strategy = self._lib.ExecutionContextAllocationStrategy.USER_MANAGED
        if self._runtime_cache is None:
            context = self.engine.create_execution_context(strategy)
        else:  # TensorRT-RTX: contexts share the runtime cache through their runtime config
            config: Any = self.engine.create_runtime_config()  # RTX API: not in tensorrt-stubs
            config.set_execution_context_allocation_strategy(strategy)
            if not config.set_runtime_cache(self._runtime_cache):
                raise EngineError(
                    "TensorRT-RTX refused its runtime cache for a new execution context (its log "
                    "above says why); delete the engine's .runtime-cache files beside it"
                )
            if graph:
                # LAZY, RTX's default, runs a generic fallback kernel until the shape's own is
                # compiled: the warm call before capture would leave the fallback captured for
                # good. EAGER compiles the shape's kernels in that warm call.
                strategies = self._lib.DynamicShapesKernelSpecializationStrategy
                config.dynamic_shapes_kernel_specialization_strategy = strategies.EAGER
            context = self.engine.create_execution_context(config)
        if context is None:
            raise EngineError(
                "TensorRT could not make an execution context (its log above says why: often out "
                "of GPU memory)"
            )
        return context

    def _capture(
        self, context: Any, stream: torch.cuda.Stream, x: torch.Tensor, out: torch.Tensor
    ) -> torch.cuda.CUDAGraph:
        """One warm call (TensorRT finishes its set-up for a new shape in the first enqueue,
        which must not be captured), then the captured call. capture_begin on the slot's
        stream, not torch.cuda.graph(), which synchronises the whole device and empties
        torch's cache for every capture."""
        self._execute(context, stream, x, out)
        stream.synchronize()
        capturable = getattr(context, "is_stream_capturable", None)  # TensorRT-RTX only
        if capturable is not None and not capturable(stream.cuda_stream):
            raise EngineError(
                "TensorRT-RTX says this engine cannot be captured in a CUDA graph "
                "(is_stream_capturable is False); load it with cuda_graphs=False"
            )
        graph = torch.cuda.CUDAGraph()
        try:
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self._execute(context, stream, x, out)
            finally:
                graph.capture_end()
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:200]
            raise EngineError(
                f"this engine cannot be captured in a CUDA graph ({detail}); load it with "
                f"cuda_graphs=False"
            ) from exc
        return graph

    def context_for(self, index: int, stream: torch.cuda.Stream) -> tuple[Any, torch.Tensor]:
        """A new context on profile `index`, made as the runner makes its own (user-managed
        memory for the profile, TensorRT-RTX's runtime cache), and the memory it was given:
        for a baseline that times the engine without the runner (benchmarks/gpu_latency.py)."""
        if self.engine is None:
            raise RuntimeError("runner used before activate()")
        context = self._context(graph=False)
        _select_profile(context, index, stream)
        size = self.engine.get_device_memory_size_for_profile_v2(index)
        with torch.cuda.stream(stream):
            return context, _give_memory(context, max(size, 1), self._device)

    def deactivate(self) -> None:
        """Waits for the work queued on every context, then drops contexts and graphs before
        the engine they belong to; a TensorRT-RTX runtime cache is saved, and the runner is
        left inactive even when that save fails."""
        try:
            with self._slots_lock:
                slots = [*self._slots.values(), *self._graphs.pop_all()]
                self._slots = {}
            for slot in slots:
                _close(slot)
            if self._runtime_cache is not None and self.record is not None:
                _save_runtime_cache(self._runtime_cache, self._cache_path())
        finally:
            self._runtime_cache = None
            self.record = self.engine = self._runtime = None

    def accepts(self, height: int, width: int) -> bool:
        """Whether some profile of the engine holds this H x W (at its smallest batch)."""
        if self.record is None:
            return super().accepts(height, width)
        return any(
            p.min[2] <= height <= p.max[2] and p.min[3] <= width <= p.max[3]
            for p in self.record.profiles
        )

    def default_tile(self) -> tuple[tuple[int, int], int]:
        """The first profile's opt H x W, the shape its kernels were tuned for, as many at once
        as that profile's max batch."""
        if self.record is None:
            return super().default_tile()
        profile = self.record.profiles[0]
        return (profile.opt[2], profile.opt[3]), profile.max[0]

    def describe(self) -> dict[str, Any]:
        """The engine's profiles, settings and environment once active; before, those asked."""
        record, engine = self.record, self.options.get("engine")
        profiles = record.profiles if record else self.profiles
        settings = record.settings if record else self.settings
        return {
            **super().describe(),
            "engine": record.path.name if record else engine and Path(engine).name,
            "profiles": None if profiles is None else [p.describe() for p in profiles],
            "cuda_graphs": bool(self.options.get("cuda_graphs", False)),
            **settings.to_dict(),
            **(record.environment.to_dict() if record else {}),
        }


def bindable(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`x` as TensorRT can bind it: float32, contiguous, on `device`, at an address aligned to
    ALIGNMENT bytes. A tensor that already is one is returned as it is (no copy); a view such
    as batch[1:2] may start mid-allocation, so a misaligned one is copied once."""
    x = x.to(device=device, dtype=torch.float32).contiguous()
    if x.data_ptr() % ALIGNMENT == 0:
        return x
    # torch's CUDA blocks start at 512 bytes, its CPU ones at 64: take an aligned window of a
    # slightly larger allocation rather than trust either.
    count, slack = x.numel(), ALIGNMENT // x.element_size()
    raw = torch.empty(count + slack, dtype=torch.float32, device=device)
    start = (-raw.data_ptr() % ALIGNMENT) // x.element_size()
    return raw[start : start + count].view(x.shape).copy_(x)


def bind(context: trt.IExecutionContext, name: str, tensor: torch.Tensor) -> None:
    """set_tensor_address returns False for an address it refuses, leaving the old one bound."""
    if not context.set_tensor_address(name, tensor.data_ptr()):
        raise EngineError(
            f"TensorRT refused the address of {name!r} ({tensor.data_ptr():#x}, shape "
            f"{tuple(tensor.shape)}): it needs contiguous float32 memory aligned to {ALIGNMENT} "
            f"bytes on the engine's GPU"
        )


def _close(slot: _Slot) -> None:
    """Free a slot once the work queued on it is done: its graph before the context it
    replays, the context before the memory it was given."""
    with slot.lock:
        slot.stream.synchronize()
        slot.closed = True
        slot.graph = slot.input = slot.output = None
        slot.context = None
        slot.memory = None


def _give_memory(context: Any, size: int, device: torch.device) -> torch.Tensor:
    """`size` bytes of activation memory for a user-managed context, allocated on the current
    stream; torch's CUDA blocks start 512-byte aligned, TensorRT wants 256."""
    memory = torch.empty(size, dtype=torch.uint8, device=device)
    context.set_device_memory(memory.data_ptr(), size)
    return memory


def require_user_memory(lib: Any) -> None:
    """Every context resfuse makes is given its memory with set_device_memory(memory, size),
    which TensorRT has from 10.1 (10.0 has only the device_memory property)."""
    if not hasattr(lib.IExecutionContext, "set_device_memory"):
        raise EngineError(
            f"TensorRT {lib.__version__} has no IExecutionContext.set_device_memory(memory, "
            f"size), which resfuse gives each execution context its memory with (TensorRT 10.1 "
            f"and later); pip install 'tensorrt>=10.1'"
        )


def runtime_cache_name(stem: str, here: tensorrt_env.BuildEnvironment, driver: int) -> str:
    """The runtime cache file of an engine on this machine. TensorRT-RTX's
    IRuntimeCache.deserialize rejects a cache from another GPU SKU, TensorRT-RTX version, OS or
    (older) CUDA driver: keyed by all of them, an RTX 4090 and an RTX 4060 of the same compute
    capability keep a cache each instead of overwriting each other's on every start."""
    key = {
        "gpu": here.gpu_name,
        "compute_capability": here.compute_capability,
        "cuda_driver": driver,
        "tensorrt": here.tensorrt_version,
        "platform": here.platform,
    }
    sm = here.compute_capability.replace(".", "")
    return f"{stem}.sm{sm}.{engine_manifest.digest(key)[:12]}.runtime-cache"


def _select_profile(context: trt.IExecutionContext, index: int, stream: torch.cuda.Stream) -> None:
    """In Python set_optimization_profile_async raises where C++ returns false."""
    try:
        ok = context.set_optimization_profile_async(index, stream.cuda_stream)
    except (RuntimeError, TypeError, ValueError) as exc:
        ok, detail = False, " ".join(str(exc).split())[:200]
    else:
        detail = "its log above says why"
    if not ok:
        raise EngineError(
            f"TensorRT could not select optimization profile {index} ({detail}); rebuild the "
            f"engine with resfuse-build"
        )
    stream.synchronize()


# What each of TensorRT-RTX's engine invalidity diagnostics asks of the user: only an
# unsupported compute capability is fixed by building for another one.
_INVALIDITY_FIXES = {
    "UNSUPPORTED_CC": "rebuild it with resfuse-build --engine tensorrt-rtx "
    "--compute-capability of this GPU",
    "VERSION_MISMATCH": "rebuild it with the TensorRT-RTX installed here",
    "OLD_CUDA_DRIVER": "update the NVIDIA driver",
    "OLD_CUDA_RUNTIME": "update the CUDA runtime (the nvidia-cuda-runtime wheel)",
    "INSUFFICIENT_GPU_MEMORY": "free GPU memory, or rebuild with smaller profiles",
    "MALFORMED_ENGINE": "rebuild it: the plan is damaged",
    "CUDA_ERROR": "check the GPU and its driver (nvidia-smi)",
}


def invalidity_reasons(lib: Any, diagnostics: Any) -> list[str]:
    """The names of the EngineInvalidityDiagnostics flags set in `diagnostics`."""
    members = lib.EngineInvalidityDiagnostics.__members__
    return [name for name, flag in members.items() if int(diagnostics) & int(flag)]


def invalid_engine_message(name: str, built_for: str, reasons: list[str], raw: int) -> str:
    """One line for an engine TensorRT-RTX refuses: its reasons and, for each, the fix."""
    said = ", ".join(reasons) or f"diagnostics {raw:#x}"
    fixes = list(dict.fromkeys(_INVALIDITY_FIXES.get(r, "rebuild it") for r in reasons))
    return (
        f"TensorRT-RTX says {name} cannot run on this GPU ({said}; built for compute "
        f"capability {built_for}): {'; '.join(fixes) or 'rebuild it with resfuse-build'}"
    )


def _require_valid(lib: Any, runtime: Any, engine: Engine) -> None:
    """TensorRT-RTX says whether a plan can run on this GPU before it is deserialised, and
    why not: a driver too old or too little memory is not fixed by another build."""
    validity, diagnostics = runtime.get_engine_validity(engine.plan)
    if validity == lib.EngineValidity.INVALID:
        record = engine.record
        raise EngineError(
            invalid_engine_message(
                record.path.name,
                record.environment.compute_capability,
                invalidity_reasons(lib, diagnostics),
                int(diagnostics),
            )
        )


def _load_runtime_cache(engine: Any, path: Path) -> Any:
    config = engine.create_runtime_config()
    cache = config.create_runtime_cache()
    try:
        data = path.read_bytes()
    except OSError:
        data = b""  # none yet (or unreadable): kernels are compiled again, then saved
    if data and not cache.deserialize(data):
        cache = config.create_runtime_cache()  # from another driver or version: start empty
    return cache


def _save_runtime_cache(cache: Any, path: Path) -> None:
    import filelock

    try:
        with filelock.FileLock(path.with_name(f".{path.name}.lock")):
            replace_file(path, bytes(cache.serialize()))
    except OSError as exc:
        raise ArtifactWriteError(
            f"the TensorRT-RTX runtime cache {path} could not be written ({exc.strerror or exc}); "
            f"kernels will be compiled again next time; make the engine cache folder writable"
        ) from exc


def _check_options(options: dict[str, Any], device: str) -> None:
    """ConfigError naming the first bad option; nothing here imports TensorRT."""
    validate_options("tensorrt", options, OPTIONS)
    if device != DEVICE:
        raise ConfigError(
            f"the tensorrt backend runs on device 'cuda' (torch's current CUDA device; choose "
            f"the GPU with CUDA_VISIBLE_DEVICES), not {device!r}; pass device='cuda' (--device "
            f"cuda)"
        )
    if options.get("max_graphs") is not None and not options.get("cuda_graphs", False):
        raise ConfigError(
            "tensorrt option max_graphs bounds the CUDA graphs kept, and cuda_graphs is off; "
            "pass cuda_graphs=True with it, or leave it out"
        )
    given = sorted(k for k in _BUILD_OPTIONS if k in options)
    if options.get("engine") is not None and given:
        raise ConfigError(
            f"tensorrt options {given} choose how an engine is built, but a built engine was "
            f"given ({options['engine']}); load the artifact to build with them, or leave them out"
        )


def _max_graphs(value: object) -> int:
    return MAX_GRAPHS if value is None else int(value)  # type: ignore[call-overload]


def _targets(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tensorrt_env.parse_targets(value)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tensorrt_env.parse_targets(",".join(value))
    raise ConfigError(
        f"tensorrt option compute_capabilities must be a string such as '8.6,8.9' or a list "
        f"of such strings, not {value!r}"
    )


def _profiles(value: object) -> list[Profile]:
    """A list of Profile objects or MIN:OPT:MAX strings; their shapes are checked against the
    manifest by validate_profiles."""
    if isinstance(value, (str, Profile)) or not isinstance(value, Sequence):
        raise ConfigError(
            f"tensorrt option profiles must be a list of Profile objects or 'MIN:OPT:MAX' "
            f"strings, such as ['1x3x64x64:1x3x512x512:8x3x1024x1024'], not {value!r}"
        )
    profiles = [parse_profile(p) if isinstance(p, str) else p for p in value]
    wrong = [p for p in profiles if not isinstance(p, Profile)]
    if wrong:
        raise ConfigError(
            f"tensorrt option profiles holds {wrong[0]!r}; give Profile objects or 'MIN:OPT:MAX' "
            f"strings"
        )
    return profiles


def _require_source(record: EngineRecord, manifest: Manifest) -> None:
    """An engine runs under an artifact's contract only if it was built from that ONNX file."""
    onnx_sha256 = manifest.record("onnx")["sha256"]
    if record.onnx_sha256 != onnx_sha256:
        raise EngineError(
            f"{record.path.name} was built from ONNX sha256 {record.onnx_sha256[:12]}..., not "
            f"from {manifest.path.name} ({onnx_sha256[:12]}...); load the artifact it was built "
            f"from, or build one from this artifact with resfuse-build"
        )


def engine_artifact(path: str | Path) -> tuple[Path, Path] | None:
    """(engine sidecar, artifact manifest) when `path` is an engine's sidecar or plan: the
    artifact it was built from must lie beside it, for its contract and preprocessing. None
    when `path` is not an engine's."""
    sidecar = manifest_path_for(path)
    if not _is_engine_manifest(sidecar):
        return None
    record = engine_manifest.read_record(sidecar)
    source = sidecar.parent / record.source_manifest
    if not source.is_file():
        raise ManifestError(
            f"{sidecar.name} was built from {record.source_manifest}, which is not beside it in "
            f"{sidecar.parent}; copy the artifact (its .json and files) there, or load the "
            f"artifact itself with backend='tensorrt'"
        )
    return sidecar, source


def _is_engine_manifest(path: Path) -> bool:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False  # read_manifest reports what is wrong with it
    return isinstance(data, dict) and data.get("format") == engine_manifest.ENGINE_FORMAT
