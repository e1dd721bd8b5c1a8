"""The HTML reports in a real headless Chromium: the page renders (a screenshot that is not blank, with the plots'
method colours in it) and every embedded PNG loads (an injected script writes each image's natural size into the
DOM, read back with --dump-dom). Skips, saying why, where Chromium is not installed (scripts/install_chromium.sh,
run by `make test`)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from percausal_jax.evaluation import plots
from percausal_jax.evaluation.report import write_report
from percausal_jax.evaluation.stats import summarize
from percausal_jax.sweep import report
from percausal_jax.sweep.results import Choice, MethodSummary

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (bash scripts/install_chromium.sh)")

PROBE = """<script>window.addEventListener('load',()=>{const o=document.createElement('pre');o.id='imgcheck';
o.textContent=[...document.images].map(i=>i.complete+':'+i.naturalWidth+'x'+i.naturalHeight).join(';');
document.body.appendChild(o);});</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


def check_in_browser(page: Path, n_images: int, colours: list[str], tmp_path: Path) -> None:
    probe = page.with_name(page.stem + "_probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.resolve().as_uri())
    found = re.search(r'<pre id="imgcheck">(.*?)</pre>', dom.stdout)
    assert found, (dom.stdout[-500:], dom.stderr[-2000:])
    images = [x.split(":") for x in found.group(1).split(";") if x]
    assert len(images) == n_images, images
    for complete, size in images:
        w, h = map(int, size.split("x"))
        assert complete == "true" and w > 300 and h > 200, images  # decoded: a broken image has naturalWidth 0

    import numpy as np
    from PIL import Image

    shot = tmp_path / f"{page.stem}.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars",
              page.resolve().as_uri())
    assert shot.exists()
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2000)
    pixels = np.asarray(img).reshape(-1, 3).astype(int)
    distinct = len(np.unique(pixels, axis=0))
    assert distinct > 200, distinct  # text, tables and plots: not a blank page
    for c in colours:  # a method's colour drawn by matplotlib shows on the rendered page
        rgb = np.array([int(c[i:i + 2], 16) for i in (1, 3, 5)])
        assert int((np.abs(pixels - rgb).max(axis=1) <= 6).sum()) > 50, c


def _runs():
    return {"ce": [[{"step": s, "eval_nll": 2.0, "eval_nll_personal": 3 - 0.1 * s + 0.05 * k,
                     "eval_nll_generic": 2 - 0.05 * s} for s in (2, 4, 6)] for k in range(3)],
            "perce": [[{"step": s, "eval_nll": 2.1, "eval_nll_personal": 3 - 0.15 * s,
                        "eval_nll_generic": 2.1 - 0.03 * s + 0.02 * k} for s in (2, 4, 6)] for k in range(3)]}


def test_sweep_report_in_chromium(tmp_path):
    test = {"ce": {"nll_personal": summarize([2.1, 2.2, 2.0]), "nll_generic": summarize([1.6, 1.7, 1.65]),
                   "rougeL": summarize([0.3, 0.32, 0.31])},
            "perce": {"nll_personal": summarize([1.9, 2.0, 1.95]), "nll_generic": summarize([1.8, 1.85, 1.9]),
                      "rougeL": summarize([0.29, 0.3, 0.33])}}
    drawn = [plots.nll_curves(_runs(), tmp_path / "nll_curves.png"),
             plots.metric_bars(test, ("nll_personal", "nll_generic", "rougeL"), tmp_path / "test_metrics.png"),
             plots.tradeoff(test, tmp_path / "tradeoff.png")]
    summaries = [MethodSummary(m, 1e-3, (0, 1, 2), summarize([0.3, 0.31, 0.32]), test[m], summarize([10, 11, 12]),
                               99.0) for m in test]
    choices = {m: Choice(m, 1e-3, {1e-3: summarize([0.3, 0.31, 0.32]), 1e-4: summarize([0.2, 0.2, 0.25])})
               for m in test}
    ctx = report.Context("mean over seeds 0, 1, 2 of validation rougeL (higher is better)", "rougeL", (0, 1, 2),
                         (1e-4, 1e-3), "configs/demo.py", "train.jsonl", "val.jsonl", "test.jsonl")
    page = tmp_path / "sweep.html"
    page.write_text(report.page(ctx, summaries, choices, drawn))
    check_in_browser(page, 3, [plots.COLOURS["ce"], plots.COLOURS["perce"]], tmp_path)


def test_demo_report_in_chromium(tmp_path):
    runs = {m: rows[0] for m, rows in _runs().items()}
    train = {m: [{**r, "loss": 3.0, "nll_mean": 3.0} for r in rows] for m, rows in runs.items()}
    results = {"ce": {"rouge1": 0.4, "rougeL": 0.3, "span_recall": 0.8, "nll_personal": 2.1, "nll_generic": 1.6},
               "perce": {"rouge1": 0.41, "rougeL": 0.29, "span_recall": 0.9, "nll_personal": 1.9, "nll_generic": 1.8}}
    curves = plots.nll_curves({m: [rows] for m, rows in runs.items()}, tmp_path / "nll_curves.png")
    bars = plots.metric_bars({m: {k: summarize([v]) for k, v in r.items()} for m, r in results.items()},
                             ("nll_personal", "nll_generic", "rouge1", "rougeL", "span_recall"),
                             tmp_path / "test_metrics.png")
    preds = {m: [{"prompt": "p", "reference": "a warm lamp", "prediction": "a lamp"}] for m in results}
    page = write_report(tmp_path / "report.html", results=results, train_metrics=train, preds=preds, scored=[],
                        plots=[curves, bars])
    check_in_browser(Path(str(page)), 2, [plots.COLOURS["ce"], plots.COLOURS["perce"]], tmp_path)
