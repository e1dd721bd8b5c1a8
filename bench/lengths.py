"""Length distributions of the speed and memory benches, and prompt records whose texts tokenize to drawn lengths.

A :class:`Lengths` draws, per example, the personalized prompt length P (query + retrieved profile items), the query
length Q (the counterfactual, profile-free prompt) and the response length R (end token included), all in tokens:

- ``longlamp``: LongLaMP-like (Contriever top-k profile items before the task input; reviews / abstracts / topic
  posts as targets). P ~ log-normal(median 1000, p90 2000) clipped to [256, 2048] (2048 = the prompt truncation of
  NextQuill's reference code and the max_prompt_len of the run, so ~9% of the prompts sit at the clip, as truncated
  prompts do); Q ~ log-normal(median 120, p90 250) clipped to [16, 512]; R ~ log-normal(median 250, p90 500) clipped
  to [16, 512] (512 = the PerCE paper's max new tokens; ~10% at the clip). Independent draws; the profile part
  is P − Q, at least 32 tokens (P is raised when Q is close to it).
- ``smollm-why``: the issue's setting: P ~ uniform[360, 445], Q ~ uniform[48, 96], R ~ uniform[32, 128].
- ``default``: :func:`jittered` (P = p ± jitter, Q = q ± jitter/4, R in [r − jitter/4, r]), the SmolLM2 setting of
  ``bench/speed_vs_torch.py`` without ``--lengths``.

A log-normal with median m and 90th percentile p90 has μ = ln m, σ = ln(p90 / m) / z₀.₉ (z₀.₉ = 1.2816).

:func:`prompt_records` writes ``{id, prompt, prompt_no_profile, completion, template: "none"}`` records whose
texts are space-separated words that are single tokens of the given tokenizer (checked), so the featurizer of the
run (``Run.data_iterator``: tokenization, EOS, length buckets, packing) turns them into examples of exactly the drawn
lengths; the ids are random words, which is all a speed or memory measurement needs.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

Z90 = 1.2815515655446004  # standard normal 90th percentile


@dataclasses.dataclass(frozen=True)
class LogNormal:
    median: float
    p90: float
    lo: int
    hi: int

    def sample(self, rs: np.random.RandomState, n: int) -> np.ndarray:
        sigma = math.log(self.p90 / self.median) / Z90
        x = np.exp(math.log(self.median) + sigma * rs.standard_normal(n))
        return np.clip(np.rint(x), self.lo, self.hi).astype(int)

    def scaled(self, f: float) -> LogNormal:
        return LogNormal(self.median * f, self.p90 * f, max(1, round(self.lo * f)), max(2, round(self.hi * f)))

    def __str__(self) -> str:
        return f"log-normal(median {self.median:g}, p90 {self.p90:g}) clipped to [{self.lo}, {self.hi}]"


@dataclasses.dataclass(frozen=True)
class Uniform:
    lo: int
    hi: int

    def sample(self, rs: np.random.RandomState, n: int) -> np.ndarray:
        return rs.randint(self.lo, self.hi + 1, n)

    def scaled(self, f: float) -> Uniform:
        return Uniform(max(1, round(self.lo * f)), max(2, round(self.hi * f)))

    def __str__(self) -> str:
        return f"uniform[{self.lo}, {self.hi}]" if self.lo != self.hi else str(self.lo)


@dataclasses.dataclass(frozen=True)
class Lengths:
    """P (personalized prompt), Q (query = counterfactual prompt), R (response incl. end token), in tokens."""

    name: str
    personal_prompt: LogNormal | Uniform
    query: LogNormal | Uniform
    response: LogNormal | Uniform
    min_profile: int = 32

    @property
    def max_prompt_len(self) -> int:
        return max(self.personal_prompt.hi, self.query.hi + self.min_profile)

    @property
    def max_response_len(self) -> int:
        return self.response.hi

    def sample(self, n: int, seed: int = 0) -> list[tuple[int, int, int]]:
        rs = np.random.RandomState(seed)
        P, Q, R = (d.sample(rs, n) for d in (self.personal_prompt, self.query, self.response))
        return [(int(max(p, q + self.min_profile)), int(q), int(r)) for p, q, r in zip(P, Q, R)]

    def scaled(self, f: float) -> Lengths:
        """Every length × ``f`` (smoke runs)."""
        if f == 1:
            return self
        return Lengths(f"{self.name}×{f:g}", self.personal_prompt.scaled(f), self.query.scaled(f),
                       self.response.scaled(f), max(1, round(self.min_profile * f)))

    def describe(self) -> str:
        return (f"personalized prompt P ~ {self.personal_prompt}; query = counterfactual prompt Q ~ {self.query}; "
                f"response R ~ {self.response} (end token included); profile part P − Q ≥ {self.min_profile}")


LONGLAMP = Lengths("longlamp", LogNormal(1000, 2000, 256, 2048), LogNormal(120, 250, 16, 512),
                   LogNormal(250, 500, 16, 512))
SMOLLM_WHY = Lengths("smollm-why", Uniform(360, 445), Uniform(48, 96), Uniform(32, 128))


def jittered(personal_prompt: int, query: int, response: int, jitter: int) -> Lengths:
    """The legacy SmolLM2 setting: P = p ± jitter, Q = q ± jitter/4, R ∈ [r − jitter/4, r]."""
    return Lengths("default", Uniform(personal_prompt - jitter, personal_prompt + jitter),
                   Uniform(query - jitter // 4, query + jitter // 4), Uniform(response - jitter // 4, response),
                   min_profile=1)


SETTINGS = {s.name: s for s in (LONGLAMP, SMOLLM_WHY)}


# ------------------------------------------------------------------------------------------------------ records


def single_token_words(tokenizer, limit: int = 4096) -> list[str]:
    """Lower-case ASCII words ``w`` (≥ 4 letters) such that ``" " + w`` is one token, checked one by one and in a
    run (so no merge crosses the spaces between them)."""
    vocab = tokenizer.get_vocab()
    out = []
    for tok in sorted(vocab):
        if len(out) >= limit:
            break
        if not tok.startswith("Ġ") or not re.fullmatch("[a-z]{4,}", tok[1:]):
            continue
        if tokenizer(" " + tok[1:], add_special_tokens=False)["input_ids"] == [vocab[tok]]:
            out.append(tok[1:])
    if len(out) < 16:
        raise ValueError("the tokenizer has too few single-token words (expected a byte-level BPE with 'Ġ' words)")
    sample = " " + " ".join(out[:512])
    if len(tokenizer(sample, add_special_tokens=False)["input_ids"]) != min(512, len(out)):
        raise ValueError("a run of single-token words does not tokenize to one token per word")
    return out


def prompt_records(tokenizer, lengths: list[tuple[int, int, int]], seed: int = 0) -> list[dict]:
    """One prompt record (``template: "none"``: used as written) per ``(P, Q, R)``: the personalized prompt is
    P − Q profile words then the Q query words, the counterfactual prompt the same Q query words, the completion
    R − 1 words (the featurizer appends the end token). Prompt lengths include the tokenizer's BOS when it adds
    one."""
    words = np.asarray(single_token_words(tokenizer))
    bos = len(tokenizer("", add_special_tokens=True)["input_ids"])
    rs = np.random.RandomState(seed)

    def text(n: int) -> str:
        return "".join(" " + w for w in words[rs.randint(0, len(words), n)]) if n > 0 else ""

    out = []
    for i, (p, q, r) in enumerate(lengths):
        query = text(max(q - bos, 1))
        out.append({"id": f"bench-{i}", "prompt": text(p - q) + query, "prompt_no_profile": query,
                    "completion": text(max(r - 1, 1)), "template": "none"})
    return out
