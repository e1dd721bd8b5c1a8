"""percausal synth: a synthetic personalization task with a planted, token-visible style per user.

Each user gets a fixed style: an opening line, a preferred adjective, an invented word and a sign-off with their name
(e.g. ``"Stay zesty, Marla!"`` and ``"glimmerous"``). Targets combine that style with generic content, so the style
can only be predicted from the profile, the generic part from the input: the profile-free (counterfactual) prompt
explains the generic tokens but not the personal ones, which is what token-level causal objectives should find.

Records are canonical (``task="synthetic"``, profile items ``{id, text, date}``) and carry ``personal_spans``:
``[start, end)`` character spans of ``output`` that are exactly the planted style pieces (four per target).
Targets are about 25–30 words, short enough for a 135M model to pick up the styles in minutes on CPU.
Everything is deterministic given the seed (and level); a user's data does not depend on how many users are
generated. Train/test are split by user, so test users are unseen ("cold start", as LongLaMP's user setting);
``--val-users N`` adds ``val.jsonl`` with N further users (generated after the others: train/test are unchanged).

``--difficulty`` (``easy`` is the default and the original generator, byte for byte):

* **easy**: every profile text carries all four pieces verbatim; targets copy them verbatim. The generic content is
  one of a few fixed review sentences (not predictable from the query) plus the product named in the query.
* **medium**: a third of the profile items (rounded down) are *distractors*, written in other random styles (no
  piece shared with the user's or, up to 9 distractors, with each other's); each of the user's pieces appears in
  only 3 of the user's own items (random subsets, so an own item may miss pieces). The target uses the adjective
  *inflected*: an adjective in the profile ("plucky"), an adverb in the target ("pluckily"); the other pieces are
  verbatim. The generic content comes from the query: it lists two facts ("it arrived in 9 days; setup took 11
  minutes") that the target restates in fixed sentences.
* **hard**: half of the profile items are distractors; each piece appears in only 2 own items; the invented word
  is inflected too ("quiberous" in the profile, "quiberously" in the target). With retrieval of k < all items the
  prompt may hold a piece once, or not at all.

``personal_spans`` mark exactly the planted pieces of the target, inflected forms included. Fraction of the
targets' tokens that are personal, with SmolLM2's tokenizer (end token excluded; the default ``synth`` shape of 20
users × 8 targets, 6 profile items, seeds 0 / 1): easy 0.439 / 0.447, medium 0.417 / 0.414, hard 0.424 / 0.417
(the levels differ in how the profile hides the style, not in how much of a target is style).

What CE reaches (SmolLM2-135M-Instruct, LoRA r16, ``configs/demo.py``: 12 steps × 4 examples at lr 1e-3; users
never seen in training; span recall = fraction of planted spans reproduced by greedy decoding): easy 1.0 (saturated:
every method copies every piece), medium 0.97 (personal-token NLL 0.19 nats), hard 0.125 (personal-token NLL above 3
nats at 6 steps; ``bench/RESULTS.md``, "Learning effect"). ``percausal demo`` therefore uses ``hard``.
"""

from __future__ import annotations

import dataclasses
import datetime
import random
from typing import Sequence

from percausal_jax.data.prompts import PLACEHOLDER, TASKS, Mode, Prompt, Task
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


def generate(n_users: int, items_per_user: int, outputs_per_user: int, seed: int, difficulty: str = "easy",
             first_user: int = 0) -> list[dict]:
    """All records, user by user (users ``first_user`` … ``first_user + n_users − 1``): ``outputs_per_user``
    canonical records per user sharing one profile. A user's records depend only on the seed, the difficulty and
    the user's index."""
    if difficulty not in LEVELS:
        raise UserError(f"--difficulty {difficulty!r}: expected one of {', '.join(LEVELS)}")
    records = []
    for u in range(first_user, first_user + n_users):
        if difficulty == "easy":
            records += _easy_user(u, items_per_user, outputs_per_user, seed)
        else:
            records += _planted_user(u, items_per_user, outputs_per_user, seed, difficulty)
    return records


def _easy_user(u: int, items_per_user: int, outputs_per_user: int, seed: int) -> list[dict]:
    """Level easy: every profile text carries all four style pieces verbatim, as do the targets."""
    records = []
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


# ----------------------------------------------------------------------------------------- levels medium, hard


@dataclasses.dataclass(frozen=True)
class Level:
    """How a medium / hard profile hides the user's style (see the module doc)."""

    distractors: tuple[int, int]  # (p, q): p/q of the profile items, rounded down, are in other (random) styles
    repeats: int  # own profile items each style piece appears in (at most the number of own items)
    inflect_word: bool  # the invented word also appears inflected (as an adverb) in the targets


LEVELS = {"easy": None, "medium": Level(distractors=(1, 3), repeats=3, inflect_word=False),
          "hard": Level(distractors=(1, 2), repeats=2, inflect_word=True)}
PIECES = ("opening", "adj", "word", "signoff")
ADJ_ENDINGS = ["erous", "tastic", "ish", "esque", "ous", "ful"]  # invented words that read as adjectives
ADVERB_SENTENCES = ["The {product} works {adj}.", "It handles daily use {adj}.", "I used the {product} {adj} all week."]
INFLECTED_WORD_SENTENCES = ["It performs {word} overall.", "The {product} behaves {word}."]
FACTS = [("it arrived in {days} days", "It arrived in {days} days."),
         ("setup took {minutes} minutes", "Setup took about {minutes} minutes."),
         ("the color is {color}", "The color is {color}, as pictured."),
         ("it costs {price} dollars", "At {price} dollars the price is fair.")]
COLORS = ["teal", "charcoal", "ivory", "olive", "crimson", "navy", "sand", "plum"]


def adverb(adjective: str) -> str:
    """``zesty`` → ``zestily``, ``glimmtastic`` → ``glimmtastically``, ``crisp`` → ``crisply``."""
    if adjective.endswith("y"):
        return adjective[:-1] + "ily"
    if adjective.endswith("ic"):
        return adjective + "ally"
    return adjective + "ly"


def _planted_user(u: int, items_per_user: int, outputs_per_user: int, seed: int, difficulty: str) -> list[dict]:
    """Levels medium / hard: own profile items carry each style piece only ``repeats`` times (a random subset of
    pieces per item), among distractor items in other styles; targets restate the query's facts (generic) and the
    style pieces, the adjective (hard: also the invented word) inflected to an adverb."""
    level = LEVELS[difficulty]
    rng = random.Random(f"percausal-synth:{difficulty}:{seed}:{u}")
    style = _draw_planted_style(rng)
    user_id = f"u{u:04d}"
    p, q = level.distractors
    n_distract = min(items_per_user * p // q, items_per_user - 1)  # at least one own item
    n_own = items_per_user - n_distract
    has = [set() for _ in range(n_own)]  # the pieces each own item carries
    for piece in PIECES:
        for i in rng.sample(range(n_own), min(level.repeats, n_own)):
            has[i].add(piece)
    texts = [_planted_text(rng, style, pieces)[0] for pieces in has]
    drawn = [style]  # distractor styles share no piece with the user's or (while the pools allow) each other's
    for _ in range(n_distract):
        drawn.append(_draw_planted_style(rng, unlike=drawn if len(drawn) < len(OPENINGS) else [style]))
        texts.append(_planted_text(rng, drawn[-1], set(PIECES))[0])
    rng.shuffle(texts)
    day0 = datetime.date(2024, 1, 1)
    profile = [{"id": f"{user_id}-p{i}", "text": text, "date": (day0 + datetime.timedelta(days=i)).isoformat()}
               for i, text in enumerate(texts)]
    inflect = ("adj", "word") if level.inflect_word else ("adj",)
    records = []
    for j in range(outputs_per_user):
        output, spans, query = _planted_text(rng, style, set(PIECES), inflect)
        records.append({"id": f"{user_id}-{j}", "user_id": user_id, "task": "synthetic", "input": query,
                        "output": output, "profile": profile, "personal_spans": spans})
    return records


def _draw_planted_style(rng: random.Random, unlike: Sequence[dict[str, str]] = ()) -> dict[str, str]:
    """A style whose invented word reads as an adjective, sharing no piece (nor name) with any of ``unlike``."""
    while True:
        name = rng.choice(NAMES)
        style = {"opening": rng.choice(OPENINGS), "adj": rng.choice(ADJECTIVES),
                 "word": rng.choice(INVENTED_STEMS) + rng.choice(ADJ_ENDINGS),
                 "signoff": rng.choice(SIGNOFFS).format(adj=rng.choice(ADJECTIVES), name=name), "name": name}
        if all(style[k] != other[k] for other in unlike for k in (*PIECES, "name")):
            return style


def _planted_text(rng: random.Random, style: dict[str, str], pieces: set[str], inflect: tuple[str, ...] = ()
                  ) -> tuple[str, list[list[int]], str]:
    """A review with the style ``pieces`` (those in ``inflect`` as adverbs) and two facts of a random product →
    (text, character spans of the pieces, the query that states the product and the facts)."""
    product = rng.choice(PRODUCTS)
    values = {"days": rng.randint(2, 9), "minutes": rng.randint(2, 30), "color": rng.choice(COLORS),
              "price": rng.randint(9, 99)}
    facts = rng.sample(FACTS, 2)
    query = (f"Write a short review of the {product}. Facts: "
             + "; ".join(note.format(**values) for note, _ in facts) + ".")
    sentences: list[list[tuple[str, bool]]] = []  # each sentence as fragments (text, personal?)
    if "opening" in pieces:
        sentences.append([(style["opening"], True)])
    if "adj" in pieces:
        pool = ADVERB_SENTENCES if "adj" in inflect else ADJECTIVE_SENTENCES
        piece = adverb(style["adj"]) if "adj" in inflect else style["adj"]
        sentences.append(_around(rng.choice(pool).format(product=product, adj="\0"), piece))
    sentences += [[(sentence.format(**values), False)] for _, sentence in facts]
    if "word" in pieces:
        pool = INFLECTED_WORD_SENTENCES if "word" in inflect else INVENTED_SENTENCES
        piece = adverb(style["word"]) if "word" in inflect else style["word"]
        sentences.append(_around(rng.choice(pool).format(product=product, word="\0"), piece))
    if "signoff" in pieces:
        sentences.append([(style["signoff"], True)])
    text, spans = "", []
    for fragments in sentences:
        text += " " if text else ""
        for fragment, personal in fragments:
            if personal:
                spans.append([len(text), len(text) + len(fragment)])
            text += fragment
    return text, spans, query


def _around(sentence: str, personal: str) -> list[tuple[str, bool]]:
    """``"A \\0 b."`` → ``[("A ", False), (personal, True), (" b.", False)]`` (empty fragments left out)."""
    before, after = sentence.split("\0")
    return [(t, p) for t, p in ((before, False), (personal, True), (after, False)) if t]


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
