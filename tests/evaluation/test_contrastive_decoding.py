"""Profile-contrastive decoding (`generate(..., contrast=β)`, `--contrast` of generate / eval / score) against a
literal PyTorch reference: transformers models, two full forwards per step (no cache), the formula written out.

Every compiled shape costs seconds on CPU: the tests share prompts, ``N`` and ``eos_ids`` so that most of them reuse
one program per family (β, α, the repetition penalty and the seed are traced).
"""

import html
import json
import math

import jax
import numpy as np
import pytest

import percausal_jax as pj
from percausal_jax import cli
from percausal_jax.errors import UserError
from percausal_jax.evaluation.contrast import contrast_logits
from percausal_jax.evaluation.generate import generate
from tests.helpers import tiny_hf_model, tiny_tokenizer
from tests.training.common import RECORDS

FAMILIES = {
    "llama": ("llama", {}),
    "gemma2_softcap": ("gemma2", {"sliding_window": 5, "final_logit_softcapping": 2.0}),  # mask after the cap
}
N = 8  # new tokens
PERSONAL_LENGTHS = (9, 4, 7)
NO_PROFILE_LENGTHS = (5, 6, 3)  # row 1: the profile-free prompt is the longer one


def _prompts(seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Personalized prompts (a random "profile" then the query) and profile-free ones (the query alone, or for row 1
    another random prompt longer than the personalized one)."""
    rs = np.random.RandomState(seed)
    personal, no_profile = [], []
    for i, (n_h, n_0) in enumerate(zip(PERSONAL_LENGTHS, NO_PROFILE_LENGTHS)):
        if n_0 < n_h:
            query = rs.randint(3, 256, n_0).tolist()
            personal.append(rs.randint(3, 256, n_h - n_0).tolist() + query)
            no_profile.append(query)
        else:
            personal.append(rs.randint(3, 256, n_h).tolist())
            no_profile.append(rs.randint(3, 256, n_0).tolist())
    return personal, no_profile


def torch_contrastive(model, prompt, no_profile, n, beta, alpha, eos=(), penalty=1.0) -> list[int]:
    """The reference, one row alone: per step two full forwards (with and without profile), then
    z = z_h + β(z_h − z_0), tokens with p_h < α·max p_h at −inf, HF's repetition penalty on z, argmax."""
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            z_h = model(torch.tensor([prompt + out])).logits[0, -1].float()
            z_0 = model(torch.tensor([no_profile + out])).logits[0, -1].float()
            p_h = torch.softmax(z_h, dim=-1)
            z = z_h + beta * (z_h - z_0)
            z = torch.where(p_h < alpha * p_h.max(), torch.tensor(float("-inf")), z)
            if penalty != 1.0:
                z = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + out]), z[None])[0]
            out.append(int(torch.argmax(z)))
            if out[-1] in eos:
                break
    return out


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(our model, the transformers model) with the same random weights."""
    model_type, overrides = FAMILIES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    torch_model = tiny_hf_model(model_type, d, **overrides)
    return pj.load_pretrained(d), torch_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_contrast")
    torch_model = tiny_hf_model("llama", d)
    return pj.load_pretrained(d), torch_model


# ------------------------------------------------------------------------------------------------ the logits


def test_contrast_logits_is_the_formula_with_the_plausibility_mask():
    rs = np.random.RandomState(0)
    z_h, z_0 = (rs.randn(3, 50) * 3).astype(np.float32), (rs.randn(3, 50) * 3).astype(np.float32)
    for beta, alpha in [(0.5, 0.1), (2.0, 0.0), (1.0, 1.0), (0.0, 0.3)]:
        got = np.asarray(jax.jit(contrast_logits)(z_h, z_0, beta, alpha))
        p_h = np.exp(z_h - z_h.max(-1, keepdims=True))
        p_h /= p_h.sum(-1, keepdims=True)
        keep = p_h >= alpha * p_h.max(-1, keepdims=True)
        np.testing.assert_array_equal(np.isfinite(got), keep)
        np.testing.assert_allclose(got[keep], (z_h + beta * (z_h - z_0))[keep], rtol=1e-6, atol=1e-6)
        if alpha == 0:
            assert keep.all()
        if alpha == 1:  # only the personalized argmax survives
            np.testing.assert_array_equal(keep.sum(-1), 1)
            np.testing.assert_array_equal(got.argmax(-1), z_h.argmax(-1))


# ------------------------------------------------------------------------------------------------ decoding


def test_beta_zero_is_plain_decoding_bit_for_bit(llama):
    ours, _ = llama
    personal, no_profile = _prompts()
    for kw in ({}, {"repetition_penalty": 1.3}, {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 5}):
        plain = generate(ours, personal, N, **kw)
        assert generate(ours, personal, N, prompts_no_profile=no_profile, contrast=0.0, plausibility=0.5, **kw) \
            == plain, kw


@pytest.mark.parametrize("beta,alpha", [(0.5, 0.1), (1.0, 0.1), (3.0, 0.5)])
def test_greedy_equals_torch_reference(family, beta, alpha):
    """Batched rows of different lengths (personalized and profile-free prompts of different lengths, one row with
    the profile-free prompt longer) against the per-row reference; contrast really changes the tokens."""
    ours, torch_model = family
    personal, no_profile = _prompts()
    got = generate(ours, personal, N, prompts_no_profile=no_profile, contrast=beta, plausibility=alpha)
    ref = [torch_contrastive(torch_model, p, q, N, beta, alpha) for p, q in zip(personal, no_profile)]
    assert got == ref
    assert got != generate(ours, personal, N)


def test_repetition_penalty_and_plausibility_equal_torch_reference(llama):
    """Several (β, α, penalty) in one compiled program; at β = 3 the plausibility mask decides some tokens (the
    contrasted argmax is implausible under p_h), so α = 0.5 and α = 0 differ."""
    ours, torch_model = llama
    personal, no_profile = _prompts()
    got = {}
    for beta, alpha, penalty in [(1.0, 0.0, 1.3), (1.0, 0.3, 1.0), (3.0, 0.0, 1.0), (3.0, 0.5, 1.0),
                                 (3.0, 0.5, 1.3)]:
        got[beta, alpha, penalty] = generate(ours, personal, N, prompts_no_profile=no_profile, contrast=beta,
                                             plausibility=alpha, repetition_penalty=penalty)
        ref = [torch_contrastive(torch_model, p, q, N, beta, alpha, penalty=penalty)
               for p, q in zip(personal, no_profile)]
        assert got[beta, alpha, penalty] == ref, (beta, alpha, penalty)
    assert got[3.0, 0.0, 1.0] != got[3.0, 0.5, 1.0]
    assert got[3.0, 0.5, 1.0] != got[3.0, 0.5, 1.3]


def test_eos_stops_each_row(llama):
    """An EOS taken from the reference ends one row early; the other rows go on (and are cut after their EOS)."""
    ours, torch_model = llama
    personal, no_profile = _prompts()
    full = [torch_contrastive(torch_model, p, q, N, 1.0, 0.1) for p, q in zip(personal, no_profile)]
    eos = full[1][2]
    ref = [row[:row.index(eos) + 1] if eos in row else row for row in full]
    assert len(ref[1]) <= 3 and max(map(len, ref)) == N
    assert generate(ours, personal, N, prompts_no_profile=no_profile, contrast=1.0, eos_ids=[eos]) == ref


def test_batched_rows_equal_one_row_at_a_time(llama):
    ours, _ = llama
    personal, no_profile = _prompts()
    batched = generate(ours, personal, N, prompts_no_profile=no_profile, contrast=1.0)
    alone = [generate(ours, [p], N, prompts_no_profile=[q], contrast=1.0)[0] for p, q in zip(personal, no_profile)]
    assert batched == alone


def test_plausibility_one_leaves_only_the_plain_greedy_token(llama):
    """α = 1: only the personalized argmax is eligible, so greedy and sampled contrastive decoding at any β give
    plain greedy decoding (the mask is applied before temperature and sampling)."""
    ours, _ = llama
    personal, no_profile = _prompts()
    plain = generate(ours, personal, N)
    assert generate(ours, personal, N, prompts_no_profile=no_profile, contrast=2.0, plausibility=1.0) == plain
    assert generate(ours, personal, N, prompts_no_profile=no_profile, contrast=2.0, plausibility=1.0,
                    temperature=1.5, seed=3) == plain


@pytest.mark.parametrize("kw,needle", [
    ({"contrast": -0.5}, "contrast=-0.5"), ({"contrast": math.nan}, "contrast=nan"),
    ({"contrast": math.inf}, "contrast=inf"), ({"contrast": 1.0, "plausibility": 1.5}, "plausibility=1.5"),
    ({"contrast": 1.0, "plausibility": -0.1}, "plausibility=-0.1"),
])
def test_bad_settings_raise(llama, kw, needle):
    ours, _ = llama
    personal, no_profile = _prompts()
    with pytest.raises(UserError, match=needle):
        generate(ours, personal, N, prompts_no_profile=no_profile, **kw)


def test_contrast_needs_one_profile_free_prompt_per_row(llama):
    ours, _ = llama
    personal, no_profile = _prompts()
    for bad in (None, no_profile[:2], [no_profile[0], [], no_profile[2]]):
        with pytest.raises(ValueError, match="profile-free prompt"):
            generate(ours, personal, N, prompts_no_profile=bad, contrast=1.0)


# ------------------------------------------------------------------------------------------------ the commands

CANONICAL = {"id": "c1", "user_id": "u1", "task": "LaMP-7", "input": "Write: the lamp works well",
             "output": "The lamp works well.",
             "profile": [{"id": "p1", "text": "Stay zesty!", "date": "2020-01-01"},
                         {"id": "p2", "text": "A warm light.", "date": "2020-01-02"}]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny llama + tokenizer directory, prompt records and one canonical record."""
    d = tmp_path_factory.mktemp("contrast_cli")
    torch_model = tiny_hf_model("llama", d / "model")
    tiny_tokenizer(d / "model")
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (d / "canonical.jsonl").write_text(json.dumps(CANONICAL) + "\n")
    return d, torch_model


def _eval(d, data, out, *extra) -> list[str]:
    assert cli.main(["eval", "--model", str(d / "model"), "--data", str(data), "--out", str(out), "--template",
                     "none", "--max-new-tokens", "6", "--batch-size", "4", "--no-progress", "--no-meteor",
                     "--task", "LaMP-7", *extra]) == 0
    return [json.loads(line)["prediction"] for line in out.read_text().splitlines()]


def _reference_text(tok, torch_model, prompt: str, no_profile: str, beta: float, alpha: float) -> str:
    ids = torch_contrastive(torch_model, tok(prompt)["input_ids"], tok(no_profile)["input_ids"], 6, beta, alpha,
                            eos=(tok.eos_token_id,))
    return tok.decode(ids, skip_special_tokens=True).strip()


def test_eval_contrast_on_prompt_records_equals_torch_reference(workdir, tmp_path):
    d, torch_model = workdir
    tok = tiny_tokenizer()
    plain = _eval(d, d / "prompts.jsonl", tmp_path / "plain.jsonl")
    assert _eval(d, d / "prompts.jsonl", tmp_path / "zero.jsonl", "--contrast", "0") == plain
    got = _eval(d, d / "prompts.jsonl", tmp_path / "c.jsonl", "--contrast", "1.0", "--plausibility", "0.05")
    assert got == [_reference_text(tok, torch_model, r["prompt"], r["prompt_no_profile"], 1.0, 0.05)
                   for r in RECORDS]
    assert got != plain
    metrics = json.loads((tmp_path / "c.metrics.json").read_text())
    assert metrics["n"] == len(RECORDS)


def test_eval_contrast_on_canonical_records_uses_the_prompt_without_profile(workdir, tmp_path):
    """A canonical record's profile-free prompt is the one the featurizer builds for training's counterfactual pass:
    the task input alone (counterfactual mode "drop"), with the separator."""
    from percausal_jax.data.featurize import FeaturizeConfig, Featurizer

    d, torch_model = workdir
    tok = tiny_tokenizer()
    texts = Featurizer(tok, FeaturizeConfig(template="none")).texts(CANONICAL)
    assert "Stay zesty!" in texts.prompt
    (got,) = _eval(d, d / "canonical.jsonl", tmp_path / "c.jsonl", "--contrast", "2.0")
    assert got == _reference_text(tok, torch_model, texts.prompt, CANONICAL["input"] + "\n", 2.0, 0.1)


def test_generate_command_contrast_equals_torch_reference(workdir, capsys):
    d, torch_model = workdir
    tok = tiny_tokenizer()
    rec = RECORDS[0]
    argv = ["generate", "--model", str(d / "model"), "--template", "none", "--prompt", rec["prompt"],
            "--max-new-tokens", "6"]
    assert cli.main(argv + ["--prompt-no-profile", rec["prompt_no_profile"], "--contrast", "1.5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "completion: " + _reference_text(tok, torch_model, rec["prompt"], rec["prompt_no_profile"],
                                                       1.5, 0.1)


@pytest.mark.parametrize("command", ["eval", "generate", "score"])
@pytest.mark.parametrize("flags,needle", [
    (["--contrast", "-1"], "--contrast=-1.0"), (["--contrast", "nan"], "--contrast=nan"),
    (["--contrast", "inf"], "--contrast=inf"), (["--contrast", "1", "--plausibility", "1.5"], "--plausibility=1.5"),
    (["--plausibility", "-0.1"], "--plausibility=-0.1"),
])
def test_bad_flags_exit_2_with_one_line(workdir, tmp_path, capsys, command, flags, needle):
    d, _ = workdir
    out = tmp_path / "o.jsonl"
    argv = {"eval": ["eval", "--model", str(d / "model"), "--data", str(d / "prompts.jsonl"), "--out", str(out)],
            "generate": ["generate", "--model", str(d / "model"), "--prompt", "x", "--prompt-no-profile", "y"],
            "score": ["score", "--model", str(d / "model"), "--data", str(d / "prompts.jsonl"), "--out", str(out)]}
    assert cli.main(argv[command] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"percausal {command}: error: {needle}:")
    assert not out.exists()


def test_generate_contrast_without_prompt_no_profile_is_exit_2(workdir, capsys):
    d, _ = workdir
    assert cli.main(["generate", "--model", str(d / "model"), "--prompt", "x", "--contrast", "1"]) == 2
    assert "--prompt-no-profile" in capsys.readouterr().err


def test_score_html_marks_the_steps_contrast_changes(workdir, tmp_path):
    """Teacher-forced on the gold completion: per token the argmax of z_h and of the contrasted logits, against
    PyTorch; the heatmap marks exactly the tokens where they differ (β = 3, α = 0 makes several differ)."""
    import torch

    d, torch_model = workdir
    tok = tiny_tokenizer()
    rows = [{"id": r["id"], "prompt": r["prompt"], "prompt_no_profile": r["prompt_no_profile"],
             "completion": r["completion"]} for r in RECORDS[:2]]
    data, out, page = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "r.html"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["score", "--model", str(d / "model"), "--data", str(data), "--out", str(out), "--html",
                     str(page), "--contrast", "3", "--plausibility", "0"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    changed = 0
    for row, rec in zip(scored, rows):
        prompt, no_profile = tok(rec["prompt"])["input_ids"], tok(rec["prompt_no_profile"])["input_ids"]
        comp = row["completion_ids"]
        with torch.no_grad():
            z_h = torch_model(torch.tensor([prompt + comp[:-1]])).logits[0, len(prompt) - 1:].float()
            z_0 = torch_model(torch.tensor([no_profile + comp[:-1]])).logits[0, len(no_profile) - 1:].float()
        z = z_h + 3.0 * (z_h - z_0)  # α = 0: every token is plausible
        assert row["argmax_personal"] == z_h.argmax(-1).tolist()
        assert row["argmax_contrast"] == z.argmax(-1).tolist()
        assert row["argmax_contrast_token"] == [tok.decode([t]) for t in row["argmax_contrast"]]
        changed += sum(a != b for a, b in zip(row["argmax_personal"], row["argmax_contrast"]))
    assert changed > 0
    text = page.read_text()
    assert text.count('class="tok"') == sum(len(r["tokens"]) for r in scored)
    assert text.count('data-changed="1"') == changed
    row = scored[0]
    j = next(j for j, (a, b) in enumerate(zip(row["argmax_personal"], row["argmax_contrast"])) if a != b)
    greedy, contrastive = row["argmax_personal_token"][j], row["argmax_contrast_token"][j]
    assert html.escape(f"contrast changes the greedy choice: {greedy!r} → {contrastive!r}") in text
    summary = json.loads(text.split("id='summary'>")[1].split("</script>")[0])
    assert summary["frac_contrast_changed"] == pytest.approx(changed / summary["tokens"])


def test_score_without_contrast_keeps_its_output(workdir, tmp_path):
    d, _ = workdir
    data, out, page = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "r.html"
    data.write_text(json.dumps(RECORDS[0]) + "\n")
    assert cli.main(["score", "--model", str(d / "model"), "--data", str(data), "--out", str(out), "--html",
                     str(page)]) == 0
    row = json.loads(out.read_text())
    assert not any(k.startswith("argmax_") for k in row)
    assert 'data-changed="1"' not in page.read_text() and "frac_contrast_changed" not in page.read_text()
