"""Self-contained HTML token heatmap of scored completions (``percausal score --html``, the demo report).

Each completion token is a ``<span>`` carrying its PIR, DCE and weights as data attributes; a small inline script
colours them by the selected quantity (PIR by default, switchable to DCE, PerCE weight, NextQuill weight) and the
``title`` shows all values on hover. No external assets: the page works offline and as a file attachment.

Rows scored with ``percausal score --contrast`` also carry the greedy choice at each step from ``z_h`` and from the
profile-contrasted logits (``argmax_personal`` / ``argmax_contrast`` and their ``*_token`` texts): tokens where they
differ get ``data-changed="1"`` (underlined; the title names both choices), i.e. the steps where contrastive decoding
would steer greedy generation elsewhere.
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
.tok[data-changed]{border-bottom:3px solid #0a0;text-decoration:none}
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
_CHANGED_KEYS = ("argmax_personal", "argmax_contrast")  # percausal score --contrast


def _changed(r: dict) -> list[bool]:
    """Per token: does the contrasted argmax differ from the personalized one (all False without them)."""
    if _CHANGED_KEYS[0] not in r:
        return [False] * len(r["tokens"])
    return [a != b for a, b in zip(r[_CHANGED_KEYS[0]], r[_CHANGED_KEYS[1]])]


def summary(scored: Sequence[dict], clip_min: float, clip_max: float, delta: float) -> dict[str, float]:
    """Mean PIR, fractions clipped at m and at M, fraction up-weighted by NextQuill (over all tokens); with
    contrastive argmaxes, the fraction of steps where contrastive decoding changes the greedy choice."""
    pir = [v for r in scored for v in r["pir"]]
    dce = [v for r in scored for v in r["dce"]]
    n = max(len(pir), 1)
    out = {
        "tokens": float(len(pir)),
        "mean_pir": sum(pir) / n,
        "frac_clip_min": sum(v <= clip_min for v in pir) / n,
        "frac_clip_max": sum(v >= clip_max for v in pir) / n,
        "frac_upweighted": sum(v > delta for v in dce) / n,
    }
    if scored and all(_CHANGED_KEYS[0] in r for r in scored):
        out["frac_contrast_changed"] = sum(sum(_changed(r)) for r in scored) / n
    return out


def heatmap_section(scored: Sequence[dict], titles: Sequence[str] | None = None) -> str:
    """HTML for the completions (no page wrapper); ``scored`` rows as written by ``percausal score``."""
    parts = []
    for i, r in enumerate(scored):
        spans = []
        for j, (tok, changed) in enumerate(zip(r["tokens"], _changed(r))):
            vals = {k: r[k][j] for k in _KEYS}
            tip = " | ".join(f"{k}={v:.3f}" for k, v in vals.items())
            data = " ".join(f'data-{k}="{v:.5f}"' for k, v in vals.items())
            if changed:
                greedy, contrastive = (r[f"{k}_token"][j] for k in _CHANGED_KEYS)
                tip += f" | contrast changes the greedy choice: {greedy!r} → {contrastive!r}"
                data += ' data-changed="1"'
            spans.append(f'<span class="tok" {data} title="{html.escape(repr(tok))}: {html.escape(tip)}">'
                         f'{html.escape(tok)}</span>')
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
            + ("<p>Underlined in green: steps where profile-contrastive decoding (<code>--contrast</code>) would "
               "pick another token than greedy decoding from the personalized logits (the title names both).</p>"
               if "frac_contrast_changed" in s else "") +
            f"<table class='summary'>{rows}</table><p>Colour by: {modes}</p>"
            f"{heatmap_section(scored)}<script>{_SCRIPT}</script>"
            f"<script type='application/json' id='summary'>{json.dumps(s)}</script></body></html>")
