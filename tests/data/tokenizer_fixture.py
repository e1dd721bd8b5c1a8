"""Shared data-test fixtures: a tiny offline tokenizer, and tiny raw files in the public releases' schemas.

The tokenizer is a byte-level BPE + BOS post-processor with an optional ChatML template; it encodes any text (no
unknown tokens), so fixtures need not be in its training corpus. Special tokens: ``<pad>`` 0, ``<s>`` 1 (BOS, added
by ``add_special_tokens=True``), ``</s>`` 2 (EOS), ``<|im_start|>`` 3, ``<|im_end|>`` 4.
"""

from __future__ import annotations

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
