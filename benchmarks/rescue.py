"""The mixed-precision rescue against full INT8, float32 and NNCF's accuracy-aware quantization,
on a fusion model with the planted INT8 hazard and on the same model without it.

    python benchmarks/rescue.py                       # upsample-resnet18 stage 3, 1 channel
    python benchmarks/rescue.py --side 256 --rounds 3 --out /tmp/rescue.json

For each model: float32 (`resfuse-export`), full INT8 (the same export with its gate lifted,
so that it can be timed), the rescue (`--keep-accuracy`), and NNCF's
`quantize_with_accuracy_control` on the same float32 ONNX graph, the same calibration images and
the same gate: the fused features' relative L2 against float32 at most 0.1 (NNCF's metric is
1 - that error, with max_drop 0.1), judged by resfuse on its parity sweep over the calibration
images and by NNCF on the validation images. Accuracy is judged on real photographs
from scikit-image (grayscale) that the calibration did not see. The model has random weights
and no trained head, so the mask is the argmax over the fused features' channels, which every
feature's error moves (a random head would hide INT8 damage: its logits hardly depend on the
features). Latency: bare ONNX Runtime sessions in the project's rotated block protocol
(`runtime.bench.run_blocks`), ratios against float32 round by round, with their spread.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from cpu_latency import _spread  # noqa: E402
from int8_ratio import _commit  # noqa: E402
from planted import plant  # noqa: E402

from resfuse.artifacts import read_manifest, write_json  # noqa: E402
from resfuse.compare import MaskGates, mask_agreement  # noqa: E402
from resfuse.export.onnx import INPUT_NAME  # noqa: E402
from resfuse.export.pipeline import ExportOptions, export_artifact  # noqa: E402
from resfuse.export.quantize import Calibration  # noqa: E402
from resfuse.images import load_image  # noqa: E402
from resfuse.models import ModelConfig  # noqa: E402
from resfuse.precisions import precision  # noqa: E402
from resfuse.runtime.bench import round_ratios, run_blocks  # noqa: E402
from resfuse.runtime.machine import machine_info  # noqa: E402
from resfuse.runtime.report import markdown_table  # noqa: E402

CALIBRATION = ("camera", "coins", "moon", "page", "text")  # skimage's grayscale photographs
VALIDATION = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
)
VARIANTS = ("float32", "int8", "rescued", "nncf")
MAX_REL_L2 = precision("int8").max_rel_l2  # the gate of both: the fused features' rel L2


def photographs(folder: Path, names: tuple[str, ...]) -> Path:
    """scikit-image's photographs as 8-bit grayscale PNGs in `folder`."""
    from PIL import Image
    from skimage import color, data

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        image = getattr(data, name)()
        if image.ndim == 3:
            image = (color.rgb2gray(image[..., :3]) * 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{name}.png")
    return folder


def session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def feature_mask(output: np.ndarray) -> np.ndarray:
    """The fused output's features only (the image channel is exact in every variant), as
    (B, K, H, W) scores whose argmax is the stand-in mask."""
    return output[:, 1:]


def judge(models: dict[str, bytes], inputs: list[np.ndarray], threads: int) -> dict[str, Any]:
    """Each variant's agreement and per-feature-class Dice against float32, pooled over the
    validation images, and its features' relative L2."""
    outputs = {k: [session(m, threads).run(None, {INPUT_NAME: x})[0] for x in inputs]
               for k, m in models.items()}  # fmt: skip
    found = {}
    for name, outs in outputs.items():
        ref = np.concatenate([feature_mask(o) for o in outputs["float32"]])
        out = np.concatenate([feature_mask(o) for o in outs])
        mask = mask_agreement(ref, out, MaskGates())
        dice = mask.dice
        found[name] = {
            "agreement": mask.agreement,
            "min_dice": min(dice.values(), default=1.0),
            "features_rel_l2": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
        }
    return found


def nncf_model(fp32: onnx.ModelProto, calib: list[np.ndarray], val: list[np.ndarray],
               threads: int) -> onnx.ModelProto:  # fmt: skip
    """NNCF's accuracy-aware INT8 on the same graph, data and gate (features within 0.1)."""
    try:
        import nncf
    except ImportError:
        raise SystemExit("this benchmark compares with NNCF: pip install nncf") from None

    run_fp32 = session(fp32.SerializeToString(), threads)
    items = [(x, run_fp32.run(None, {INPUT_NAME: x})[0]) for x in val]

    def validate(model: onnx.ModelProto, dataset: Any) -> float:
        """1 - the features' relative L2 against float32 over the items NNCF picks (its
        ranking uses a subset): with max_drop 0.1, resfuse's INT8 bound."""
        run = session(model.SerializeToString(), threads)
        pairs = list(dataset)
        ref = np.concatenate([feature_mask(r) for _, r in pairs])
        got = np.concatenate([feature_mask(run.run(None, {INPUT_NAME: x})[0]) for x, _ in pairs])
        return 1.0 - float(np.linalg.norm(got - ref) / np.linalg.norm(ref))

    return nncf.quantize_with_accuracy_control(
        fp32,
        nncf.Dataset([{INPUT_NAME: x} for x in calib]),
        nncf.Dataset(items, lambda item: {INPUT_NAME: item[0]}),
        lambda model, data: (validate(model, data), None),
        max_drop=MAX_REL_L2,
        subset_size=len(calib),
    )


def float_layers(model: onnx.ModelProto) -> int:
    """Convolutions that read no dequantized input: the ones a quantizer left float."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return sum(1 for n in convs if not dequantized & set(n.input))


def measure(models: dict[str, bytes], x: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    sessions = [session(m, args.threads) for m in models.values()]

    def call(k: int) -> list[float]:
        start = time.perf_counter()
        sessions[k].run(None, {INPUT_NAME: x})
        return [(time.perf_counter() - start) * 1e3]

    times = run_blocks(len(sessions), args.rounds, args.iters, call)[..., 0]
    rounds = {name: [float(np.median(b)) for b in t] for name, t in zip(models, times, strict=True)}
    return {
        "p50_ms": {name: float(np.median(t)) for name, t in zip(models, times, strict=True)},
        "round_p50_ms": rounds,
        "speedup_over_fp32_rounds": {
            name: round_ratios(rounds["float32"], r)[0] for name, r in rounds.items()
        },
    }


def one_model(planted: bool, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    config = ModelConfig("upsample", args.backbone, 3, in_channels=1, features=args.features)
    folder.mkdir(parents=True, exist_ok=True)
    weights = plant(folder / "w.safetensors", 1000.0 if planted else 1.0, config)
    calib_dir = photographs(folder / "calib", CALIBRATION)
    base = {"min_size": 64, "max_size": max(512, args.side), "max_batch": 1}
    calibration = Calibration(calib_dir, count=len(CALIBRATION), size=args.side)
    exports = {
        "float32": ExportOptions(**base, atol=3e-4),
        "int8": ExportOptions(**base, precision="int8", calibration=calibration, max_rel_l2=10),
        "rescued": ExportOptions(
            **base, precision="int8", calibration=calibration, keep_accuracy=True
        ),
    }
    graphs, manifests, seconds = {}, {}, {}
    for name, options in exports.items():
        print(f"  exporting {name}", flush=True)
        start = time.perf_counter()
        result = export_artifact(config, folder / name, options, weights=weights)
        seconds[name] = time.perf_counter() - start
        graphs[name] = onnx.load(result.onnx_path)
        manifests[name] = read_manifest(result.manifest_path)
    size = (args.side, args.side)
    contract = manifests["float32"].contract
    preprocess = exports["float32"].preprocess(config)
    calib = [load_image(p, preprocess, contract, size=size) for p in sorted(calib_dir.iterdir())]
    val_dir = photographs(folder / "val", VALIDATION)
    val = [load_image(p, preprocess, contract, size=size) for p in sorted(val_dir.iterdir())]
    print("  NNCF quantize_with_accuracy_control", flush=True)
    start = time.perf_counter()
    graphs["nncf"] = nncf_model(graphs["float32"], calib, val, args.threads)
    seconds["nncf"] = time.perf_counter() - start
    models = {k: graphs[k].SerializeToString() for k in VARIANTS}
    accuracy = judge(models, val, args.threads)
    print(f"  timing at {args.side}x{args.side}", flush=True)
    timing = measure(models, val[0], args)
    return {
        "model": f"upsample-{args.backbone} stage 3{' (planted)' if planted else ''}",
        "planted": planted,
        "float_layers": {k: float_layers(graphs[k]) for k in VARIANTS},
        "rescue_kept": [k["module"] or k["node"] for k in manifests["rescued"].kept_float],
        "make_seconds": seconds,
        "accuracy": accuracy,
        **timing,
    }


def table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        for v in VARIANTS:
            a = r["accuracy"][v]
            body.append([
                r["model"], v, str(r["float_layers"][v]), f"{a['agreement']:.2%}",
                f"{a['min_dice']:.3f}", f"{a['features_rel_l2']:.3f}", f"{r['p50_ms'][v]:.1f}",
                _spread(r["speedup_over_fp32_rounds"][v]), f"{r['make_seconds'][v]:.0f}",
            ])  # fmt: skip
    headers = ["model", "variant", "float convs", "agreement", "min Dice", "features rel L2",
               "p50 ms", "speed-up vs fp32", "made in s"]  # fmt: skip
    return markdown_table(headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/rescue.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for planted in (True, False):
            print(f"{'planted' if planted else 'unplanted'} model", flush=True)
            rows.append(one_model(planted, Path(tmp) / str(planted), args))
    summary = {
        "format": "resfuse-rescue",
        "commit": _commit(),
        "machine": machine_info(),
        **{
            k: vars(args)[k] for k in ("backbone", "features", "threads", "side", "rounds", "iters")
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, summary)
    cpu = summary["machine"]
    print(
        f"\n{cpu.get('cpu')} · flags {' '.join(cpu.get('cpu_flags', []))} · {args.threads} threads"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
