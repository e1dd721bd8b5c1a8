"""`percausal score` tokenizes exactly like training.

For the same prompt records, the ids ``score`` writes (``prompt_ids``, ``prompt_no_profile_ids``,
``completion_ids``) must be the ids of the training batch that ``data.pipeline.make_iterator`` builds (recovered
from the ``PairedBatch``: each pass's tokens where ``segment_ids > 0``, the prompt up to the row predicting the first
response token, the response where ``weight > 0``), for templates "none" and "chat", for records with and without a
``template`` field, with two real-world-shaped chat templates (Llama-3 and Gemma) on tiny offline tokenizers. The ids
are also checked against the tokenizer itself (one BOS, chat text tokenized without adding specials; the completion
ends with the chat template's end-of-turn token for chat-rendered prompts, with EOS for raw ones). Qwen3's
``enable_thinking`` (``score --enable-thinking`` / ``data.enable_thinking``) changes the ids, and score and training
agree for each setting.
"""

import functools
import itertools
import json

import numpy as np
import pytest

from percausal_jax import cli, storage
from percausal_jax.data.featurize import FeaturizeConfig
from percausal_jax.data.pipeline import make_iterator
from tests.helpers import tiny_hf_model

LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
FLAVORS = {
    # specials (trained first, so ids 0..n-1), bos, eos, pad, chat template
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", LLAMA3),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>", GEMMA),
}
END_OF_TURN = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}  # what each template writes after an answer
CORPUS = ["User profile: loves glimmerous gadgets and long walks.", "Write a review of the lamp.",
          "A warm light for reading at night. Stay zesty!", "The toaster works well and heats evenly.",
          "user model assistant", "Past reviews of the user."] * 3
VOCAB = 512
FCFG = dict(max_prompt_len=96, max_response_len=48)


@functools.lru_cache(maxsize=None)
def make_tokenizer(flavor: str):
    """A byte-level BPE with the flavor's special tokens, a BOS post-processor and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, template = FLAVORS[flavor]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, specials.index(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=template)
    assert len(fast) <= VOCAB
    return fast


def _chat(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def records(tok) -> list[dict]:
    """Prompt records without a template field (rendered with the run's template), pre-rendered chat records and
    raw-text records with a template field (used as they are whatever the run's template), one empty
    profile-free prompt."""
    p, c = "User profile: loves glimmerous gadgets. Write a review of the lamp.", "Write a review of the lamp."
    return [
        {"id": "plain", "prompt": p, "prompt_no_profile": c, "completion": "A warm light. Stay zesty!"},
        {"id": "rendered_chat", "template": "chat", "prompt": _chat(tok, "Past reviews: long walks. Review it."),
         "prompt_no_profile": _chat(tok, "Review it."), "completion": "The toaster works well."},
        {"id": "rendered_none", "template": "none", "prompt": "Past reviews of the user. Write a review.",
         "prompt_no_profile": "Write a review.", "completion": "It heats evenly, friends!"},
        {"id": "no_context", "prompt": "User profile: long walks. Write.", "prompt_no_profile": "",
         "completion": "Stay zesty!"},
    ]


@pytest.fixture(scope="module", params=list(FLAVORS))
def model(request, tmp_path_factory):
    """(flavor, model dir with config + weights + tokenizer, the in-memory tokenizer, records JSONL)."""
    flavor = request.param
    d = tmp_path_factory.mktemp(f"score_{flavor}")
    tok = make_tokenizer(flavor)
    tiny_hf_model("llama", d / "model", vocab_size=VOCAB, num_hidden_layers=1)
    tok.save_pretrained(str(d / "model"))
    data = d / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(tok)))
    return flavor, d / "model", tok, data


def _training_ids(data, tokenizer, template: str, n: int, enable_thinking: bool = False) -> list[dict]:
    fcfg = FeaturizeConfig(template=template, enable_thinking=enable_thinking, **FCFG)
    it = make_iterator(str(data), tokenizer, fcfg, batch_size=1, seed=0, shuffle=False,
                       bucket_multiple=16)
    out = []
    for batch in itertools.islice(it, n):
        r = batch.response
        w = np.asarray(r.weight[0]) > 0
        row = {"completion_ids": np.asarray(r.ids[0])[w].tolist()}
        for key, seq, index in (("prompt_ids", batch.personal, r.index_personal),
                                ("prompt_no_profile_ids", batch.counterfactual, r.index_counterfactual)):
            tokens = np.asarray(seq.tokens[0])[np.asarray(seq.segment_ids[0]) > 0].tolist()
            prompt = tokens[:int(index[0, 0]) + 1]
            assert tokens == prompt + row["completion_ids"][:-1]  # one example per row: prompt, then response
            row[key] = prompt
        out.append(row)
    assert it.featurize_stats.kept == n and sum(it.featurize_stats.dropped.values()) == 0
    return out


@pytest.mark.parametrize("template", ["none", "chat"])
def test_score_ids_equal_the_training_batch_ids(model, tmp_path, template):
    flavor, model_dir, tok, data = model
    out = tmp_path / "scores.jsonl"
    assert cli.main(["score", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                     "--template", template, "--batch-size", "4"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    recs = records(tok)
    assert [s["id"] for s in scored] == [r["id"] for r in recs]
    # the tokenizer training loads from model.path (the same loader as the run spine)
    trained = _training_ids(data, storage.load_tokenizer(model_dir, what="tokenizer"), template, len(recs))
    for rec, s, t in zip(recs, scored, trained):
        for key in ("prompt_ids", "prompt_no_profile_ids", "completion_ids"):
            assert s[key] == t[key], f"{flavor}/{template}/{rec['id']}: {key}"

    # and both are what the tokenizer says (independent of the library's featurizer)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for rec, s in zip(recs, scored):
        used = rec.get("template", template)
        for field, key in (("prompt", "prompt_ids"), ("prompt_no_profile", "prompt_no_profile_ids")):
            text = rec[field]
            if used == "chat":
                text = text if "template" in rec else _chat(tok, text)
                expected = tok(text, add_special_tokens=False)["input_ids"]
            else:
                expected = tok(text)["input_ids"]
            assert s[key] == expected, f"{flavor}/{template}/{rec['id']}: {key}"
            assert s[key][0] == bos and s[key].count(bos) == 1, f"{flavor}/{template}/{rec['id']}: {key} BOS"
            turn = tok.convert_tokens_to_ids(FLAVORS[flavor][0][2 if flavor == "llama3" else 3])
            assert (turn in s[key]) == (used == "chat"), f"{flavor}/{template}/{rec['id']}: {key} turn marker"
        end = tok.convert_tokens_to_ids(END_OF_TURN[flavor]) if used == "chat" else eos
        assert s["completion_ids"] == tok(rec["completion"], add_special_tokens=False)["input_ids"] + [end]
        assert (eos in s["completion_ids"]) == (used == "none" or eos == end), f"{flavor}/{template}/{rec['id']}"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny model directory with a Qwen3-shaped tokenizer carrying Qwen3's real chat template."""
    from tests.data.tokenizer_fixture import make_chat_tokenizer

    d = tmp_path_factory.mktemp("score_qwen3")
    tok = make_chat_tokenizer("qwen3")
    assert len(tok) <= VOCAB
    tiny_hf_model("llama", d / "model", vocab_size=VOCAB, num_hidden_layers=1)
    tok.save_pretrained(str(d / "model"))
    data = d / "records.jsonl"
    recs = [r for r in records(tok) if "template" not in r or r["template"] == "none"]  # rendered by score / training
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d / "model", tok, data, recs


def test_qwen3_enable_thinking_score_and_training_agree(qwen3, tmp_path):
    model_dir, tok, data, recs = qwen3
    scored = {}
    for thinking in (False, True):
        out = tmp_path / f"scores_{thinking}.jsonl"
        argv = ["score", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--template", "chat"]
        assert cli.main(argv + (["--enable-thinking"] if thinking else [])) == 0
        scored[thinking] = [json.loads(line) for line in out.read_text().splitlines()]
        trained = _training_ids(data, storage.load_tokenizer(model_dir, what="tokenizer"), "chat", len(recs),
                                enable_thinking=thinking)
        for rec, s, t in zip(recs, scored[thinking], trained):
            for key in ("prompt_ids", "prompt_no_profile_ids", "completion_ids"):
                assert s[key] == t[key], f"thinking={thinking}/{rec['id']}: {key}"
    think = tok("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for rec, off, on in zip(recs, scored[False], scored[True]):
        if rec.get("template") == "none":  # final raw text: the switch does not apply
            assert off == on
            continue
        for key in ("prompt_ids", "prompt_no_profile_ids"):  # False = the empty think block after the header
            assert off[key] != on[key] and off[key] == on[key] + think, f"{rec['id']}: {key}"
        assert off["completion_ids"] == on["completion_ids"] and off["completion_ids"][-1] == im_end
