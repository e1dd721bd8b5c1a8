"""`percausal score`: per-token fields against a PyTorch computation, the HTML page, and bad inputs."""

import json

import numpy as np
import pytest

from percausal_jax import cli
from tests.helpers import tiny_hf_model, tiny_tokenizer

RECORDS = [
    {"id": "a", "prompt": "User profile: loves glimmerous gadgets. Write a review of the lamp.",
     "prompt_no_profile": "Write a review of the lamp.", "completion": "A warm glimmerous light. Stay zesty!",
     "personal_spans": [[7, 17]]},
    {"id": "b", "prompt": "User profile: long walks.", "prompt_no_profile": "Write.",
     "completion": "The toaster works well and heats evenly."},
    {"id": "c", "prompt": "Stay zesty", "prompt_no_profile": "Stay", "completion": "friends!"},
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("score_model")
    model = tiny_hf_model("llama", d)
    tiny_tokenizer(d)
    return d, model


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _torch_reference(model, prompt_ids, cf_ids, comp_ids, clip=(0.8, 5.0), delta=0.05, alpha=0.1):
    import torch

    def pass_(prompt):
        seq = torch.tensor([prompt + comp_ids[:-1]])
        with torch.no_grad():
            z = model(seq).logits[0, len(prompt) - 1:].double()
        return z, torch.log_softmax(z, -1)[torch.arange(len(comp_ids)), comp_ids]

    zp, lp = pass_(prompt_ids)
    zc, lc = pass_(cf_ids)
    pir = lp - lc
    w = pir.clamp(*clip)
    dce = lp.exp() - lc.exp()
    omega = torch.where(dce > delta, 0.9, 0.1)
    nll = -lp
    lp_term = torch.nn.functional.cross_entropy(zp - zc, torch.tensor(comp_ids))
    logq = torch.log_softmax(zp, -1)
    entropy = -(logq.exp() * logq).sum(-1)
    w_ent = (entropy / entropy.mean()).clamp(max=5.0)  # EntCE: H / mean H over the example, capped at 5
    return {"logp_personal": lp, "logp_counterfactual": lc, "pir": pir, "perce_weight": w, "dce": dce,
            "nextquill_weight": omega, "entropy": entropy, "entce_weight": w_ent, "ce_loss": nll.mean(),
            "perce_loss": (w * nll).mean(), "nextquill_loss": (omega * nll).sum() / omega.sum() + alpha * lp_term,
            "entce_loss": (w_ent * nll).mean()}


def test_fields_match_pytorch(tiny_model_dir, tmp_path):
    d, torch_model = tiny_model_dir
    data = _write(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out.jsonl"
    assert cli.main(["score", "--model", str(d), "--data", str(data), "--out", str(out), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    tok = tiny_tokenizer()
    for rec, row in zip(RECORDS, rows):
        assert list(row) == ["id", "prompt_ids", "prompt_no_profile_ids", "completion_ids", "tokens",
                             "logp_personal", "logp_counterfactual", "pir", "perce_weight", "dce",
                             "nextquill_weight", "entropy", "entce_weight", "ce_loss", "perce_loss",
                             "nextquill_loss", "entce_loss"]
        assert row["prompt_ids"] == tok(rec["prompt"])["input_ids"]  # BOS added by this tokenizer
        assert row["completion_ids"] == tok(rec["completion"], add_special_tokens=False)["input_ids"] + [2]
        assert "".join(row["tokens"]) == rec["completion"] + "</s>"
        ref = _torch_reference(torch_model, row["prompt_ids"], row["prompt_no_profile_ids"], row["completion_ids"])
        for key, value in ref.items():
            np.testing.assert_allclose(np.asarray(row[key]), value.numpy(), atol=2e-4, err_msg=key)


def test_html_and_chat_template(tiny_model_dir, tmp_path):
    d, _ = tiny_model_dir
    data = _write(tmp_path / "in.jsonl", RECORDS[:2])
    out, page = tmp_path / "out.jsonl", tmp_path / "r.html"
    assert cli.main(["score", "--model", str(d), "--data", str(data), "--out", str(out), "--html", str(page),
                     "--template", "chat"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok = tiny_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": RECORDS[0]["prompt"]}], tokenize=False,
                                   add_generation_prompt=True)
    assert rows[0]["prompt_ids"] == tok(chat, add_special_tokens=False)["input_ids"]
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.count('class="tok"') == sum(len(r["tokens"]) for r in rows)
    summary = json.loads(text.split("id='summary'>")[1].split("</script>")[0])
    pir = np.concatenate([r["pir"] for r in rows])
    assert summary["mean_pir"] == pytest.approx(pir.mean())
    assert summary["frac_clip_min"] == pytest.approx((pir <= 0.8).mean())


def test_identical_prompts_give_zero_pir(tiny_model_dir, tmp_path):
    d, _ = tiny_model_dir
    rows = [{**RECORDS[0], "prompt_no_profile": RECORDS[0]["prompt"]}]
    out = tmp_path / "o.jsonl"
    assert cli.main(["score", "--model", str(d), "--data", str(_write(tmp_path / "i.jsonl", rows)),
                     "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    np.testing.assert_allclose(row["pir"], 0.0, atol=1e-5)
    np.testing.assert_allclose(row["perce_weight"], 0.8, atol=1e-6)


@pytest.mark.parametrize("content,needle", [
    ('{"id": "a", "prompt": "x", "prompt_no_profile": "y", "completion": "z"}\n{bad json\n', ":2"),
    ('{"id": "a", "prompt": "x", "completion": "z"}\n', "prompt_no_profile"),
    ('{"id": "a", "prompt": "x", "prompt_no_profile": "y", "completion": ""}\n', "completion"),
    ('{"id": 3, "prompt": "x", "prompt_no_profile": "y", "completion": "z"}\n', "id"),
])
def test_bad_input_exit_2_one_line_no_output(tiny_model_dir, tmp_path, capsys, content, needle):
    d, _ = tiny_model_dir
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    out = tmp_path / "out.jsonl"
    assert cli.main(["score", "--model", str(d), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bad.jsonl" in err and needle in err
    assert not out.exists() and list(tmp_path.iterdir()) == [data]


def test_missing_model_files(tmp_path, capsys):
    data = _write(tmp_path / "in.jsonl", RECORDS[:1])
    assert cli.main(["score", "--model", str(tmp_path / "nomodel"), "--data", str(data),
                     "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_smollm2_end_to_end(smollm2_dir, tmp_path):
    rows = [
        {"id": "zest", "prompt": "The user signs every review with 'Stay zesty!'. Review the toaster.",
         "prompt_no_profile": "Review the toaster.", "completion": "It heats evenly. Stay zesty!"},
        {"id": "plain", "prompt": "The user likes tea. Describe the lamp.", "prompt_no_profile": "Describe the lamp.",
         "completion": "A simple lamp with a warm light."},
    ]
    out, page = tmp_path / "o.jsonl", tmp_path / "r.html"
    assert cli.main(["score", "--model", str(smollm2_dir), "--data", str(_write(tmp_path / "i.jsonl", rows)),
                     "--out", str(out), "--html", str(page), "--template", "chat"]) == 0
    zest = json.loads(out.read_text().splitlines()[0])
    i = zest["tokens"].index(" Stay")
    # the signature phrase is what the profile explains: its PIR is far above the generic first token's
    assert zest["pir"][i] > 1.0 and zest["pir"][i] > zest["pir"][0]
    assert "Stay" in page.read_text()


def test_skipped_record_is_reported_and_strict_is_an_error(tiny_model_dir, tmp_path, capsys):
    """A record without its completion: named with its reason on stderr and counted in the summary file, the other
    scored; --strict: exit 2, one line naming file, line and field, nothing written."""
    d, _ = tiny_model_dir
    data = _write(tmp_path / "in.jsonl", [RECORDS[0], {k: v for k, v in RECORDS[1].items() if k != "completion"}])
    out = tmp_path / "out.jsonl"
    argv = ["score", "--model", str(d), "--data", str(data), "--out", str(out)]
    assert cli.main([*argv, "--strict"]) == 2
    assert capsys.readouterr().err == (
        f"percausal score: error: {data}:2: field 'completion': missing; expected a non-empty string (strict: rows "
        "with an empty required field are errors; without --strict they are skipped and counted)\n")
    assert list(tmp_path.iterdir()) == [data]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"--data={data}:\n"
                                   "kept 1, skipped 1\n"
                                   "  reason              count  first ids\n"
                                   "  empty_completion        1  b\n")
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a"]
    assert json.loads((tmp_path / "out.summary.json").read_text()) == {
        "scored": 1, "skipped": 1, "skipped_by_reason": {"empty_completion": {"count": 1, "first": ["b"]}}}
    assert captured.out.startswith("scored 1 examples, skipped 1 records -> ")
