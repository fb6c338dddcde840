"""CPU latency of the three fusion methods on every engine a user would pick, in one run each.

    python benchmarks/cpu_latency.py            # exports, times, writes benchmarks/RESULTS.md
    python benchmarks/cpu_latency.py --reuse    # reuse the exports of an earlier run

Each model is exported twice, float32 and INT8 (static QDQ, calibrated on random inputs: fine
for latency; its error is reported beside it). Per model and shape, one `resfuse-bench` run
(`runtime.bench.benchmark`) times PyTorch eager, ONNX Runtime and OpenVINO on both artifacts,
plus torch.compile at 512x512 (its compile is reported as its first call), in blocks of
consecutive calls, the order rotated over rounds; ONNX Runtime's threads do not spin between
calls while another engine is timed. OpenVINO bf16 joins where the CPU has bf16 instructions.

Writes benchmarks/results/cpu.json (every record, the machine and its load), cpu-*.png and
benchmarks/RESULTS.md up to its accuracy section (benchmarks/accuracy.py's, kept as it is).
Targets it reports on (never asserted in tests: shared machines are noisy, so both sides of each
ratio are measured in the same rounds):
- ONNX Runtime at least 1.8x faster (p50) than PyTorch eager at 512x512, batch 1, every method;
- INT8 ONNX Runtime at least 2.0x faster than float32 ONNX Runtime at 512x512;
- per accuracy class, the fastest engine measured is one resfuse deploys to;
- the runtime wrapper adds at most 3% over a bare InferenceSession.run on the same input.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resfuse.artifacts import read_manifest, write_json
from resfuse.errors import ConfigError
from resfuse.export.pipeline import ExportOptions, artifact_name, export_artifact
from resfuse.export.quantize import Calibration
from resfuse.models import METHODS, ModelConfig, build_model
from resfuse.runtime import load
from resfuse.runtime.backends import runs_original
from resfuse.runtime.bench import benchmark, fastest_per_class, plot, time_shape
from resfuse.runtime.machine import machine_info
from resfuse.runtime.report import markdown_table
from resfuse.shapes import format_shape

HERE = Path(__file__).parent
SHAPES = {224: 8, 512: 4, 1024: 2}  # side -> timed calls per block
ROUNDS = 5
PEERS_AT = 512  # torch.compile compiles per shape (tens of seconds each): timed here only
ACCURACY_MARK = "## Accuracy on a trained model"

# Random calibration at 512x512 leaves resnet50's smallest inputs at up to about 13% relative
# L2 error; the bound is widened here and each model's worst is reported.
# resnet50's random weights put the float32 graph's largest elementwise error near the 1e-4
# default (1.4e-4 to 2e-4 measured at 257x311, passing or not with the input range), its
# relative L2 at 1.3e-6: the float32 check (INT8's first step too) gets atol 3e-4.
FP32 = ExportOptions(atol=3e-4)
INT8 = ExportOptions(
    atol=3e-4, precision="int8", calibration=Calibration(count=8, size=512), max_rel_l2=0.2
)


def export_all(
    folder: Path, backbones: list[str], reuse: bool, methods: list[str] | None = None
) -> list[tuple[Path, Path]]:
    """(float32 manifest, INT8 manifest) per model; every method unless `methods` names some."""
    pairs = []
    for backbone in backbones:
        for method in methods or METHODS:
            config = ModelConfig(method, backbone)
            pair = []
            for options in (FP32, INT8):
                name = artifact_name(config, options.precision)
                manifest = folder / f"{name}.json"
                if not (reuse and manifest.exists()):
                    print(f"exporting {name}", flush=True)
                    export_artifact(config, folder, options)
                read_manifest(manifest).read("onnx")  # verified before it is timed
                pair.append(manifest)
            pairs.append((pair[0], pair[1]))
    return pairs


def bf16_available(manifest: Path) -> bool:
    """Whether OpenVINO can run bf16 here (it refuses rather than silently running f32)."""
    try:
        with load(manifest, "openvino", precision="bf16"):
            return True
    except ConfigError:
        return False


def backends_for(side: int, bf16: bool) -> list[str]:
    peers = ["torch", *(["torch-compile"] if side == PEERS_AT else []), "onnxruntime", "openvino"]
    return peers + (["openvino:precision=bf16"] if bf16 else [])


def time_model(fp32: Path, int8: Path, threads: int, bf16: bool) -> list[dict[str, Any]]:
    """One benchmark run per shape: every engine on both artifacts, in rotated blocks."""
    records = []
    for side, iters in SHAPES.items():
        print(f"timing {fp32.stem} at {side}x{side}", flush=True)
        result = benchmark(
            fp32,
            backends=backends_for(side, bf16),
            shapes=[(1, 3, side, side)],
            iters=iters,
            rounds=ROUNDS,
            threads=threads,
            also=[int8],
        )
        gflop = model_gflop(fp32, side)
        for record in result["records"]:
            record |= {
                "model": fp32.stem,
                "gflop": gflop,
                "gflops_achieved": gflop / (record["p50_ms"] / 1e3),
                "load_average": result["machine"]["load_average"],
            }
            records.append(record)
    return records


def spinning_effect(manifest: Path, threads: int) -> list[dict[str, Any]]:
    """ONNX Runtime alone, spinning on against off, in rotated blocks: decides the default."""
    rows = []
    with (
        load(manifest, threads=threads, spinning=True) as on,
        load(manifest, threads=threads, spinning=False) as off,
        load(manifest, "torch", threads=threads) as reference,
    ):
        for side, iters in SHAPES.items():
            records = time_shape(
                [on, off],
                (1, 3, side, side),
                warmup=2,
                iters=iters * 2,
                rounds=ROUNDS,
                reference=reference,
                labels=["spinning on", "spinning off"],
            )
            ratios = [
                a / b for a, b in zip(records[1].round_p50_ms, records[0].round_p50_ms, strict=True)
            ]
            rows.append(
                {
                    "side": side,
                    "on_p50_ms": records[0].p50_ms,
                    "off_p50_ms": records[1].p50_ms,
                    "off_over_on_rounds": ratios,
                    "n": records[0].n,
                }
            )
    return rows


def op_profile(manifest: Path, threads: int, calls: int = 5) -> dict[str, float]:
    """Share of ONNX Runtime's kernel time per operator type at 512x512 (its own profiler):
    where a precision's time goes, convolutions against the full-resolution tail. The first
    call is left out: it touches every buffer of the arena for the first time, which weighs
    on the large full-resolution tensors and would inflate the tail's share."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(read_manifest(manifest).read("onnx"), options)
        feed = {session.get_inputs()[0].name: np.zeros((1, 3, 512, 512), np.float32)}
        for _ in range(calls):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    first = next(e for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    warm = first["ts"] + first["dur"]
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > warm:
            op = e["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + e["dur"]
    whole = sum(totals.values())
    return {op: t / whole for op, t in sorted(totals.items(), key=lambda kv: -kv[1])}


def gemm_peak_gflops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """Best float32 matrix-product rate: the ceiling a convolution network can approach."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_gflop(manifest: Path, side: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = read_manifest(manifest).config
    model = build_model(**cfg.to_dict())
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, cfg.in_channels, side, side))
    return counter.get_total_flops() / 1e9


def wrapper_overhead(manifest: Path, threads: int, calls: int = 8) -> dict[str, Any]:
    """Session.run against the same ONNX Runtime session's bare run, in blocks of `calls`
    consecutive calls rotated over rounds, and the wrapper's own work (the input check) alone."""
    x = np.random.default_rng(0).standard_normal((1, 3, 512, 512), dtype=np.float32)
    with load(manifest, threads=threads) as session:
        bare = session.runner.session
        name = bare.get_inputs()[0].name
        ways = [lambda: session.run(x), lambda: bare.run(None, {name: x})]
        for _ in range(3):
            session.run(x)
        blocks: list[list[float]] = [[], []]
        for r in range(ROUNDS * 2):
            for k in (r % 2, 1 - r % 2):
                ways[k]()
                blocks[k].append(float(np.median([_timed(ways[k]) for _ in range(calls)])) * 1e3)
        check = min(_timed(lambda: session.check(x)) for _ in range(calls * 4)) * 1e3
    ratios = [w / b - 1 for w, b in zip(*blocks, strict=True)]
    wrapped, plain = float(np.median(blocks[0])), float(np.median(blocks[1]))
    return {
        "wrapped_p50_ms": wrapped,
        "bare_p50_ms": plain,
        "overhead": float(np.median(ratios)),
        "overhead_rounds": ratios,
        "check_ms": check,
        "check_share": check / plain,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="resnet18,resnet50")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--artifacts", type=Path, default=HERE / "artifacts")
    parser.add_argument("--reuse", action="store_true", help="reuse earlier exports")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite RESULTS.md and the plots from results/cpu.json",
    )
    args = parser.parse_args()
    out = HERE / "results"
    if args.report_only:
        summary = json.loads((out / "cpu.json").read_text())
        plot_records(summary, out)
        write_results(summary)
        return

    pairs = export_all(args.artifacts, args.backbones.split(","), args.reuse)
    first = args.artifacts / f"masked-{args.backbones.split(',')[0]}.json"
    masked = next(pair for pair in pairs if pair[0] == first)
    bf16 = bf16_available(first)
    records: list[dict[str, Any]] = []
    for fp32, int8 in pairs:
        records += time_model(fp32, int8, args.threads, bf16)
    summary = {
        "format": "resfuse-bench",
        "artifact": "benchmarks/artifacts/*",
        "machine": machine_info(),
        "threads": args.threads,
        "rounds": ROUNDS,
        "bf16": bf16,
        "gemm_peak_gflops": gemm_peak_gflops(args.threads),
        "spinning": spinning_effect(first, args.threads),
        "wrapper_overhead": wrapper_overhead(first, args.threads),
        "op_profile": {p.stem: op_profile(p, args.threads) for p in masked},
        "int8_rel_l2": {fp32.stem: sweep_rel_l2(int8) for fp32, int8 in pairs},
        "records": records,
    }
    out.mkdir(exist_ok=True)
    write_json(out / "cpu.json", summary)
    plot_records(summary, out)
    write_results(summary)
    print((HERE / "RESULTS.md").read_text().split(ACCURACY_MARK)[0])


def sweep_rel_l2(manifest: Path) -> dict[str, float]:
    """Relative L2 error against PyTorch per shape of the export's parity sweep."""
    results = read_manifest(manifest).data["parity"]["results"]
    return {format_shape(r["shape"]): r["rel_l2"] for r in results}


def plot_records(summary: dict[str, Any], out: Path) -> None:
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in summary["records"]:
        if r["backend"] in ("torch", "onnxruntime"):  # the curves a reader compares
            by_model.setdefault(r["model"], []).append(r)
    for name, records in by_model.items():
        plot({**summary, "artifact": name, "records": records}, out / f"cpu-{name}.png")


def _label(r: dict[str, Any]) -> str:
    """'onnxruntime int8', 'openvino bfloat16', 'torch-compile': engine and precision."""
    backend = r["backend"].split(":")[0]
    return backend if r["precision"] == "float32" else f"{backend} {r['precision']}"


def _by_model(summary: dict[str, Any], side: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Per model, its records at side x side keyed by _label."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for r in summary["records"]:
        if r["shape"][2] == side:
            table.setdefault(r["model"], {})[_label(r)] = r
    return table


def _floor(ratio: float) -> str:
    """Rounded down, so that 1.797 cannot read as a met 1.80x target."""
    return f"{math.floor(ratio * 100) / 100:.2f}x"


def _spread(ratios: list[float]) -> str:
    return f"{_floor(float(np.median(ratios)))} ({min(ratios):.2f}..{max(ratios):.2f})"


def _over(slow: dict[str, Any], fast: dict[str, Any]) -> list[float]:
    """Round by round, slow's block median over fast's: both ran in the same rounds."""
    return [a / b for a, b in zip(slow["round_p50_ms"], fast["round_p50_ms"], strict=True)]


def peers_table(summary: dict[str, Any]) -> str:
    columns = [
        "torch",
        "torch-compile",
        "onnxruntime",
        "openvino",
        *(["openvino bfloat16"] if summary["bf16"] else []),
        "onnxruntime int8",
        "openvino int8",
    ]
    rows = [
        [model, *(f"{recs[c]['p50_ms']:.1f}" if c in recs else "-" for c in columns)]
        for model, recs in _by_model(summary, PEERS_AT).items()
    ]
    return markdown_table(["model", *(f"{c} p50 ms" for c in columns)], rows)


def errors_table(summary: dict[str, Any]) -> str:
    labels = list(dict.fromkeys(_label(r) for r in summary["records"] if r["shape"][2] == 512))
    rows = []
    for label in labels:
        recs = [r for r in summary["records"] if _label(r) == label and r["shape"][2] == 512]
        errors = [r["rel_l2"] for r in recs]
        first = [r["first_call_ms"] / 1e3 for r in recs]
        rows.append(
            [
                label,
                f"{min(errors):.1e}..{max(errors):.1e}",
                f"{min(first):.1f}..{max(first):.1f}",
            ]
        )
    headers = ["engine", "rel L2 vs torch (all models)", "first call s (all models)"]
    return markdown_table(headers, rows)


def targets_table(summary: dict[str, Any]) -> str:
    rows = []
    for model, recs in _by_model(summary, 512).items():
        ort, int8, eager = recs["onnxruntime"], recs["onnxruntime int8"], recs["torch"]
        vs_torch, vs_fp32 = _over(eager, ort), _over(ort, int8)
        rel = summary["int8_rel_l2"][model]
        worst = max(rel, key=rel.__getitem__)
        rows.append(
            [
                model,
                _spread(vs_torch),
                "met" if float(np.median(vs_torch)) >= 1.8 else "NOT met",
                _spread(vs_fp32),
                "met" if float(np.median(vs_fp32)) >= 2.0 else "NOT met",
                f"{rel[worst]:.3f} ({worst})",
                f"{float(np.median(list(rel.values()))):.3f}",
            ]
        )
    headers = [
        "model",
        "ORT float32 vs torch (rounds)",
        "target 1.8x",
        "ORT INT8 vs ORT float32 (rounds)",
        "target 2.0x",
        "INT8 sweep rel L2: worst",
        "median",
    ]
    return markdown_table(headers, rows)


def fastest_table(summary: dict[str, Any]) -> str:
    rows = []
    for model in dict.fromkeys(r["model"] for r in summary["records"]):
        records = [r for r in summary["records"] if r["model"] == model]
        for f in fastest_per_class(records):
            if f["shape"].endswith(f"x{PEERS_AT}x{PEERS_AT}"):
                backend = f["backend"].split(":")[0]
                rows.append(
                    [
                        model,
                        f["accuracy_class"],
                        _label({"backend": backend, "precision": f["precision"]}),
                        f"{f['p50_ms']:.1f}",
                        "no: a PyTorch engine" if runs_original(backend) else "yes",
                    ]
                )
    headers = ["model", "accuracy class", "fastest engine", "p50 ms", "a resfuse deployment"]
    return markdown_table(headers, rows)


def profile_table(summary: dict[str, Any]) -> str:
    profiles = summary["op_profile"]
    ops = list(
        dict.fromkeys(op for shares in profiles.values() for op, v in shares.items() if v >= 0.01)
    )
    rows = [[op, *(f"{shares.get(op, 0):.1%}" for shares in profiles.values())] for op in ops]
    return markdown_table(["operator", *profiles], rows)


def _recorded(name: str) -> dict[str, Any] | None:
    """results/NAME as written by another benchmark script, or None where it has not run."""
    path = HERE / "results" / name
    return json.loads(path.read_text()) if path.exists() else None


def ratio_check_section() -> str:
    """benchmarks/ratio_check.py's last result, where it has run: the stopwatch's own check."""
    r = _recorded("ratio_check.json")
    if r is None:
        return ""
    bench = r["resfuse_bench"]
    rounds = [x["ratio"] for x in r["independent_rounds"]]
    side = r["shape"][2]
    verdict = "agree within 10%" if r["agree_within_10pct"] else "DISAGREE by more than 10%"
    return f"""## The stopwatch checked by an independent script

`python benchmarks/ratio_check.py` ({Path(r["artifact"]).stem}, {side}x{side}, {r["threads"]}
threads): PyTorch eager and a bare onnxruntime.InferenceSession, each block of calls in a
process of its own, {len(rounds)} rounds bracketing one `resfuse-bench` run on the same artifact.
Independent: {r["independent_ratio"]:.2f}x ({min(rounds):.2f}..{max(rounds):.2f});
resfuse-bench: {bench["ratio"]:.2f}x ({min(bench["ratio_rounds"]):.2f}..\
{max(bench["ratio_rounds"]):.2f}); difference {r["difference"]:+.1%}: {verdict}.

"""


def serve_section() -> str:
    """benchmarks/serve_load.py's last result, where it has run."""
    data = _recorded("serve.json")
    if data is None:
        return ""
    settings = data["settings"]
    rows = [
        [
            r["path"],
            r["clients"],
            r["requests"],
            f"{r['requests_per_s']:.1f}",
            f"{r['p50_ms']:.1f}",
            "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}",
        ]
        for r in data["results"]
    ]
    table = markdown_table(["path", "clients", "requests", "req/s", "p50 ms", "p99 ms"], rows)
    return f"""## Serving: Ray Serve against the runtime in-process

`python benchmarks/serve_load.py --artifact benchmarks/artifacts/masked-resnet18.json`
({settings["size"]}x{settings["size"]} float32 `.npy` requests over loopback HTTP, each client
sending one request after another on its own connection; {settings["replicas"]} replica,
`--max-batch {settings["max_batch"]}`, `--batch-wait-ms {settings["batch_wait_ms"]}`; the
in-process rows are threads calling one Session, before Ray started and after it stopped):

{table}

"""


def int8_table(rows: list[dict[str, Any]]) -> str:
    """benchmarks/int8_ratio.py's rows: float32 and INT8 ONNX Runtime in the same rounds."""
    body = [
        [
            r["model"],
            f"{r['torch_p50_ms']:.1f}",
            f"{r['fp32_p50_ms']:.1f}",
            f"{r['int8_p50_ms']:.1f}",
            _spread(r["ratio_rounds"]),
            "met" if r["ratio"] >= 2.0 else "NOT met",
            f"{r['int8_rel_l2']:.3f}",
        ]
        for r in rows
    ]
    headers = [
        "model",
        "torch p50 ms",
        "ORT fp32 p50 ms",
        "ORT INT8 p50 ms",
        "INT8 / fp32 (rounds)",
        "target 2.0x",
        "INT8 rel L2",
    ]
    return markdown_table(headers, body)


def int8_section() -> str:
    """benchmarks/int8_ratio.py's results: this machine's, and other machines' (int8-*.json)."""
    runs = sorted((HERE / "results").glob("int8*.json"))
    if not runs:
        return ""
    parts = []
    for path in runs:
        data = json.loads(path.read_text())
        m = data["machine"]
        flags = " ".join(f for f in m["cpu_flags"] if f.startswith(("avx", "amx", "fma")))
        ort = m["versions"].get("onnxruntime")
        profiles = "; ".join(
            f"{model}: " + ", ".join(f"{op} {share:.0%}" for op, share in list(shares.items())[:4])
            for model, shares in data["op_profile"].items()
        )
        commit = f" (commit {data['commit']})" if data.get("commit") else ""
        parts.append(
            f"`results/{path.name}`{commit}: {m['cpu']} ({m['logical_cpus']} CPUs, flags {flags}), "
            f"{data['threads']} threads, ONNX Runtime {ort}, {data['rounds']} rounds of "
            f"{data['iters']} calls, {data['side']}x{data['side']}:\n\n"
            f"{int8_table(data['rows'])}\n\nINT8 time by operator: {profiles}.\n"
        )
    return (
        "## INT8 against float32 ONNX Runtime, on this CPU and on CPUs with VNNI\n\n"
        "`python benchmarks/int8_ratio.py` times only what the INT8 target is about (float32 and "
        "INT8 ONNX Runtime, PyTorch eager as the reference, same exports and stopwatch as above), "
        "so that it fits a short lease of another machine; each run below names its CPU. The "
        "`int8-xeon-*` runs come from the CPU of a GPU machine lent to this project (Intel Xeon, "
        "Sapphire Rapids class, with VNNI and AMX), with 2 threads as here; two runs on two such "
        "machines, reported both: their float32 times differ by up to 1.7x between machines of "
        "the same kind. They were measured before commit fee8cc6 changed the INT8 graphs "
        "(upsample's transposed convolutions then ran in float32, no ReLU folded into a "
        "convolution's output, the image quantized on its way into the output) and are kept as "
        "measured: no CPU with AMX has run the current graphs. `int8-epyc-vnni.json` comes from "
        "an AMD EPYC with VNNI and BF16 but no AMX, with the current graphs. Operator shares of "
        "runs before commit 111acc0 counted each session's first call, which weighs on the large "
        "full-resolution tensors; later runs leave it out."
        "\n\n" + "\n".join(parts) + "\n"
    )


def spinning_section(summary: dict[str, Any]) -> str:
    return f"""## ONNX Runtime's spinning threads (masked model, ONNX Runtime alone)

{spinning_table(summary)}

"""


def spinning_table(summary: dict[str, Any]) -> str:
    rows = [
        [
            f"{s['side']}x{s['side']}",
            f"{s['on_p50_ms']:.1f}",
            f"{s['off_p50_ms']:.1f}",
            f"{float(np.median(s['off_over_on_rounds'])):.3f} "
            f"({min(s['off_over_on_rounds']):.3f}..{max(s['off_over_on_rounds']):.3f})",
            s["n"],
        ]
        for s in summary["spinning"]
    ]
    headers = ["HxW", "spinning on p50 ms", "off p50 ms", "off / on (rounds)", "n each"]
    return markdown_table(headers, rows)


def records_table(summary: dict[str, Any]) -> str:
    peak = summary["gemm_peak_gflops"]
    rows = []
    for r in summary["records"]:
        fp32 = r["precision"] == "float32"
        rows.append(
            [
                r["model"],
                _label(r),
                format_shape(r["shape"][2:]),
                r["n"],
                f"{r['p50_ms']:.1f}",
                "-" if r["std_ms"] is None else f"{r['std_ms']:.1f}",
                "-" if r["p90_ms"] is None else f"{r['p90_ms']:.1f}",
                f"{r['min_ms']:.1f}",
                f"{r['gflops_achieved']:.0f}",
                f"{r['gflops_achieved'] / peak:.0%}" if fp32 else "-",
                _spread(r["speedup_rounds"]) if r["speedup_rounds"] else "-",
                f"{r['rel_l2']:.1e}",
            ]
        )
    headers = ["model", "engine", "HxW", "n", "p50 ms", "std ms", "p90 ms", "min ms"]
    headers += ["GFLOP/s", "of peak", "vs torch (rounds)", "rel L2"]
    return markdown_table(headers, rows)


def write_results(summary: dict[str, Any]) -> None:
    m = summary["machine"]
    flags = [f for f in m["cpu_flags"] if f.startswith(("avx", "amx", "fma"))]
    loads = [r["load_average"] for r in summary["records"]]
    busiest = max(max(x["before"][0], x["after"][0]) for x in loads)
    o = summary["wrapper_overhead"]
    plots = "\n".join(
        f"![{name}](results/cpu-{name}.png)"
        for name in dict.fromkeys(r["model"] for r in summary["records"])
    )
    bf16_note = (
        "OpenVINO bf16 ran (the CPU has bf16 instructions)."
        if summary["bf16"]
        else "OpenVINO bf16 did not run: this CPU reports no bf16 instructions (no avx512_bf16, "
        "no amx), and resfuse refuses bf16 there rather than time OpenVINO's silent f32 fallback."
    )
    text = f"""# CPU latency: every engine in one run

Made by `python benchmarks/cpu_latency.py` (raw records: `results/cpu.json`, plots:
`results/cpu-*.png`). Batch 1, {summary["threads"]} threads for every engine. Per model and
shape, one `resfuse-bench` run times every engine in blocks of consecutive calls (224²: 8,
512²: 4, 1024²: 2 timed calls per block, after one that is not counted), one block per engine
per round, the order rotated over {summary["rounds"]} rounds, after 2 warm-up calls per engine;
ONNX Runtime's threads do not spin while another engine is timed. Ratios are taken round by
round (blocks of one round ran back to back) and given as median (range over the rounds).
Percentiles are given only where 5 samples lie above them.

Machine: {m["cpu"]}, {m["usable_cpus"]} usable CPUs ({m["physical_cores"]} physical cores),
instruction-set flags: {" ".join(flags)}; {m["os"]};
{", ".join(f"{k} {v}" for k, v in m["versions"].items())}. The 1-minute load average reached
{busiest:.1f} during the runs, the benchmark's own {summary["threads"]} threads included (each
record carries its own). {bf16_note}

## The engines at {PEERS_AT}x{PEERS_AT} (p50 ms)

{peers_table(summary)}

Error against the PyTorch original on the timed input, and each engine's first call (torch.compile
compiles in it):

{errors_table(summary)}

## Fastest engine per accuracy class at {PEERS_AT}x{PEERS_AT}

{fastest_table(summary)}

## Targets at 512x512

{targets_table(summary)}

INT8 is `resfuse-export --int8`: static QDQ quantization of the convolutions (int8 weights per
channel, uint8 activations, each ReLU folded into its convolution's output; upsample's
transposed convolutions rewritten as convolutions and a sub-pixel shuffle that runs on the
8-bit values), the interpolation, gating and concatenation in float32, calibrated here on 8
random inputs at 512x512 and exported with `--max-rel-l2 0.2`. "INT8 sweep rel L2" is its
relative L2 error against the float32 PyTorch original over the export's parity sweep (random
inputs): the worst shape, and the median. These models have random weights; the accuracy
section below measures trained ones.

Where ONNX Runtime's time goes at 512x512 (its profiler, share of kernel time per operator
type, operators under 1% left out): INT8 speeds up the convolutions, which on this CPU (no
VNNI) still take most of an INT8 call; the full-resolution float32 work (the interpolation of
the features to H x W, a MatMul; the concatenation with the image; the masked method's gating)
is memory-bound and the same in both.

{profile_table(summary)}

{int8_section()}{ratio_check_section()}{spinning_section(summary)}\
## Runtime wrapper overhead (masked model, 512x512)

`Session.run` (input contract, NaN/Inf scan, dispatch) {o["wrapped_p50_ms"]:.2f} ms against a bare
`InferenceSession.run` {o["bare_p50_ms"]:.2f} ms on the same session, in rotated blocks:
{o["overhead"]:+.1%} (median over rounds; range {min(o["overhead_rounds"]):+.1%} to
{max(o["overhead_rounds"]):+.1%}; target at most +3%). The wrapper's own work, the input check,
timed alone: {o["check_ms"]:.2f} ms, {o["check_share"]:.2%} of the bare call.

## All records

Float32 matrix-product peak measured in this run (torch, 2048x2048, best of 10):
{summary["gemm_peak_gflops"]:.0f} GFLOP/s. GFLOP/s is the model's FLOPs (torch's FlopCounterMode)
over its p50, "of peak" its ratio to that rate (float32 rows only).

{records_table(summary)}

## Latency against resolution (PyTorch eager and ONNX Runtime)

{plots}

{serve_section()}"""
    path = HERE / "RESULTS.md"
    old = path.read_text() if path.exists() else ""
    kept = old[old.index(ACCURACY_MARK) :] if ACCURACY_MARK in old else ""
    path.write_text(text + kept)


if __name__ == "__main__":
    main()
