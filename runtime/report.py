"""Reports for people: Markdown tables (readable on a terminal, pasteable into issues and
RESULTS.md) and self-contained HTML pages (no script, no network, matplotlib SVG inlined) whose
every number comes from the result dict that the command also writes as JSON."""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    return "\n".join(lines)


# HTML pages


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
    "text-align:right}th{background:#f3f3f3}.fail{color:#a00}.pass{color:#060}"
    "figure{margin:1.5em 0}svg{max-width:100%;height:auto}"
)


CSP = "default-src 'none'; style-src 'unsafe-inline'"


def html_page(title: str, sections: Sequence[str]) -> str:
    title = html.escape(title)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        # the page may fetch nothing at all, wherever it is opened: no script, font or image
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        f"<title>{title}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{title}</h1>{''.join(sections)}</body></html>"
    )


def figure_html(title: str, body: str) -> str:
    return f"<figure><figcaption><h2>{html.escape(title)}</h2></figcaption>{body}</figure>"


def pyplot() -> Any:
    """pyplot on the Agg backend: no display, no window, ever."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from resfuse.errors import ConfigError

        raise ConfigError("HTML reports draw with matplotlib: pip install 'resfuse[plot]'") from exc
    return plt


def plain_ticks(axes: Any, x: bool = True) -> None:
    """Tick labels that are whole numbers as written (no offset, no shared exponent), so a
    reader, and a test reading the SVG back, takes a tick's value from its label alone."""
    from matplotlib.ticker import FuncFormatter

    label = FuncFormatter(lambda value, _: f"{value:.4g}")
    if x:
        axes.xaxis.set_major_formatter(label)
    axes.yaxis.set_major_formatter(label)


def svg(figure: Any) -> str:
    """A matplotlib figure as inline SVG (no XML prolog, no date: the same figure, the same
    bytes); text stays text (selectable, searchable, and a tick label is its number)."""
    plt = pyplot()
    buffer = io.StringIO()
    figure.tight_layout()
    with plt.rc_context({"svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def gid(label: str) -> str:
    """An SVG element id for a plotted series, from its label."""
    return "c-" + "".join(ch if ch.isalnum() else "-" for ch in label)


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other beats on both (latency, error), lower being better,
    sorted by latency: the front a choice should lie on."""
    front = []
    for i, (latency, error) in enumerate(points):
        beaten = any(
            (l2 <= latency and e2 <= error) and (l2 < latency or e2 < error)
            for j, (l2, e2) in enumerate(points)
            if j != i
        )
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def bench_html(result: dict[str, Any]) -> str:
    """resfuse-bench's run as a page: latency against input size per engine, error against
    latency at the largest shape with the Pareto front, and every record."""
    records = result["records"]
    series: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        series.setdefault(_engine(r), []).append(r)
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, found in series.items():
        found = sorted(found, key=_pixels)
        axes.plot([_pixels(r) for r in found], [r["p50_ms"] for r in found], marker="o",
                  label=label, gid=gid(label))  # fmt: skip
    axes.set_xlabel("H x W (pixels)")
    axes.set_ylabel("p50 latency (ms)")
    plain_ticks(axes)
    axes.legend(fontsize=7)
    latency = svg(figure)
    largest = max(records, key=_pixels)["shape"]
    at = [r for r in records if r["shape"] == largest and r["backend"] != "torch"]
    figure, axes = plt.subplots(figsize=(7, 4))
    points = [(r["p50_ms"], r["rel_l2"]) for r in at]
    for r, (ms, error) in zip(at, points, strict=True):
        marker = "o" if r["within_tolerance"] else "x"
        axes.scatter([ms], [error], marker=marker, label=_engine(r), gid=gid(_engine(r)))
    front = pareto(points)
    axes.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=0.8)
    axes.set_xlabel(f"p50 latency at {'x'.join(map(str, largest))} (ms)")
    axes.set_ylabel("rel L2 against torch")
    plain_ticks(axes)
    axes.legend(fontsize=7)
    accuracy = svg(figure)
    rows = "".join(
        f"<tr><td>{html.escape(_engine(r))}</td><td>{'x'.join(map(str, r['shape']))}</td>"
        f"<td>{r['p50_ms']:.2f}</td><td>{r['rel_l2']:.3g}</td>"
        f"<td class={'pass' if r['within_tolerance'] else 'fail'}>"
        f"{'yes' if r['within_tolerance'] else 'no'}</td></tr>"
        for r in records
    )
    table = (
        "<h2>Every record</h2><table><tr><th>engine</th><th>shape</th><th>p50 ms</th>"
        f"<th>rel L2</th><th>within tolerance</th></tr>{rows}</table>"
    )
    machine = result["machine"]
    flags = html.escape(" ".join(machine.get("cpu_flags", [])))
    about = f"<p>{html.escape(str(machine.get('cpu')))}; flags {flags}</p>"
    return html_page(
        f"resfuse-bench: {Path(result['artifact']).name}",
        [
            figure_html("Latency against input size", latency),
            figure_html("Error against latency", accuracy),
            table,
            about,
        ],
    )


def _engine(record: dict[str, Any]) -> str:
    return f"{record['artifact']} on {record['backend']}"


def _pixels(record: dict[str, Any]) -> int:
    return int(record["shape"][2]) * int(record["shape"][3])
