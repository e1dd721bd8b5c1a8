"""WordNet for METEOR without a network: found in nltk's data path, or built from Debian's packages (data.md §5).

PyPI has no usable WordNet data and ``nltk.download`` needs the network, so the corpus is assembled once from the
Debian packages ``wordnet-base`` and ``wordnet-sense-index`` (WordNet 3.0 in ``/usr/share/wordnet``;
``scripts/install_wordnet.sh`` installs them):

1. ``lexnames`` (absent from the packages, read by nltk at load time) is generated from the packaged man page
   ``lexnames(5WN)``: 45 lines ``NN<TAB>name<TAB>syntactic category`` (noun 1, verb 2, adj 3, adv 4).
2. The ``.exc``, ``data.*``, ``index.*`` (``index.sense`` included), ``cntlist.rev`` files are **copied**, not linked
   (nltk 3.10 rejects symlinks escaping the data root), into ``$PERCAUSAL_CACHE/nltk_data/corpora/wordnet``
   (default cache ``~/.cache/percausal``), 35 MB.

The copy is built in a temporary directory and renamed into place under a file lock, so parallel processes build it
once and never see half a corpus. :func:`load` prefers that copy, then a WordNet already in nltk's data path (e.g.
from ``nltk.download("wordnet")``), then builds the copy; loading the reader takes a few seconds, once per process.
"""

from __future__ import annotations

import functools
import gzip
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from percausal_jax.atomic import atomic_dir
from percausal_jax.errors import UserError
from percausal_jax.hf.gguf import cache_dir

if TYPE_CHECKING:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

DEBIAN_DIR = Path("/usr/share/wordnet")
LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
FILES = tuple(f"{kind}.{pos}" for kind in ("data", "index") for pos in ("adj", "adv", "noun", "verb")) + tuple(
    f"{pos}.exc" for pos in ("adj", "adv", "noun", "verb")) + ("index.sense", "cntlist.rev")
N_LEXNAMES = 45
INSTALL_HINT = ("install it with `sudo apt-get install -y wordnet-base wordnet-sense-index` or "
                "`sudo bash scripts/install_wordnet.sh` (Debian/Ubuntu), or with `python -m nltk.downloader wordnet` "
                "where the network is reachable")


def corpus_dir() -> Path:
    """Where the copy built from the Debian files lives: ``<cache>/nltk_data/corpora/wordnet``."""
    return cache_dir() / "nltk_data" / "corpora" / "wordnet"


def available() -> bool:
    """True when :func:`load` will succeed (a built copy, nltk's own WordNet, or the Debian files to build one)."""
    return _complete(corpus_dir()) or _nltk_wordnet() is not None or _missing_sources() is None


def load() -> WordNetCorpusReader:
    """The WordNet reader, building the cached copy first when needed; raises :class:`UserError` when impossible."""
    dest = corpus_dir()
    if not _complete(dest):
        found = _nltk_wordnet()
        if found is not None:
            return _reader(found)
        missing = _missing_sources()
        if missing is not None:
            raise UserError(f"WordNet (needed for METEOR) not found: {missing}; {INSTALL_HINT}; "
                            "or pass --no-meteor to skip METEOR")
        _build(dest)
    import nltk.data

    data_root = str(dest.parents[1])
    if data_root not in nltk.data.path:  # nltk opens files only under its data path
        nltk.data.path.append(data_root)
    return _reader(str(dest))


@functools.cache
def _reader(root: str) -> WordNetCorpusReader:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class Reader(WordNetCorpusReader):
        def map_wn(self, version: str = "wordnet") -> dict | None:
            """None (no mapping) for WordNet 3.0 itself. nltk compares the loaded version ("3.0") with the corpus
            name ("wordnet"), so it maps 3.0 onto itself (half the load time) for multilingual data never used here."""
            return None if self.get_version() == "3.0" else super().map_wn(version)

    with warnings.catch_warnings():  # "multilingual functions are not available": no Open Multilingual Wordnet
        warnings.simplefilter("ignore", UserWarning)
        return Reader(root, None)


def _complete(d: Path) -> bool:
    return all((d / name).is_file() for name in (*FILES, "lexnames"))


def _nltk_wordnet() -> str | None:
    """A WordNet in nltk's data path (directory or ``wordnet.zip``), as a path string the reader accepts."""
    import nltk.data

    for name in ("corpora/wordnet", "corpora/wordnet.zip/wordnet/"):  # as nltk.corpus.wordnet looks
        try:
            found = nltk.data.find(name)
        except LookupError:
            continue
        if isinstance(found, nltk.data.ZipFilePathPointer):
            return f"{found.zipfile.filename}/{found.entry}"
        return found.path
    return None


def _missing_sources() -> str | None:
    """Why the Debian files cannot be used, or None when they all are there."""
    if not DEBIAN_DIR.is_dir():
        return f"{DEBIAN_DIR} does not exist"
    missing = [name for name in FILES if not (DEBIAN_DIR / name).is_file()]
    if missing:
        return f"{DEBIAN_DIR} lacks {', '.join(missing)}"
    if not LEXNAMES_MAN.is_file():
        return (f"{LEXNAMES_MAN} is missing (minimized images exclude man pages; scripts/install_wordnet.sh "
                "reinstalls wordnet-base with that page)")
    return None


def _build(dest: Path) -> None:
    from filelock import FileLock

    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if _complete(dest):  # another process built it while we waited
            return
        with atomic_dir(dest) as tmp:
            for name in FILES:
                shutil.copyfile(DEBIAN_DIR / name, tmp / name)
            (tmp / "lexnames").write_text(lexnames(LEXNAMES_MAN))


def lexnames(man_page: Path) -> str:
    """The ``lexnames`` file from the ``lexnames(5WN)`` man page (the awk recipe of data.md §5)."""
    lines = []
    with gzip.open(man_page, "rt", encoding="utf-8") as f:
        for row in f:
            m = re.match(r"(\d\d)\t([^\t]*)\t", row)
            if m:
                name = m.group(2).replace(" ", "")
                category = {"noun": 1, "verb": 2, "adj": 3}.get(name.split(".")[0], 4)
                lines.append(f"{m.group(1)}\t{name}\t{category}\n")
    if len(lines) != N_LEXNAMES:
        raise UserError(f"{man_page}: expected {N_LEXNAMES} lexicographer files, found {len(lines)}")
    return "".join(lines)
