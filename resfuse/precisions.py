"""What each precision of an artifact is, in one table: export, manifests, names, the bench and the
CLI read it from here, so a new precision is one entry (and its converter in resfuse.export).

A precision is the dtype its manifest records (float32, float16, int8) and, for INT8, the device
family whose activation scheme it uses: uint8 activations suit x86 CPUs, TensorRT takes zero
points 0 only, so the two INT8 entries differ in name suffix, targets and quantizer settings.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from resfuse.compare import MaskGates
from resfuse.errors import ConfigError

# ONNX Runtime's devices, and TensorRT (which resfuse-build also takes): a manifest's `targets`.
TARGETS = ("cpu", "cuda", "tensorrt")
# A variant whose most sensitive layers were kept float to pass its gate (--keep-accuracy) says
# so in its name: it is not the fully reduced graph its precision names.
MIXED_SUFFIX = "-mixed"
# What a segmentation user signs off a reduced-precision model with a head on, over the sweep:
# 99% of pixels keep the original's class, and no class loses more than 2% of its Dice (one
# class can lose 3 IoU points while the mean moves by 0.8, so every class is gated, not the mean).
HEAD_GATES = MaskGates(min_agreement=0.99, min_dice=0.98)


@dataclass(frozen=True)
class Precision:
    dtype: str  # what the manifest's "precision" says
    option: str  # resfuse-export --precision
    target: str | None  # resfuse-export --target: the INT8 activation scheme; None elsewhere
    suffix: str  # added to the base name: a variant never takes its float32 source's name
    targets: tuple[str, ...]  # the devices the artifact is made for; runtimes refuse others
    # The parity bound against the float32 PyTorch original, as relative L2; None: elementwise
    # (--atol/--rtol), which is how float32 is judged.
    max_rel_l2: float | None
    accuracy_class: str  # resfuse-bench compares engines within a class
    calibrated: bool  # made from calibration inputs (--calib-images or --calib-random)
    symmetric: bool  # INT8 activations with zero point 0
    # "module:function" making this precision's graph from the verified float32 one; imported
    # on use, since its libraries (onnxconverter-common, onnxruntime's quantizer) are heavy.
    converter: str | None
    hint: str  # said after a failed parity sweep: what to try
    # A model with a head: its mask gates (None: judged by the tolerance alone) and the looser
    # bound on its logits' relative L2 they come with (None: max_rel_l2), which then only
    # catches gross faults: the mask is what a user deploys.
    mask_gates: MaskGates | None = None
    head_max_rel_l2: float | None = None

    def convert(self) -> Callable[..., Any]:
        if self.converter is None:
            raise ConfigError(f"{self.dtype} is the exported graph itself; it has no converter")
        module, name = self.converter.split(":")
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


_INT8_CPU = Precision(
    dtype="int8",
    option="int8",
    target="cpu",  # uint8 activations: the fastest INT8 on x86 CPUs
    suffix="-int8",
    targets=("cpu",),
    symmetric=False,
    # A bound for gross faults: an input of one feature cell quantizes worst (0.09-0.13 at
    # 32x32 on resnet18/50 with stride 32, 0.04 at 64x64), hence INT8's larger --min-size.
    max_rel_l2=0.1,
    accuracy_class="int8",
    calibrated=True,
    converter="resfuse.export.variants:int8_graph",
    hint="keep its most sensitive layers float with --keep-accuracy (--explain ranks them), "
    "calibrate on representative images (--calib-images DIR, --calib-count), raise --min-size "
    "(inputs of one feature cell quantize worst) or accept a larger error with --max-rel-l2",
    mask_gates=HEAD_GATES,
    # logits of a random or trained head move by 0.05-0.15 under INT8 while its mask holds
    head_max_rel_l2=0.5,
)

# The registry: a new precision is one entry here and its converter.
PRECISIONS: list[Precision] = [
    Precision(
        dtype="float32",
        option="fp32",
        target=None,
        suffix="",
        targets=TARGETS,
        max_rel_l2=None,
        accuracy_class="float32",
        calibrated=False,
        symmetric=False,
        converter=None,
        hint="",
    ),
    Precision(
        dtype="float16",
        option="fp16",
        target=None,
        suffix="-fp16",
        targets=TARGETS,  # made for GPUs; checkable on ONNX Runtime's CPU, where it was verified
        # Measured on ONNX Runtime CPU (resnet18, random inputs 32x32 to 1024x1024): spp and
        # masked 4.6e-4 to 6.0e-4, about one float16 rounding; upsample 1e-5, its output being
        # mostly the exact image. 5e-3 leaves 8x for deeper backbones, trained weights and GPU
        # kernels, and fails gross faults (a wrong cast, overflow). Which parts stay float32
        # moves the error by only 5-12% on random inputs: tests/test_precision.py checks that on
        # the graph itself.
        max_rel_l2=5e-3,
        accuracy_class="16-bit float",
        calibrated=False,
        symmetric=False,
        converter="resfuse.export.variants:float16_graph",
        hint="keep its most sensitive layers float32 with --keep-accuracy (--explain ranks "
        "them), or accept a larger error with --max-rel-l2",
        mask_gates=HEAD_GATES,
    ),
    _INT8_CPU,
    # TensorRT takes zero points 0 only; the graph still runs, and is checked, everywhere
    replace(_INT8_CPU, target="tensorrt", suffix="-int8-trt", targets=TARGETS, symmetric=True),
]
# A backend may compute in a dtype no artifact is stored in (OpenVINO's bf16 over a float32 or
# float16 graph): its accuracy class, for resfuse-bench.
_COMPUTE_ONLY = {"bfloat16": "16-bit float"}


def dtypes() -> list[str]:
    """What a manifest's "precision" may say."""
    return list(dict.fromkeys(p.dtype for p in PRECISIONS))


def options() -> list[str]:
    """resfuse-export's --precision choices."""
    return list(dict.fromkeys(p.option for p in PRECISIONS))


def variant_targets() -> list[str]:
    """resfuse-export's --target choices: the variants of one dtype (INT8's activation schemes)."""
    return list(dict.fromkeys(p.target for p in PRECISIONS if p.target is not None))


def precision(dtype: str, target: str | None = None) -> Precision:
    """The entry of manifest dtype `dtype` ('float16') and INT8 `target` (None: its default,
    the first); ConfigError naming what fits otherwise."""
    entries = [p for p in PRECISIONS if p.dtype == dtype]
    if not entries:
        raise ConfigError(f"precision {dtype!r} is not one of {', '.join(dtypes())}")
    if target is None:
        return entries[0]
    for entry in entries:
        if entry.target == target:
            return entry
    if entries[0].target is None:
        raise ConfigError(
            f"--target picks the INT8 activation scheme and applies to --precision int8 only; a "
            f"{dtype} artifact is the same graph for every target and suits "
            f"{', '.join(entries[0].targets)} as it is: drop --target {target}"
        )
    raise ConfigError(
        f"--target {target!r} is not one of {', '.join(variant_targets())}; use tensorrt for "
        f"TensorRT's INT8, or leave it out for the CPU's"
    )


def from_option(option: str) -> str:
    """resfuse-export's --precision (fp16) as the manifest's dtype (float16)."""
    return next(p.dtype for p in PRECISIONS if p.option == option)


def default_targets(dtype: str) -> list[str]:
    """The targets of a manifest written before they were recorded: the first entry of its
    dtype's (the INT8 artifacts of then had uint8 activations, a CPU scheme)."""
    return list(precision(dtype).targets)


def accuracy_class(dtype: str) -> str:
    """The class resfuse-bench compares an engine computing in `dtype` within."""
    found = [p.accuracy_class for p in PRECISIONS if p.dtype == dtype]
    return found[0] if found else _COMPUTE_ONLY.get(dtype, dtype)
