"""One exception type for every mistake a user can make.

Everything that reads user input (files, configs, CLI flags, model directories) raises :class:`UserError` with a
message that names *where* (file, line, field) and *what was expected*. The CLI turns it into one line on stderr
and exit code 2, without a traceback; library callers get an ordinary exception.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message is complete and is shown verbatim."""

    exit_code = 2


class StorageError(UserError):
    """The storage (disk or object store) failed under a command that was given good input: full, gone, or
    unreachable after bounded retries. One line, like a :class:`UserError`, but exit code 3: re-running the same
    command once the storage is back is the fix."""

    exit_code = 3


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """Formats a location prefix: ``file.jsonl:12: field 'output'``."""
    s = str(path)
    if line is not None:
        s += f":{line}"
    if field is not None:
        s += f": field '{field}'"
    return s


def describe(value: object) -> str:
    """Short description of a bad value for error messages: its JSON type and a clipped repr."""
    if value is None:
        return "null"
    names = {str: "string", bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}
    shown = repr(value)
    return f"{names.get(type(value), type(value).__name__)} {shown[:40] + '...' if len(shown) > 40 else shown}"


class ProcessMismatch(UserError):
    """The processes of one multi-process run disagree (config, data, mesh, or the loss they computed): one line,
    exit code 4, on every process; the run stops rather than train on inconsistent replicas."""

    exit_code = 4
