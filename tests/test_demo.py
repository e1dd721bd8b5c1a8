"""The main job (`make demo` → `percausal demo`) at reduced size, and README ↔ Makefile / CLI consistency."""

import json
import re
from pathlib import Path

import pytest

from percausal_jax import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pipeline_end_to_end(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "demo_out"
    assert cli.main(["demo", "--out", str(out), "--users", "4", "--steps", "2", "--eval-limit", "2",
                     "--max-new-tokens", "8", "--score-limit", "2"]) == 0
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for needle in ("CE vs PerCE", "<svg", "class=\"tok\"", ">ce<", ">perce<", "rouge1"):
        assert needle in page, needle
    for method in ("ce", "perce", "perce_contrast"):
        m = json.loads((out / "eval" / f"{method}.metrics.json").read_text())
        assert m["n"] == 2 and 0.0 <= m["rouge1"] <= 1.0 and "span_recall" in m
    assert "perce + contrast β=1" in page  # the report's contrastive-decoding row
    assert page.count('<img src="data:image/png;base64,') == 2  # eval NLL vs step, test metrics as bars
    assert (out / "nll_curves.png").read_bytes().startswith(b"\x89PNG") and (out / "test_metrics.png").exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out / "export" / "perce")) is not None
    summary = capsys.readouterr().out
    assert "report:" in summary and "perce" in summary


def test_readme_commands_exist():
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.M))
    used = set(re.findall(r"^make (\w+)", readme, flags=re.M)) | set(re.findall(r"`make (\w+)`", readme))
    assert {"demo", "test"} <= used and used <= targets, used - targets
    subcommands = set(re.findall(r"^\s*percausal ([a-z-]+)", readme, flags=re.M))
    assert subcommands and subcommands <= set(cli.SUBCOMMANDS), subcommands - set(cli.SUBCOMMANDS)
    assert "make test" in (REPO / ".ci" / "run").read_text()
