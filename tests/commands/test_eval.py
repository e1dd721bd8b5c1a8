"""`percausal eval`: predictions and metrics files, for a model directory and for a training run."""

import hashlib
import json

import pytest

from percausal_jax import cli
from tests.helpers import tiny_hf_model, tiny_tokenizer
from tests.training.common import RECORDS, train_args

NLL_KEYS = ("nll_personal", "nll_generic", "tokens_personal", "tokens_generic")
STRICT = "(strict: rows with an empty required field are errors; without --strict they are skipped and counted)\n"


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    tiny_hf_model("llama", d / "model")
    tiny_tokenizer(d / "model")
    rows = [{**r, "personal_spans": [[0, 3]]} for r in RECORDS]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "model", d / "data.jsonl"


def test_eval_model_dir_writes_predictions_and_metrics(model_and_data, tmp_path, capsys):
    model, data = model_and_data
    out = tmp_path / "preds.jsonl"
    assert cli.main(["eval", "--model", str(model), "--data", str(data), "--out", str(out), "--template", "none",
                     "--max-new-tokens", "6", "--batch-size", "3", "--no-progress", "--task", "product_review"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in RECORDS]  # every record, in order, none dropped
    assert all(set(r) == {"id", "task", "prompt", "prediction", "reference"} for r in rows)
    assert rows[0]["reference"] == RECORDS[0]["completion"] and rows[0]["prompt"] == RECORDS[0]["prompt"]
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["n"] == 4 and {"rouge1", "rougeL", "meteor", "span_recall"} <= set(metrics)
    # the records carry personal_spans: teacher-forced NLL split into personal / generic tokens
    assert set(NLL_KEYS) <= set(metrics) and metrics["tokens_personal"] > 0 and metrics["tokens_generic"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == metrics


def test_eval_workdir_uses_the_trained_checkpoint(model_and_data, tmp_path, capsys):
    model, data = model_and_data
    work = tmp_path / "run"
    assert cli.main(train_args(model, data, work, "ce", steps=2)) == 0
    out = tmp_path / "p.jsonl"
    assert cli.main(["eval", "--workdir", str(work), "--data", str(data), "--out", str(out), "--no-meteor",
                     "--max-new-tokens", "4", "--no-progress", "--metrics", str(tmp_path / "m.json"),
                     "--task", "LaMP-4"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"rouge1", "rougeL", "n", "skipped", "skipped_by_reason", "predictions_sha256",
                            *NLL_KEYS} and metrics["n"] == 4
    assert metrics["predictions_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()  # the pair belongs together
    assert metrics["skipped"] == 0 and metrics["skipped_by_reason"] == {}
    # the same trained model on the same records: the train loop's last eval line has the same split
    last = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
    for key in NLL_KEYS:
        assert last[f"eval_{key}"] == pytest.approx(metrics[key], rel=1e-4)
    assert last["eval_tokens_personal"] + last["eval_tokens_generic"] == last["eval_tokens"]
    # the run's data.strict (here an override) applies to the evaluated records: an empty output is an error
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**RECORDS[0], "completion": " "}) + "\n" + json.dumps(RECORDS[1]) + "\n")
    assert cli.main(["eval", "--workdir", str(work), "--data", str(bad), "--out", str(tmp_path / "b.jsonl"),
                     "--config.data.strict=true"]) == 2
    assert capsys.readouterr().err.endswith(f"error: {bad}:1: field 'completion': expected a non-empty string, got "
                                            "string ' ' " + STRICT)
    assert not (tmp_path / "b.jsonl").exists()


def test_eval_bad_data_is_exit_2(model_and_data, tmp_path, capsys):
    model, _ = model_and_data
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "prompt": "a"}\n')
    assert cli.main(["eval", "--model", str(model), "--data", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()


def test_config_override_with_model_is_an_error(tmp_path, capsys):
    from percausal_jax import cli

    rc = cli.main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl"), "--out",
                   str(tmp_path / "o.jsonl"), "--config.train.steps=3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "--config.train.steps=3" in err and "--workdir" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_skipped_record_is_reported_and_strict_is_an_error(model_and_data, tmp_path, capsys):
    """A record with an empty completion: named with its reason on stderr and counted in the metrics, the others
    evaluated; --strict: exit 2, one line naming file, line and field, nothing written."""
    model, _ = model_and_data
    data = tmp_path / "data.jsonl"
    rows = [RECORDS[0], {**RECORDS[1], "completion": ""}, *RECORDS[2:]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "preds.jsonl"
    argv = ["eval", "--model", str(model), "--data", str(data), "--out", str(out), "--template", "none",
            "--max-new-tokens", "6", "--batch-size", "3", "--no-progress", "--task", "product_review", "--no-meteor"]
    assert cli.main([*argv, "--strict"]) == 2
    assert capsys.readouterr().err == (
        f"percausal eval: error: {data}:2: field 'completion': expected a non-empty string, got string '' " + STRICT)
    assert list(tmp_path.iterdir()) == [data]
    assert cli.main(argv) == 0
    assert capsys.readouterr().err.startswith(f"--data={data}:\n"
                                              "kept 3, skipped 1\n"
                                              "  reason              count  first ids\n"
                                              "  empty_completion        1  r1\n")
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["r0", "r2", "r3"]
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["skipped"] == 1
    assert metrics["skipped_by_reason"] == {"empty_completion": {"count": 1, "first": ["r1"]}}


def test_metrics_are_written_last_and_an_old_pair_never_passes_for_a_new_one(tmp_path, monkeypatch):
    """A failure between the two writes leaves the new predictions and no metrics (not the previous eval's)."""
    from percausal_jax import atomic
    from percausal_jax.evaluation import run as eval_cmd

    out, metrics = tmp_path / "p.jsonl", tmp_path / "p.metrics.json"
    eval_cmd.write_pair(out, None, [{"id": "a", "prediction": "x"}], {"n": 1})
    assert json.loads(metrics.read_text())["predictions_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    real = atomic.write_text

    def fail_on_metrics(path, text):
        if str(path).endswith(".metrics.json"):
            raise OSError(28, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(atomic, "write_text", fail_on_metrics)
    with pytest.raises(OSError):
        eval_cmd.write_pair(out, None, [{"id": "b", "prediction": "y"}], {"n": 1})
    assert json.loads(out.read_text())["id"] == "b" and not metrics.exists()
