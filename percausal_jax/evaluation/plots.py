"""PNG plots of the reports (matplotlib, Agg backend: headless, byte-for-byte the same file for the same input):

* :func:`nll_curves`: teacher-forced eval NLL of personal and of generic tokens vs training step, one line per
  method with a mean ± std band over its seeds (from each run's metrics.jsonl eval lines; the overall ``eval_nll``
  when no run splits it);
* :func:`metric_bars`: final metrics as bars with ± std error bars, one panel per metric;
* :func:`tradeoff`: personal- vs generic-token NLL, one point per method (± std both ways);
* :func:`comparison`: the set a report comparing methods shows (``percausal demo``'s and ``percausal sweep``'s).

Each PNG carries a ``Series`` text chunk (JSON: panel title → series labels), so a reader (or a test) can tell what
was drawn without decoding pixels. Both return a :class:`Plot`, or None when there is nothing to draw."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

from percausal_jax.evaluation.stats import Stat, summarize

COLOURS = {"ce": "#2b6cb0", "perce": "#c53030", "nextquill": "#2f855a", "lossce": "#805ad5", "entce": "#b7791f"}
_EXTRA = ("#dd6b20", "#319795", "#d53f8c", "#4a5568", "#975a16", "#2c5282", "#9b2c2c", "#276749")
CURVE_KEYS = (("eval_nll_personal", "personal tokens"), ("eval_nll_generic", "generic tokens"))


@dataclasses.dataclass(frozen=True)
class Series:
    label: str
    steps: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]  # 0 where a step has one seed


@dataclasses.dataclass(frozen=True)
class Plot:
    path: Path
    png: bytes
    panels: dict[str, tuple[str, ...]]  # panel title -> series labels, in drawing order

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def colour(label: str, i: int) -> str:
    """A method's colour: the objective's own for a plain objective (``perce``), otherwise one from a fixed list by
    the method's position ``i`` (``perce[clip_max=2]``)."""
    return COLOURS.get(label, _EXTRA[i % len(_EXTRA)])


def curve(runs: Sequence[Sequence[dict]], key: str) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """``key`` vs step over seeds: the steps every run evaluated at, the mean and the sample std there."""
    per_run = [{int(r["step"]): float(r[key]) for r in rows if isinstance(r.get(key), (int, float))} for rows in runs]
    per_run = [p for p in per_run if p]
    if not per_run:
        return (), (), ()
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    stats = [summarize(p[s] for p in per_run) for s in steps]
    return tuple(steps), tuple(s.mean for s in stats), tuple(s.std or 0.0 for s in stats)


def nll_curves(runs: Mapping[str, Sequence[Sequence[dict]]], out: str | Path, title: str = "") -> Plot | None:
    """``runs``: method → one metrics.jsonl row list per seed. One panel per token kind present."""
    panels = [(k, name) for k, name in CURVE_KEYS if any(r.get(k) is not None for rs in runs.values()
                                                         for rows in rs for r in rows)]
    if not panels:
        panels = [("eval_nll", "all tokens")]
    series = {name: [Series(m, *curve(rs, key)) for m, rs in runs.items()] for key, name in panels}
    series = {name: [s for s in ss if s.steps] for name, ss in series.items()}
    series = {name: ss for name, ss in series.items() if ss}
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 3.6), squeeze=False)
    labels = list(runs)
    for ax, (name, ss) in zip(axes[0], series.items()):
        for s in ss:
            c = colour(s.label, labels.index(s.label))
            ax.plot(s.steps, s.mean, color=c, lw=2, marker="o" if len(s.steps) < 12 else None, ms=3, label=s.label)
            lo = [m - d for m, d in zip(s.mean, s.std)]
            hi = [m + d for m, d in zip(s.mean, s.std)]
            ax.fill_between(s.steps, lo, hi, color=c, alpha=0.18, lw=0)
        ax.set_title(f"eval NLL, {name}", fontsize=11)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out, {f"eval NLL, {name}": tuple(s.label for s in ss) for name, ss in series.items()})


def metric_bars(stats: Mapping[str, Mapping[str, Stat]], metrics: Sequence[str], out: str | Path,
                title: str = "") -> Plot | None:
    """``stats``: method → metric → mean ± std over seeds. One panel per metric that some method has."""
    metrics = [k for k in metrics if any(k in s and s[k].n > 0 for s in stats.values())]
    if not metrics:
        return None
    plt = _pyplot()
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    labels = list(stats)
    panels = {}
    for i, ax in enumerate(axes.flat):
        if i >= len(metrics):
            ax.axis("off")
            continue
        key = metrics[i]
        shown = [m for m in labels if key in stats[m] and stats[m][key].n > 0]
        means = [stats[m][key].mean for m in shown]
        errs = [stats[m][key].std or 0.0 for m in shown]
        ax.bar(range(len(shown)), means, yerr=errs, capsize=4, color=[colour(m, labels.index(m)) for m in shown])
        ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=8)
        lower = key.startswith("nll")
        ax.set_title(f"{key} ({'lower' if lower else 'higher'} is better)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        panels[key] = tuple(shown)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out, panels)


def tradeoff(stats: Mapping[str, Mapping[str, Stat]], out: str | Path, x: str = "nll_generic",
             y: str = "nll_personal", title: str = "") -> Plot | None:
    """Personal vs generic test NLL, one point per method (± std both ways): where each method, and each knob
    setting of one method (``perce[clip_max=2]``, ``perce[clip_max=5]``), sits on the trade-off."""
    shown = [m for m, s in stats.items() if x in s and y in s and s[x].n > 0 and s[y].n > 0]
    if not shown:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    labels = list(stats)
    for m in shown:
        sx, sy = stats[m][x], stats[m][y]
        c = colour(m, labels.index(m))
        ax.errorbar([sx.mean], [sy.mean], xerr=[sx.std or 0.0], yerr=[sy.std or 0.0], fmt="o", color=c, capsize=3,
                    label=m)
        ax.annotate(m, (sx.mean, sy.mean), textcoords="offset points", xytext=(5, 5), fontsize=8, color=c)
    ax.set_xlabel(f"test {x} (nats / token, lower is better)")
    ax.set_ylabel(f"test {y} (nats / token, lower is better)")
    ax.set_title(title or "personal vs generic tokens (each method at its chosen LR)", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, out, {f"{y} vs {x}": tuple(shown)})


def comparison(out_dir, runs: Mapping[str, Sequence[Sequence[dict]]], stats: Mapping[str, Mapping[str, Stat]],
               metrics: Sequence[str], curves_title: str, bars_title: str, with_tradeoff: bool = True) -> list[Plot]:
    """The PNGs next to a report comparing methods, in ``out_dir``: ``nll_curves.png`` (``runs``: method → one
    metrics.jsonl row list per seed), ``test_metrics.png`` (``stats``: method → metric → mean ± std over seeds) and,
    with ``with_tradeoff``, ``tradeoff.png``. Those with nothing to draw are left out."""
    drawn = [nll_curves(runs, out_dir / "nll_curves.png", curves_title),
             metric_bars(stats, metrics, out_dir / "test_metrics.png", bars_title)]
    if with_tradeoff:
        drawn.append(tradeoff(stats, out_dir / "tradeoff.png"))
    return [p for p in drawn if p is not None]


def single_runs(results: Mapping[str, Mapping], metrics: Sequence[str]) -> dict[str, dict[str, Stat]]:
    """``results`` (method → one run's metrics) as the statistics :func:`metric_bars` draws (n = 1: no error
    bars)."""
    return {name: {k: summarize([r[k]]) for k in metrics if isinstance(r.get(k), (int, float))}
            for name, r in results.items()}


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path, panels: dict[str, tuple[str, ...]]) -> Plot:
    from percausal_jax.atomic import write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": "percausal_jax (matplotlib Agg)",
                                                      "Series": json.dumps(panels)})
    import matplotlib.pyplot as plt

    plt.close(fig)
    png = buf.getvalue()
    write_bytes(out, png)
    return Plot(Path(str(out)), png, panels)


def read_series(png: bytes) -> dict[str, list[str]]:
    """The ``Series`` chunk of a PNG written here (panel title → series labels)."""
    import struct

    pos = 8
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        data = png[pos + 8:pos + 8 + length]
        if kind == b"tEXt" and data.startswith(b"Series\0"):
            return json.loads(data[len(b"Series\0"):].decode("latin-1"))
        pos += 12 + length
    return {}
