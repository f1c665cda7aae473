"""The slowest probe heartbeat of each second of a broadcast, one line per mode, as an SVG.

    python bench/plot_slicing.py bench/results/2026-11-27-fanout-slicing-500k-0.1pps.json
                                 [--out PATH.svg] [--also OTHER.json:MODE:LABEL ...]

Reads ``heartbeat_rtt_ms_max_by_second`` of each mode in a ``bench/fanout_slicing.py`` result
(chunked, inline) and draws them on a log scale (1 ms to 100 s) against the seconds since the
first publication, with the 50 ms target as a line. ``--also`` adds a mode of another result
file (e.g. the run with the clients at a lower priority). No plotting library: the SVG is
written by hand, so the bench needs nothing beyond the project's own dependencies.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 760, 380
LEFT, RIGHT, TOP, BOTTOM = 70, 170, 40, 50
Y_MIN_MS, Y_MAX_MS = 1.0, 100_000.0
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
TARGET_MS = 50.0


def _y(ms: float) -> float:
    ms = min(max(ms, Y_MIN_MS), Y_MAX_MS)
    span = math.log10(Y_MAX_MS) - math.log10(Y_MIN_MS)
    frac = (math.log10(ms) - math.log10(Y_MIN_MS)) / span
    return TOP + (HEIGHT - TOP - BOTTOM) * (1 - frac)


def _x(second: float, seconds: float) -> float:
    return LEFT + (WIDTH - LEFT - RIGHT) * second / max(seconds, 1.0)


def render(series: list[tuple[str, list[float]]], title: str) -> str:
    """An SVG document: one polyline per (label, per-second worst RTT in ms) series."""
    seconds = max((len(v) for _, v in series), default=1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{LEFT}" y="22" font-size="14">{escape(title)}</text>']
    # y grid: decades
    ms = Y_MIN_MS
    while ms <= Y_MAX_MS:
        y = _y(ms)
        label = f"{ms:g} ms" if ms < 1000 else f"{ms / 1000:g} s"
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" '
                   f'stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
        ms *= 10
    # x axis: every 10 s
    for s in range(0, seconds + 1, 10):
        x = _x(s, seconds)
        out.append(f'<line x1="{x:.1f}" y1="{HEIGHT - BOTTOM}" x2="{x:.1f}" '
                   f'y2="{HEIGHT - BOTTOM + 4}" stroke="#333"/>')
        out.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle">{s}</text>')
    out.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" y="{HEIGHT - 10}" '
               f'text-anchor="middle">seconds since the first publication</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
               f'height="{HEIGHT - TOP - BOTTOM}" fill="none" stroke="#333"/>')
    y = _y(TARGET_MS)
    out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" '
               f'stroke="#000" stroke-dasharray="5,4"/>')
    out.append(f'<text x="{WIDTH - RIGHT + 6}" y="{y + 4:.1f}">target 50 ms</text>')
    for i, (label, values) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(f"{_x(s + 0.5, seconds):.1f},{_y(v):.1f}"
                          for s, v in enumerate(values) if v > 0)
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                   f'stroke-width="1.5"><title>{escape(label)}</title></polyline>')
        ly = TOP + 16 + 18 * i
        out.append(f'<line x1="{WIDTH - RIGHT + 6}" y1="{ly - 4}" x2="{WIDTH - RIGHT + 26}" '
                   f'y2="{ly - 4}" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{WIDTH - RIGHT + 30}" y="{ly}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _series(path: Path, mode: str | None = None, label: str | None = None
            ) -> list[tuple[str, list[float]]]:
    report: dict[str, Any] = json.loads(path.read_text())
    out = []
    for name, r in report["results"].items():
        if mode is not None and name != mode:
            continue
        values = r.get("heartbeat_rtt_ms_max_by_second") or []
        out.append((label or name, [float(v) for v in values]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path)
    p.add_argument("--out", type=Path, help="default: the result's path with .svg")
    p.add_argument("--also", action="append", default=[], metavar="FILE:MODE:LABEL")
    p.add_argument("--title", default="slowest probe heartbeat per second, during the broadcast")
    args = p.parse_args()
    series = _series(args.result)
    for spec in args.also:
        file, mode, label = spec.split(":", 2)
        series += _series(Path(file), mode, label)
    if not any(v for _, v in series):
        print("no heartbeat_rtt_ms_max_by_second in the result(s)", file=sys.stderr)
        return 1
    out = args.out or args.result.with_suffix(".svg")
    out.write_text(render(series, args.title))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
