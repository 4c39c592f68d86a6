"""An HTML training report: loss and validation curves (inline SVG, no plotting library needed)
and the final metrics table."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

COLOURS = {"teacher": "#c0392b", "student": "#2471a3", "gsa": "#7d8c2e", "bicubic": "#888888",
           "teacher loss": "#c0392b", "student loss": "#2471a3"}


def svg_chart(title: str, series: Dict[str, Sequence[Tuple[float, float]]], y_label: str,
              width: int = 560, height: int = 300) -> str:
    """A line chart of named (x, y) series with axes, ticks and a legend."""
    points = [p for values in series.values() for p in values]
    if not points:
        return f"<p>{html.escape(title)}: no data yet</p>"
    x_min, x_max = min(p[0] for p in points), max(p[0] for p in points)
    y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
    if x_max == x_min:
        x_max = x_min + 1
    pad = (y_max - y_min) * 0.08 or abs(y_max) * 0.05 or 1
    y_min, y_max = y_min - pad, y_max + pad
    left, right, top, bottom = 60, 150, 30, 40
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x_min) / (x_max - x_min) * plot_w

    def sy(y):
        return top + (1 - (y - y_min) / (y_max - y_min)) * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<text x="{left}" y="18" font-size="13" font-weight="bold">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>']
    for i in range(5):
        y = y_min + (y_max - y_min) * i / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    for i in range(5):
        x = x_min + (x_max - x_min) * i / 4
        parts.append(f'<text x="{sx(x):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{x:.3g}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">minutes</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 {top + plot_h / 2})" text-anchor="middle">{html.escape(y_label)}</text>')
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS.get(name, "#000")
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        dash = ' stroke-dasharray="5,4"' if name in ("gsa", "bicubic") else ""
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for x, y in values:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>')
        ly = top + 14 + 16 * i
        parts.append(f'<line x1="{left + plot_w + 12}" x2="{left + plot_w + 32}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{left + plot_w + 38}" y="{ly}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _row(cells: List[str], tag: str = "td") -> str:
    return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"


def write_training_report(path: Path, state: Dict, baselines: Dict) -> Path:
    from .train import summarise

    history = state["history"]
    best = state["best"]
    minutes = [h["minutes"] for h in history]
    baseline = {name: summarise(rows) for name, rows in baselines.items()}
    psnr = {role: [(m, h[role]["psnr"]) for m, h in zip(minutes, history)] for role in ("teacher", "student")}
    sam = {role: [(m, h[role]["sam"]) for m, h in zip(minutes, history)] for role in ("teacher", "student")}
    for name in ("gsa", "bicubic"):
        psnr[name] = [(m, baseline[name]["psnr"]) for m in minutes]
        sam[name] = [(m, baseline[name]["sam"]) for m in minutes]
    losses = {
        "teacher loss": [(m, h["losses"][0]) for m, h in zip(minutes, history) if h["losses"][0] is not None],
        "student loss": [(m, h["losses"][1]) for m, h in zip(minutes, history) if h["losses"][1] is not None],
    }
    table = [_row(["case", "scale", "bicubic PSNR / SAM", "GSA PSNR / SAM", "student PSNR / SAM", "teacher PSNR / SAM"], "th")]
    for i, case in enumerate(best["student_rows"]):
        cells = [f"{case['cube']} ({case['sensor']})", case["scale"]]
        for rows in (baselines["bicubic"], baselines["gsa"], best["student_rows"], best["teacher_rows"]):
            cells.append(f"{rows[i]['psnr']:.2f} dB / {rows[i]['sam']:.2f}°")
        table.append(_row(cells))
    document = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>CSAKD training report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} th{{background:#eee}}</style></head>
<body><h1>Training report</h1>
<p>{state['step']} steps in {state['elapsed'] / 60:.1f} minutes; best student at epoch {best['epoch']}
(step {best['step']}): validation PSNR {best['student']['psnr']:.2f} dB, SAM {best['student']['sam']:.2f}°
— GSA {baseline['gsa']['psnr']:.2f} dB / {baseline['gsa']['sam']:.2f}°, bicubic {baseline['bicubic']['psnr']:.2f} dB /
{baseline['bicubic']['sam']:.2f}° on the same held-out data.</p>
{svg_chart("Validation PSNR (higher is better)", psnr, "dB")}
{svg_chart("Validation SAM (lower is better)", sam, "degrees")}
{svg_chart("Training loss per epoch", losses, "loss")}
<h2>Held-out validation, best epoch</h2><table>{''.join(table)}</table>
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path
