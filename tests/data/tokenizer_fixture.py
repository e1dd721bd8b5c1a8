"""Shared data-test fixtures: a tiny offline tokenizer, and tiny raw files in the public releases' schemas.

The tokenizer is a byte-level BPE + BOS post-processor with an optional ChatML template; it encodes any text (no
unknown tokens), so fixtures need not be in its training corpus. Special tokens: ``<pad>`` 0, ``<s>`` 1 (BOS, added
by ``add_special_tokens=True``), ``</s>`` 2 (EOS), ``<|im_start|>`` 3, ``<|im_end|>`` 4.

:func:`make_chat_tokenizer` builds tokenizers shaped like real model families (special tokens, BOS/EOS,
pre-tokenizer regex) carrying those models' own chat templates (``chat_templates/*.jinja``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

CHATML = (
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Past reviews of the user. Write a review of the kettle. Stay zesty!",
    "Generate the review text written by a reviewer who has a given an overall rating",
    "is a rating for the product with description. Following the given patterns",
    "Generate a headline for the following article: the news of the day",
    "[Item Title]: [Item Description]: [User's Past Reviews]: [Review Rating]: [Review Title]: [Review Text]:",
    "It boils fast and looks great. The mug is chipped. Loved it, would buy again.",
]


@functools.lru_cache(maxsize=None)
def make_tokenizer(chat: bool = True, bos: bool = True):
    """A ``PreTrainedTokenizerFast`` (vocab ~400); ``chat`` sets the ChatML template, ``bos`` prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHATML if chat else None)


def save_tokenizer(out_dir: Path, chat: bool = True) -> Path:
    """Writes the tokenizer with ``save_pretrained`` (for code that loads a tokenizer directory)."""
    make_tokenizer(chat).save_pretrained(str(out_dir))
    return out_dir


# ------------------------------------------------------------------------------ raw files (data.md §1, §2, §3)


def review_item(i: int) -> dict:
    return {"overall": float(i % 5 + 1), "description": f"Kettle model {i}.", "summary": f"Summary {i}",
            "reviewText": f"It boils fast, review number {i}."}


def longlamp_rows(split: str, n: int) -> list[dict]:
    """``product_review_*`` rows as in the HF release: user id in ``reviewerId``, no id, no task."""
    return [{"reviewerId": f"A{split}{i}", "input": f"Generate the review text for kettle {i} ({split}).",
             "output": f"Loved kettle {i}, it boils fast.", "profile": [review_item(i + j) for j in range(i % 3 + 1)]}
            for i in range(n)]


def write_longlamp(root: Path, sizes: dict[str, int], config: str = "product_review_user") -> Path:
    """HF repository layout: ``root/{config}/{split}-00000-of-00001.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / config
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        pq.write_table(pa.Table.from_pylist(longlamp_rows(split, n)), folder / f"{split}-00000-of-00001.parquet")
    return root


def lamp_questions(split: str, n: int) -> list[dict]:
    """LaMP-3 questions: ``{id, input, profile: [{id, text, score}]}``."""
    return [{"id": f"{split}{i}", "profile": [{"id": f"{split}{i}-{j}", "text": f"Old review {j} about mugs.",
                                                "score": str(j % 5 + 1)} for j in range(i % 3 + 1)],
             "input": "What is the score of the following review on a scale of 1 to 5? Just answer with 1, 2, 3, 4, "
                      f"or 5 without further explanation. review: mug number {i} is fine" + " and good" * 3 * i}
            for i in range(n)]


def write_lamp(folder: Path, split: str, n: int, with_outputs: bool = True) -> Path:
    """``{split}_questions.json`` (+ ``{split}_outputs.json``); returns the questions path."""
    folder.mkdir(parents=True, exist_ok=True)
    questions = lamp_questions(split, n)
    path = folder / f"{split}_questions.json"
    path.write_text(json.dumps(questions))
    if with_outputs:
        golds = [{"id": q["id"], "output": str(i % 5 + 1)} for i, q in enumerate(questions)]
        (folder / f"{split}_outputs.json").write_text(json.dumps({"task": "LaMP_3", "golds": golds}))
    return path


def write_amazon(folder: Path, n_users: int = 2) -> tuple[Path, Path]:
    """DPL-main rows ``{user_id, profile, data}`` and DPL-meta rows ``{asin, title, description}`` (JSONL)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = [{"asin": f"B{i}", "title": f"Book {i}", "description": f"A novel about item {i}."} for i in range(6)]
    main = [{"user_id": f"U{u}",
             "profile": [{"rating": 4.0, "title": f"Nice {j}", "text": f"I liked book {j}.", "asin": f"B{j}",
                          "timestamp": 1600000000000 + j} for j in range(3)],
             "data": {"asin": f"B{4 + u}", "rating": 5.0, "title": "Great read", "text": f"User {u} loved it."}}
            for u in range(n_users)]
    main_path, meta_path = folder / "main.jsonl", folder / "meta.jsonl"
    main_path.write_text("".join(json.dumps(r) + "\n" for r in main))
    meta_path.write_text("".join(json.dumps(r) + "\n" for r in meta))
    return main_path, meta_path


# ------------------------------------------------------------- tokenizers carrying real models' chat templates

CHAT_TEMPLATES = Path(__file__).resolve().parent / "chat_templates"
# the pre-tokenizer regexes of the Llama-3 and Qwen2 tokenizer.json files (digits: up to 3 vs 1)
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_GEMMA = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]


@dataclasses.dataclass(frozen=True)
class Flavor:
    """A model family's tokenizer shape: special tokens, BOS (added by ``add_special_tokens=True`` when
    ``add_bos``), EOS, the chat template file and the end-of-turn token that template writes after an assistant
    message. ``split`` is the pre-tokenizer regex (None: GPT-2 byte-level regex, as SmolLM2)."""

    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    end_of_turn: str
    add_bos: bool = False
    split: str | None = None
    added: tuple[str, ...] = ()  # non-special added tokens (Qwen3's <think> / </think>)

    @property
    def chat_template(self) -> str:
        return (CHAT_TEMPLATES / f"{self.template}.jinja").read_text()


# Templates: the models' own chat templates, reproduced in chat_templates/*.jinja (Meta-Llama-3-8B-Instruct,
# Qwen2.5-*-Instruct, Qwen3-*, gemma-2-*-it (= gemma-1.1 -it), gemma-3-*-it, SmolLM2-*-Instruct). EOS: Llama-3 as in
# its base / first Instruct release (<|end_of_text|>, so the end-of-turn differs), Qwen2.5 as in its base checkpoints
# (<|endoftext|>, which carry the same template), Qwen3 and SmolLM2 <|im_end|>, Gemma <eos>.
FLAVORS = {
    "llama3": Flavor("llama3", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                "<|eot_id|>"), "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", add_bos=True,
                     split=_SPLIT % "{1,3}"),
    "qwen2.5": Flavor("qwen2_5", tuple(_CHATML), None, "<|endoftext|>", "<|im_end|>", split=_SPLIT % ""),
    "qwen3": Flavor("qwen3", tuple(_CHATML), None, "<|im_end|>", "<|im_end|>", split=_SPLIT % "",
                    added=("<think>", "</think>")),
    "gemma2": Flavor("gemma2", tuple(_GEMMA), "<bos>", "<eos>", "<end_of_turn>", add_bos=True, split=_SPLIT % ""),
    "gemma3": Flavor("gemma3", tuple(_GEMMA), "<bos>", "<eos>", "<end_of_turn>", add_bos=True, split=_SPLIT % ""),
    "smollm2": Flavor("smollm2", tuple(_CHATML), "<|im_start|>", "<|im_end|>", "<|im_end|>"),
}
CHAT_CORPUS = CORPUS + ["User profile: loves glimmerous gadgets and long walks.\n\nWrite a review of the lamp.",
                        "A warm light for reading at night.\nStay zesty!", "user assistant model system think",
                        "One\n\nTwo\n\nThree\n\n" * 8]  # so that "\n\n" is one token, as in the real vocabularies


@functools.lru_cache(maxsize=None)
def make_chat_tokenizer(flavor: str):
    """A tiny byte-level BPE (vocab <= 420) shaped like ``FLAVORS[flavor]``, carrying that model's chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    f = FLAVORS[flavor]
    tok = Tokenizer(models.BPE())
    if f.split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(f.split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(f.specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CHAT_CORPUS, trainer)
    if f.added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in f.added])
    if f.add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{f.bos} $A",
                                                           special_tokens=[(f.bos, f.specials.index(f.bos))])
    pad = "<pad>" if "<pad>" in f.specials else "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f.bos, eos_token=f.eos, pad_token=pad,
                                   chat_template=f.chat_template)
