"""The demo report: one self-contained HTML page with the CE vs PerCE metric table, training curves (inline SVG),
PNG plots (:mod:`percausal_jax.evaluation.plots`: eval NLL of personal / generic tokens vs step, the test metrics as
bars; embedded as data URIs, the files sit next to the page), sample generations, and the PIR token heatmap from
``percausal score``."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Sequence

from percausal_jax import storage
from percausal_jax.atomic import write_text
from percausal_jax.evaluation.heatmap import heatmap_section, summary
from percausal_jax.evaluation.plots import COLOURS as _COLOURS
from percausal_jax.evaluation.plots import Plot

METRICS = ("rouge1", "rougeL", "meteor", "span_recall", "nll_personal", "nll_generic", "eval_nll", "n")


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in storage.path(path).read_text().splitlines() if line.strip()]


def svg_curves(curves: dict[str, Sequence[tuple[float, float]]], title: str, width: int = 520,
               height: int = 240) -> str:
    """Line chart of ``{label: [(x, y), ...]}`` as an inline SVG (axes with min/max ticks, a legend)."""
    pts = [p for c in curves.values() for p in c]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    L, R, T, B = 50, 10, 24, 30
    sx = lambda x: L + (x - x0) / (x1 - x0) * (width - L - R)  # noqa: E731
    sy = lambda y: T + (1 - (y - y0) / (y1 - y0)) * (height - T - B)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<line x1="{L}" y1="{height - B}" x2="{width - R}" y2="{height - B}" stroke="#888"/>',
             f'<line x1="{L}" y1="{T}" x2="{L}" y2="{height - B}" stroke="#888"/>',
             f'<text x="{L - 4}" y="{sy(y1) + 4}" text-anchor="end" font-size="10">{y1:.3g}</text>',
             f'<text x="{L - 4}" y="{sy(y0) + 4}" text-anchor="end" font-size="10">{y0:.3g}</text>',
             f'<text x="{sx(x0)}" y="{height - B + 14}" font-size="10">{x0:g}</text>',
             f'<text x="{sx(x1)}" y="{height - B + 14}" text-anchor="end" font-size="10">{x1:g} (step)</text>']
    for i, (label, c) in enumerate(curves.items()):
        colour = _COLOURS.get(label, "#444")
        poly = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in c)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{poly}"/>')
        parts.append(f'<text x="{width - R - 4}" y="{T + 14 * (i + 1)}" text-anchor="end" font-size="11" '
                     f'fill="{colour}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def metric_table(results: dict[str, dict]) -> str:
    cols = [m for m in METRICS if any(m in r for r in results.values())]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = ""
    for method, r in results.items():
        cells = "".join(f"<td>{r[c]:.4f}</td>" if isinstance(r.get(c), float) else f"<td>{r.get(c, '')}</td>"
                        for c in cols)
        body += f"<tr><th>{html.escape(method)}</th>{cells}</tr>"
    return f"<table class='metrics'><tr><th>method</th>{head}</tr>{body}</table>"


def samples_table(preds: dict[str, list[dict]], n: int = 4) -> str:
    methods = list(preds)
    first = preds[methods[0]][:n]
    rows = ""
    for i, row in enumerate(first):
        cells = "".join(f"<td>{html.escape(preds[m][i]['prediction'])}</td>" for m in methods)
        rows += f"<tr><td>{html.escape(row['reference'])}</td>{cells}</tr>"
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    return f"<table class='samples'><tr><th>reference</th>{head}</tr>{rows}</table>"


def write_report(out: str | Path, *, results: dict[str, dict], train_metrics: dict[str, list[dict]],
                 preds: dict[str, list[dict]], scored: Sequence[dict], notes: str = "",
                 clip=(0.8, 5.0), delta: float = 0.05, plots: Sequence[Plot] = ()) -> Path:
    curves_nll = svg_curves({m: [(r["step"], r["nll_mean"]) for r in rows] for m, rows in train_metrics.items()},
                            "training NLL of the gold response (mean per token)")
    curves_loss = svg_curves({m: [(r["step"], r["loss"]) for r in rows] for m, rows in train_metrics.items()},
                             "training objective (each method's own loss)")
    s = summary(scored, *clip, delta)
    images = "".join(f'<img src="{p.data_uri()}" alt="{html.escape(p.path.stem)}" title="{html.escape(p.path.name)}" '
                     'style="max-width:100%;display:block;margin:.8em 0">' for p in plots)
    style = """body{font-family:system-ui,sans-serif;margin:2em;max-width:72em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;
vertical-align:top;font-size:.92em}table.metrics td{text-align:right}.ex{border:1px solid #ddd;border-radius:6px;
padding:.6em 1em;margin:.8em 0}.tok{white-space:pre-wrap;border-radius:3px;font-family:ui-monospace,monospace;
font-size:.92em}.tok:hover{outline:1px solid #333}"""
    script = """const r={pir:[-3,3]};function c(v){const a=Math.max(-1,Math.min(1,v/3));
return a>=0?`rgba(220,60,40,${a.toFixed(3)})`:`rgba(40,90,220,${(-a).toFixed(3)})`;}
document.querySelectorAll('.tok').forEach(t=>{t.style.background=c(+t.getAttribute('data-pir'));});"""
    page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>percausal demo: CE vs PerCE</title>
<style>{style}</style></head><body>
<h1>Personalization demo: CE vs PerCE on SmolLM2-135M-Instruct</h1>
<p>{notes}</p>
<h2>Test metrics (users never seen in training)</h2>{metric_table(results)}
<h2>Training curves</h2>{curves_nll} {curves_loss}
{f"<h2>Held-out NLL and test metrics</h2>{images}" if images else ""}
<h2>Sample generations</h2>{samples_table(preds)}
<h2>Which tokens are personal? PIR heatmap (PerCE model)</h2>
<p>Red tokens are made more likely by the user's profile (PIR = log p(y | profile, x) − log p(y | x) &gt; 0), blue
ones less likely; hover for values. Mean PIR {s['mean_pir']:.3f}; clipped at m={clip[0]}: {s['frac_clip_min']:.1%};
at M={clip[1]}: {s['frac_clip_max']:.1%}; NextQuill up-weighted (DCE &gt; {delta}): {s['frac_upweighted']:.1%}.</p>
{heatmap_section(scored)}
<script>{script}</script></body></html>"""
    return write_text(out, page)
