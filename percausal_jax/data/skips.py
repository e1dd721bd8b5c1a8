"""Rows left out, said out loud: a row whose required text is null, missing or empty is :class:`Skipped` (not an
error), counted by reason in a :class:`SkipReport` with its first ids, and printed as one table by every command
that reads records; ``strict`` turns every skip into an error naming file, row and field."""

from __future__ import annotations

import os
from collections.abc import Callable

from percausal_jax.errors import UserError


class Skipped(UserError):
    """A row that is left out, not an error: a required text is null, missing or empty. Readers count it in a
    :class:`SkipReport` (``reason`` e.g. ``empty_output``); with ``strict`` they raise it."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


STRICT_NOTE = "(strict: rows with an empty required field are errors; without --strict they are skipped and counted)"


class SkipReport:
    """What a read (and, in ``percausal prepare``, featurizing) kept and left out: counts by reason and the first
    :attr:`FIRST` ids per reason (``file:row`` for rows without an id). JSON round-trips via :meth:`to_json`."""

    FIRST = 3

    def __init__(self) -> None:
        self.kept = 0
        self.counts: dict[str, int] = {}
        self.first: dict[str, list[str]] = {}

    def keep(self, n: int = 1) -> None:
        self.kept += n

    def skip(self, reason: str, ident: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        first = self.first.setdefault(reason, [])
        if len(first) < self.FIRST:
            first.append(str(ident))

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipReport) -> SkipReport:
        """Adds ``other``'s counts (and first ids, up to :attr:`FIRST` per reason) to this report; returns it."""
        self.kept += other.kept
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            first = self.first.setdefault(reason, [])
            first.extend(other.first.get(reason, [])[:self.FIRST - len(first)])
        return self

    def to_json(self) -> dict:
        return {"kept": self.kept, "skipped": self.skipped,
                "by_reason": {r: {"count": n, "first": list(self.first.get(r, []))}
                              for r, n in sorted(self.counts.items())}}

    @classmethod
    def from_json(cls, state: dict) -> SkipReport:
        report = cls()
        report.kept = int(state["kept"])
        for reason, entry in state.get("by_reason", {}).items():
            report.counts[reason] = int(entry["count"])
            report.first[reason] = list(entry["first"])
        return report

    def table(self) -> str:
        """One summary table: kept and skipped in total, then one line per reason with its first ids."""
        lines = [f"kept {self.kept}, skipped {self.skipped}"]
        if self.counts:
            width = max(len("reason"), *map(len, self.counts))
            lines.append(f"  {'reason':<{width}}  {'count':>7}  first ids")
            for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
                more = ", ..." if n > len(self.first.get(reason, [])) else ""
                lines.append(f"  {reason:<{width}}  {n:>7}  {', '.join(self.first.get(reason, []))}{more}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipReport(kept={self.kept}, skipped={dict(self.counts)})"

    # One way for every command that reads records (score, eval, sweep; train's setup.open_records and prepare print
    # the same table): read with a report (--strict: skips are errors), print it, record the skips in the outputs.

    STRICT_HELP = ("a row with an empty required field (input, output, prompt, completion) is an error naming file, "
                   "row and field (exit 2), instead of being skipped and counted")

    def announce(self, what: str) -> None:
        """Prints ``WHAT:`` and :meth:`table` on stderr (``what`` names the input, e.g. ``--data=f.jsonl``)."""
        import sys

        print(f"{what}:\n{self.table()}", file=sys.stderr, flush=True)

    def summary(self) -> dict:
        """The skips as an output file records them: ``{"skipped": n, "skipped_by_reason": {reason: {"count": n,
        "first": [ids]}}}`` (``skipped_by_reason`` is ``{}`` when nothing was skipped)."""
        return {"skipped": self.skipped, "skipped_by_reason": self.to_json()["by_reason"]}

    @classmethod
    def read(cls, path: str | os.PathLike, *, strict: bool = False,
             require_output: bool = True) -> tuple[list[tuple[int, dict]], SkipReport]:
        """:func:`~percausal_jax.data.records.read_numbered` of ``path`` with a fresh report; returns the numbered records and the report.
        ``strict``: a row that would be skipped is a :class:`UserError` naming file, line and field instead. The
        command prints the report (:meth:`announce`) once its other inputs are checked too, so that a bad input
        stays its only output line."""
        from percausal_jax.data.records import read_numbered  # (records reads rows through this module's reports)

        report = cls()
        return read_numbered(path, require_output=require_output, strict=strict, report=report), report


def admit(validate: Callable[[], dict], label: str, *, strict: bool, report: SkipReport | None) -> dict | None:
    """``validate()``'s record, or None when it skipped the row (counted in ``report``; raised when ``strict``)."""
    try:
        record = validate()
    except Skipped as e:
        if strict:
            raise UserError(f"{e} {STRICT_NOTE}") from None
        if report is not None:
            report.skip(e.reason, label)
        return None
    if report is not None:
        report.keep()
    return record
