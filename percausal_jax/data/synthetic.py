"""percausal synth: a synthetic personalization task with a planted, token-visible style per user.

Each user gets a fixed style: an opening line, a preferred adjective, an invented word and a sign-off with their name
(e.g. ``"Stay zesty, Marla!"`` and ``"glimmerous"``). Every text the user writes, profile items and targets alike,
combines that style with generic content drawn from a small fixed set of product-review sentences. So the style
can only be predicted from the profile, the generic part from the input: the profile-free (counterfactual) prompt
explains the generic tokens but not the personal ones, which is what token-level causal objectives should find.

Records are canonical (``task="synthetic"``, profile items ``{id, text, date}``) and carry ``personal_spans``:
``[start, end)`` character spans of ``output`` that come from the user's style (each also occurs in every profile
text). Targets are about 20–35 words, short enough for a 135M model to pick up the styles in minutes on CPU.
Everything is deterministic given the seed; a user's style does not depend on how many users are generated.
Train/test are split by user, so test users are unseen ("cold start", as LongLaMP's user setting).
"""

from __future__ import annotations

import argparse
import datetime
import random
from pathlib import Path

from percausal_jax.data.prompts import PLACEHOLDER, TASKS, Mode, Prompt, Task
from percausal_jax.data.files import write_jsonl
from percausal_jax.errors import UserError

NAMES = ["Marla", "Theo", "Priya", "Jonas", "Ines", "Kofi", "Yuki", "Bram", "Lena", "Omar", "Sofia", "Ravi",
         "Greta", "Mateo", "Nadia", "Felix", "Amara", "Hugo", "Zara", "Emil"]
OPENINGS = ["Well, well, well.", "Okay friends, listen up.", "Quick verdict incoming.", "Hear me out.",
            "Big news, everyone.", "Real talk, pals.", "Gather round, folks.", "So here is the scoop.",
            "Let me be blunt.", "Deep breath, people."]
ADJECTIVES = ["zesty", "sturdy", "dreamy", "crisp", "snappy", "cozy", "sleek", "mellow", "plucky", "breezy",
              "spiffy", "jolly"]
INVENTED_STEMS = ["glimm", "zorb", "flan", "quib", "snorf", "brizz", "wumb", "plink", "drizz", "frob", "klon", "murf"]
INVENTED_ENDINGS = ["erous", "ly", "tastic", "ish", "ified", "arific", "oodle", "esque"]
SIGNOFFS = ["Stay {adj}, {name}!", "Keep it {adj}, {name} out.", "Onward and {adj}, {name}.",
            "Ever {adj}, yours {name}."]

PRODUCTS = ["kettle", "backpack", "desk lamp", "blender", "rain jacket", "bookshelf", "phone case", "water bottle",
            "board game", "coffee grinder", "yoga mat", "bike light", "notebook", "toaster", "umbrella", "headphones"]
ADJECTIVE_SENTENCES = ["The {product} feels {adj} and does its job.", "I find the {product} {adj} in daily use.",
                       "This {product} is {adj} from the very first day."]
GENERIC_SENTENCES = ["It arrived on time and the box was intact.", "Setup took about {minutes} minutes.",
                     "The price seems fair for what you get.", "Cleaning it is easy enough.",
                     "The color matches the photos on the page."]
INVENTED_SENTENCES = ["Truly a {word} {product}.", "Honestly {word} stuff.", "Pure {word} value overall."]
HEADER = "Past texts by this user:"


def generate(n_users: int, items_per_user: int, outputs_per_user: int, seed: int) -> list[dict]:
    """All records, user by user: ``outputs_per_user`` canonical records per user sharing one profile."""
    records = []
    for u in range(n_users):
        rng = random.Random(f"percausal-synth:{seed}:{u}")
        style = _draw_style(rng)
        user_id = f"u{u:04d}"
        day0 = datetime.date(2024, 1, 1)
        profile = [{"id": f"{user_id}-p{i}", "text": _write(rng, style, rng.choice(PRODUCTS))[0],
                    "date": (day0 + datetime.timedelta(days=i)).isoformat()} for i in range(items_per_user)]
        for j in range(outputs_per_user):
            product = rng.choice(PRODUCTS)
            output, spans = _write(rng, style, product)
            records.append({"id": f"{user_id}-{j}", "user_id": user_id, "task": "synthetic",
                            "input": f"Write a short review of the {product}.", "output": output,
                            "profile": profile, "personal_spans": spans})
    return records


def _draw_style(rng: random.Random) -> dict[str, str]:
    name = rng.choice(NAMES)
    return {"opening": rng.choice(OPENINGS), "adj": rng.choice(ADJECTIVES),
            "word": rng.choice(INVENTED_STEMS) + rng.choice(INVENTED_ENDINGS),
            "signoff": rng.choice(SIGNOFFS).format(adj=rng.choice(ADJECTIVES), name=name)}


def _write(rng: random.Random, style: dict[str, str], product: str) -> tuple[str, list[list[int]]]:
    """One text in the user's style about ``product``, with the character spans of the style pieces."""
    adj_sentence = rng.choice(ADJECTIVE_SENTENCES).format(product=product, adj="\0")
    word_sentence = rng.choice(INVENTED_SENTENCES).format(product=product, word="\0")
    pieces = [(style["opening"], True), *_split_at_marker(adj_sentence, style["adj"]),
              (rng.choice(GENERIC_SENTENCES).format(minutes=rng.randint(2, 30)), False),
              *_split_at_marker(word_sentence, style["word"]), (style["signoff"], True)]
    text, spans = "", []
    for piece, personal in pieces:
        start = len(text)
        text += piece
        if personal:
            spans.append([start, len(text)])
    return text, spans


def _split_at_marker(sentence: str, personal: str) -> list[tuple[str, bool]]:
    """``"A \\0 b."`` → ``[(" A ", False), (personal, True), (" b.", False)]``: a sentence around one style word."""
    before, after = sentence.split("\0")
    return [(f" {before}", False), (personal, True), (f"{after} ", False)]


def split_by_user(records: list[dict], test_frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Train/test with disjoint users; test gets ``round(test_frac × users)`` of them (≥ 1 if test_frac > 0)."""
    users = sorted({r["user_id"] for r in records})
    random.Random(f"percausal-synth-split:{seed}").shuffle(users)
    n_test = 0 if test_frac == 0 else min(max(1, round(test_frac * len(users))), len(users) - 1)
    test_users = set(users[:n_test])
    return [r for r in records if r["user_id"] not in test_users], [r for r in records if r["user_id"] in test_users]


# ----------------------------------------------------------------------------------------------- prompt builder


def _personal(record: dict, items: list[dict]) -> Prompt:
    listed = "\n".join(f"- {item['text']}" for item in items)
    return Prompt(None, f"{HEADER}\n{listed}\n\n{record['input']}")


def _counterfactual(record: dict, mode: Mode) -> Prompt:
    return Prompt(None, record["input"] if mode == "drop" else f"{HEADER}\n{PLACEHOLDER}\n\n{record['input']}")


TASKS["synthetic"] = Task(_personal, _counterfactual, document=lambda item: item["text"],
                          query=lambda record: record["input"], text_field="text")


# ---------------------------------------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``percausal synth``."""
    p = subparsers.add_parser("synth", help="write a synthetic personalization dataset (train.jsonl, test.jsonl)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", required=True, type=Path, help="folder for train.jsonl and test.jsonl")
    p.add_argument("--users", type=int, default=20, help="number of users (default 20)")
    p.add_argument("--profile-items", type=int, default=6, help="profile texts per user (default 6)")
    p.add_argument("--per-user", type=int, default=8, help="target records per user (default 8)")
    p.add_argument("--test-frac", type=float, default=0.2, help="fraction of users held out for test (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generates, splits by user, writes both files atomically and prints the counts."""
    for flag, value in (("--users", args.users), ("--profile-items", args.profile_items),
                        ("--per-user", args.per_user)):
        if value < 1:
            raise UserError(f"{flag} {value}: expected an integer >= 1")
    if not 0 <= args.test_frac < 1:
        raise UserError(f"--test-frac {args.test_frac}: expected a number in [0, 1)")
    train, test = split_by_user(generate(args.users, args.profile_items, args.per_user, args.seed),
                                args.test_frac, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in (("train.jsonl", train), ("test.jsonl", test)):
        write_jsonl(args.out_dir / name, records)
        print(f"wrote {len(records)} records from {len({r['user_id'] for r in records})} user(s) to "
              f"{args.out_dir / name}")
    return 0
