"""sweep.md and sweep.html: the selection rule first, then each method at its chosen LR (mean ± std over seeds on
the test split, and run time), the validation grid that chose it, and the plots (embedded in the HTML)."""

from __future__ import annotations

import dataclasses
import html
from typing import Sequence

from percausal_jax.evaluation.plots import Plot
from percausal_jax.sweep.results import TEST_METRICS, Choice, MethodSummary


@dataclasses.dataclass(frozen=True)
class Context:
    """What the sweep ran on: stated at the top of both reports."""

    rule: str  # the selection criterion, in words
    metric: str  # its validation metric
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]
    config: str
    train: str
    val: str
    test: str


def _columns(summaries: Sequence[MethodSummary]) -> list[str]:
    return [k for k in TEST_METRICS if any(k in s.test for s in summaries)]


def _header(ctx: Context) -> list[str]:
    return [f"Config `{ctx.config}`; train `{ctx.train}`; validation `{ctx.val}`; test `{ctx.test}`; "
            f"LR grid {', '.join(f'{lr:g}' for lr in ctx.lrs)}; seeds {', '.join(map(str, ctx.seeds))} "
            "(each seed sets the config's `seed`: data order and LoRA init).",
            f"**Selection (fixed before any run):** each method's learning rate is the one with the best {ctx.rule}. "
            "The test split is evaluated only at that rate; its numbers are mean ± sample std over the seeds.",
            "Run time = training + evaluating on the test split, per seed; spent = the sweep's total for the method "
            "(every LR, validation and test evaluation)."]


def markdown(ctx: Context, summaries: Sequence[MethodSummary], choices: dict[str, Choice],
             plots: Sequence[Plot] = ()) -> str:
    cols = _columns(summaries)
    lines = ["# Sweep: every method at its best learning rate", "", *(x + "\n" for x in _header(ctx)),
             "## Test split, at the LR chosen on validation", "",
             f"| method | LR | seeds | val {ctx.metric} | " + " | ".join(f"test {c}" for c in cols)
             + " | run s | spent s |",
             "|---|---|---|---|" + "---|" * len(cols) + "---|---|"]
    for s in summaries:
        lines.append(f"| {s.method} | {s.lr:g} | {len(s.seeds)} | {s.val.format()} | "
                     + " | ".join(s.test[c].format() for c in cols)
                     + f" | {s.run_s.format(1)} | {s.spent_s:.1f} |")
    lines += ["", f"## Validation {ctx.metric} per LR (mean ± std over seeds; * = chosen)", "",
              "| method | " + " | ".join(f"{lr:g}" for lr in ctx.lrs) + " |", "|---|" + "---|" * len(ctx.lrs)]
    for method, ch in choices.items():
        cells = [(ch.by_lr[lr].format() + (" *" if lr == ch.lr else "")) if lr in ch.by_lr else "–" for lr in ctx.lrs]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if plots:
        lines += ["", "## Plots", "", *(f"![{p.path.stem}]({p.path.name})" for p in plots)]
    return "\n".join(lines) + "\n"


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.3em .6em;font-size:.92em}
td{text-align:right}td:first-child{text-align:left}.rule{background:#f4f6fa;border-left:4px solid #2b6cb0;
padding:.5em 1em}img{max-width:100%;display:block;margin:.8em 0}"""


def _md_inline(text: str) -> str:
    """``code`` and **bold** of the header lines, as HTML."""
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def page(ctx: Context, summaries: Sequence[MethodSummary], choices: dict[str, Choice],
         plots: Sequence[Plot] = ()) -> str:
    cols = _columns(summaries)
    head = "".join(f"<th>test {html.escape(c)}</th>" for c in cols)
    rows = "".join(
        f"<tr><td>{html.escape(s.method)}</td><td>{s.lr:g}</td><td>{len(s.seeds)}</td><td>{s.val.format()}</td>"
        + "".join(f"<td>{s.test[c].format()}</td>" for c in cols)
        + f"<td>{s.run_s.format(1)}</td><td>{s.spent_s:.1f}</td></tr>" for s in summaries)
    grid_head = "".join(f"<th>{lr:g}</th>" for lr in ctx.lrs)
    grid = "".join(
        f"<tr><td>{html.escape(m)}</td>" + "".join(
            f"<td>{'<b>' if lr == ch.lr else ''}{ch.by_lr[lr].format() if lr in ch.by_lr else '–'}"
            f"{'</b>' if lr == ch.lr else ''}</td>" for lr in ctx.lrs) + "</tr>" for m, ch in choices.items())
    images = "".join(f'<img src="{p.data_uri()}" alt="{html.escape(p.path.stem)}" '
                     f'title="{html.escape(p.path.name)}">' for p in plots)
    header = "".join(f"<p{' class=rule' if i == 1 else ''}>{_md_inline(x)}</p>" for i, x in enumerate(_header(ctx)))
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>percausal sweep</title>
<style>{_STYLE}</style></head><body>
<h1>Sweep: every method at its best learning rate</h1>{header}
<h2>Test split, at the LR chosen on validation</h2>
<table><tr><th>method</th><th>LR</th><th>seeds</th><th>val {html.escape(ctx.metric)}</th>{head}<th>run s</th>
<th>spent s</th></tr>{rows}</table>
<h2>Validation {html.escape(ctx.metric)} per LR (mean ± std over seeds; bold = chosen)</h2>
<table><tr><th>method</th>{grid_head}</tr>{grid}</table>
<h2>Plots</h2>{images or '<p>(no plots: the runs logged no eval lines)</p>'}
</body></html>
"""
