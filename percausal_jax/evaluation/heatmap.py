"""Self-contained HTML token heatmap of scored completions (``percausal score --html``, the demo report).

Each completion token is a ``<span>`` carrying its PIR, DCE and weights as data attributes; a small inline script
colours them by the selected quantity (PIR by default, switchable to DCE, PerCE weight, NextQuill weight) and the
``title`` shows all values on hover. No external assets: the page works offline and as a file attachment.
"""

from __future__ import annotations

import html
import json
from typing import Sequence

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
.ex{border:1px solid #ddd;border-radius:6px;padding:.8em 1em;margin:1em 0}
.ex h3{margin:.1em 0 .5em;font-size:1em;color:#555}
.tok{white-space:pre-wrap;border-radius:3px;padding:1px 0;font-family:ui-monospace,monospace;font-size:.92em}
.tok:hover{outline:1px solid #333}
table.summary td,table.summary th{padding:.2em .8em;text-align:right}
.legend span{display:inline-block;width:2.2em;text-align:center;font-size:.8em}
"""

_SCRIPT = """
const ranges={pir:[-3,3],dce:[-0.5,0.5],perce_weight:[0,5],nextquill_weight:[0,1]};
function colour(v,key){const [lo,hi]=ranges[key];
  if(key==='perce_weight'||key==='nextquill_weight'){const a=Math.max(0,Math.min(1,(v-lo)/(hi-lo)));
    return `rgba(220,60,40,${a.toFixed(3)})`;}
  const a=Math.max(-1,Math.min(1,v/hi));
  return a>=0?`rgba(220,60,40,${a.toFixed(3)})`:`rgba(40,90,220,${(-a).toFixed(3)})`;}
function paint(key){document.querySelectorAll('.tok').forEach(t=>{t.style.background=colour(+t.getAttribute('data-'+key),key);});}
document.querySelectorAll('input[name=mode]').forEach(r=>r.addEventListener('change',e=>paint(e.target.value)));
paint('pir');
"""

_KEYS = ("pir", "dce", "perce_weight", "nextquill_weight")


def summary(scored: Sequence[dict], clip_min: float, clip_max: float, delta: float) -> dict[str, float]:
    """Mean PIR, fractions clipped at m and at M, fraction up-weighted by NextQuill (over all tokens)."""
    pir = [v for r in scored for v in r["pir"]]
    dce = [v for r in scored for v in r["dce"]]
    n = max(len(pir), 1)
    return {
        "tokens": float(len(pir)),
        "mean_pir": sum(pir) / n,
        "frac_clip_min": sum(v <= clip_min for v in pir) / n,
        "frac_clip_max": sum(v >= clip_max for v in pir) / n,
        "frac_upweighted": sum(v > delta for v in dce) / n,
    }


def heatmap_section(scored: Sequence[dict], titles: Sequence[str] | None = None) -> str:
    """HTML for the completions (no page wrapper); ``scored`` rows as written by ``percausal score``."""
    parts = []
    for i, r in enumerate(scored):
        spans = []
        for j, tok in enumerate(r["tokens"]):
            vals = {k: r[k][j] for k in _KEYS}
            tip = " | ".join(f"{k}={v:.3f}" for k, v in vals.items())
            data = " ".join(f'data-{k}="{v:.5f}"' for k, v in vals.items())
            spans.append(f'<span class="tok" {data} title="{html.escape(repr(tok))}: {tip}">{html.escape(tok)}</span>')
        head = html.escape(titles[i] if titles else str(r.get("id", i)))
        losses = ", ".join(f"{k} {r[k]:.3f}" for k in ("ce_loss", "perce_loss", "nextquill_loss") if k in r)
        parts.append(f'<div class="ex"><h3>{head} <small>({losses})</small></h3>{"".join(spans)}</div>')
    return "\n".join(parts)


def heatmap_page(scored: Sequence[dict], clip_min: float, clip_max: float, delta: float,
                 title: str = "PerContrast token heatmap") -> str:
    s = summary(scored, clip_min, clip_max, delta)
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:.4g}</td></tr>" for k, v in s.items())
    modes = "".join(
        f'<label><input type="radio" name="mode" value="{k}"{" checked" if k == "pir" else ""}> {label}</label> '
        for k, label in (("pir", "PIR"), ("dce", "DCE (p_h − p_0)"), ("perce_weight", "PerCE weight"),
                         ("nextquill_weight", "NextQuill weight")))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>PIR = log p(y | profile, x) − log p(y | x): red tokens depend on the profile, blue ones are made less "
            f"likely by it. PerCE weight = clip(PIR, {clip_min}, {clip_max}); NextQuill up-weights tokens with "
            f"DCE &gt; {delta}.</p>"
            f"<table class='summary'>{rows}</table><p>Colour by: {modes}</p>"
            f"{heatmap_section(scored)}<script>{_SCRIPT}</script>"
            f"<script type='application/json' id='summary'>{json.dumps(s)}</script></body></html>")
