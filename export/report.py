"""resfuse-optimize's report as one self-contained HTML file: no network, no script, the plots
matplotlib SVG inlined, every number read from the report dict that report.json holds."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from resfuse.artifacts import replace_file
from resfuse.runtime.report import figure_html, gid, html_page, pareto, plain_ticks, pyplot, svg


def serving_ms(c: Any, serving: list[str]) -> float:  # a Candidate or its report record
    """A candidate's latency for choosing: the mean p50 over the serving shapes."""
    latency = c["latency_ms"] if isinstance(c, dict) else c.latency_ms
    return sum(latency[s] for s in serving) / len(serving)


def write_html(report: dict[str, Any], path: Path) -> None:
    replace_file(path, render(report).encode())


def render(report: dict[str, Any]) -> str:
    timed = [c for c in report["candidates"] if c["latency_ms"]]
    return html_page(
        f"resfuse-optimize: {Path(report['source']).name}",
        [
            _chosen(report),
            figure_html("Latency against input size", _latency_plot(report, timed)),
            figure_html("Accuracy against latency", _pareto_plot(report, timed)),
            figure_html("Per-class Dice against the PyTorch original", _dice_plot(report)),
            figure_html(
                f"Peak memory serving {report['shapes'][-1]} (MiB)", _memory_plot(report, timed)
            ),
            _candidates_table(report),
            _machine(report),
        ],
    )


def _chosen(report: dict[str, Any]) -> str:
    rows = []
    for target, chosen in report["chosen"].items():
        if chosen is None:
            rows.append(f"<tr><td>{html.escape(target)}</td><td colspan=3>none passed</td></tr>")
            continue
        ms = f"{serving_ms(chosen, report['shapes']):.2f}" if chosen["latency_ms"] else "not timed"
        rows.append(
            f"<tr><td>{html.escape(target)}</td><td>{html.escape(chosen['candidate'])}</td>"
            f"<td>{ms}</td><td>{html.escape(report['deploy'][target])}/</td></tr>"
        )
    why = "".join(
        f"<li><b>{html.escape(target)}</b>: {html.escape(k)}: {html.escape(v)}</li>"
        for target, reasons in report["why_not"].items()
        for k, v in reasons.items()
    ) + "".join(
        f"<li>{html.escape(name)}: not made: {html.escape(reason)}</li>"
        for name, reason in report["failed_variants"].items()
    )
    return (
        "<h2>Chosen</h2><table><tr><th>target</th><th>candidate</th>"
        f"<th>p50 ms (serving shapes)</th><th>folder</th></tr>{''.join(rows)}</table>"
        f"<h3>Not chosen</h3><ul>{why}</ul>"
    )


def _error(candidate: dict[str, Any]) -> float:
    """What the accuracy plot puts on its y axis: 1 - agreement for a head, else rel L2."""
    check = candidate["check"]
    agreement = check.get("agreement")
    return float(1 - agreement) if agreement is not None else float(check.get("rel_l2", 0.0))


def _latency_plot(report: dict[str, Any], timed: list[dict[str, Any]]) -> str:
    plt = pyplot()

    figure, axes = plt.subplots(figsize=(7, 4))
    sweep = report["sweep"]
    for c in timed:
        points = [(s, c["latency_ms"][s]) for s in sweep if s in c["latency_ms"]]
        pixels = [_pixels(s) for s, _ in points]
        axes.plot(pixels, [ms for _, ms in points], marker="o", label=c["candidate"], gid=_gid(c))
    axes.set_xlabel("H x W (pixels)")
    axes.set_ylabel("p50 latency (ms)")
    plain_ticks(axes)
    axes.legend(fontsize=7)
    return svg(figure)


def _pareto_plot(report: dict[str, Any], timed: list[dict[str, Any]]) -> str:
    plt = pyplot()

    serving = report["shapes"]
    figure, axes = plt.subplots(figsize=(7, 4))
    points = [(serving_ms(c, serving), _error(c)) for c in timed]
    for c, (ms, error) in zip(timed, points, strict=True):
        style = {"marker": "o"} if c["passed"] else {"marker": "x"}
        axes.scatter([ms], [error], label=c["candidate"], gid=_gid(c), **style)
    front = pareto(points)
    axes.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=0.8,
              label="Pareto front")  # fmt: skip
    chosen = {c["candidate"] for c in report["chosen"].values() if c}
    for c, (ms, error) in zip(timed, points, strict=True):
        if c["candidate"] in chosen:
            axes.scatter([ms], [error], marker="*", s=250, facecolors="none", edgecolors="red")
    axes.set_xlabel("p50 latency at the serving shapes (ms)")
    axes.set_ylabel("1 - agreement" if any("agreement" in c["check"] for c in timed) else "rel L2")
    plain_ticks(axes)
    axes.legend(fontsize=7)
    return svg(figure)


def _dice_plot(report: dict[str, Any]) -> str:
    plt = pyplot()

    with_dice = [c for c in report["candidates"] if c["check"].get("dice")]
    if not with_dice:
        return "<p>No segmentation head: no classes to score.</p>"
    figure, axes = plt.subplots(figsize=(7, 4))
    classes = sorted({k for c in with_dice for k in c["check"]["dice"]}, key=int)
    width = 0.8 / len(with_dice)
    for i, c in enumerate(with_dice):
        xs = [k + i * width for k in range(len(classes))]
        values = [c["check"]["dice"].get(k, 0.0) for k in classes]
        axes.bar(xs, values, width, label=c["candidate"], gid=_gid(c))
    axes.set_xticks([k + 0.4 - width / 2 for k in range(len(classes))], classes)
    axes.set_xlabel("class")
    axes.set_ylabel("Dice")
    plain_ticks(axes, x=False)
    axes.legend(fontsize=7)
    return svg(figure)


def _memory_plot(report: dict[str, Any], timed: list[dict[str, Any]]) -> str:
    """Per candidate, a bar of the process' peak resident memory and one of what loading the
    artifact and one call added to the imports'."""
    plt = pyplot()

    measured = [c for c in timed if c.get("memory_mib")]
    if not measured:
        return "<p>Nothing was timed here, so no memory was measured.</p>"
    figure, axes = plt.subplots(figsize=(7, 4))
    for i, c in enumerate(measured):
        memory = c["memory_mib"]
        axes.bar([i - 0.2, i + 0.2], [memory["process"], memory["model"]], 0.4,
                 color=["#888", "#1f77b4"], gid=_gid(c))  # fmt: skip
    axes.set_xticks(range(len(measured)), [c["candidate"] for c in measured], rotation=15,
                    fontsize=7, ha="right")  # fmt: skip
    axes.set_ylabel("peak RSS (MiB): process (grey), artifact + call (blue)")
    plain_ticks(axes, x=False)
    return svg(figure)


def _candidates_table(report: dict[str, Any]) -> str:
    shapes = report["shapes"] + [s for s in report["sweep"] if s not in report["shapes"]]
    head = "".join(f"<th>{html.escape(s)} ms</th>" for s in shapes)
    rows = []
    for c in report["candidates"]:
        verdict = "pass" if c["passed"] else "fail"
        cells = "".join(
            f"<td>{c['latency_ms'][s]:.2f}</td>" if s in c["latency_ms"] else "<td>-</td>"
            for s in shapes
        )
        agreement = c["check"].get("agreement")
        truth = c["check"].get("truth_dice")
        low = f"{min(truth.values()):.4f}" if truth else "-"
        memory = c.get("memory_mib")
        peak = f"{memory['process']:.0f} ({memory['model']:.0f})" if memory else "-"
        rows.append(
            f"<tr><td>{html.escape(c['candidate'])}</td><td class={verdict}>{verdict}</td>"
            f"<td>{'-' if agreement is None else f'{agreement:.4%}'}</td><td>{low}</td>"
            f"<td>{c['check'].get('rel_l2', 0.0):.3g}</td><td>{peak}</td>{cells}"
            f"<td>{html.escape('; '.join(c['reasons']))}</td></tr>"
        )
    return (
        "<h2>Every candidate</h2><table><tr><th>candidate</th><th>verdict</th>"
        f"<th>agreement</th><th>min Dice vs masks</th><th>worst rel L2</th>"
        f"<th>peak MiB (artifact + call)</th>{head}"
        "<th>why not</th></tr>"
        f"{''.join(rows)}</table>"
    )


def _machine(report: dict[str, Any]) -> str:
    machine = report["machine"]
    flags = " ".join(machine.get("cpu_flags", []))
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    commands = "".join(f"<pre>{html.escape(c)}</pre>" for c in report["commands"])
    return (
        f"<h2>Machine and versions</h2><p>{html.escape(str(machine.get('cpu')))}; flags "
        f"{html.escape(flags)}</p><p>{html.escape(versions)}</p>"
        f"<h2>To reproduce</h2>{commands}"
    )


def _gid(candidate: dict[str, Any]) -> str:
    return gid(candidate["candidate"])


def _pixels(shape: str) -> int:
    h, w = (int(v) for v in shape.split("x")[2:])
    return h * w
