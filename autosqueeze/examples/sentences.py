"""Real English sentences, offline and deterministic: drawn from the docstrings that ship
with Python's standard library (no download, no extra package).

Docstrings of a fixed list of modules and their public members are split into sentences;
a sentence is kept if it is 6-30 words of plain prose (letters, spaces and light
punctuation; no code, markup or identifiers). Duplicates are dropped and the rest ordered
by a hash of their text, so the same Python version always yields the same list.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from functools import cache

MODULES = (
    "argparse asyncio base64 bisect calendar cmd codecs collections concurrent.futures "
    "configparser contextlib copy csv datetime decimal difflib email enum fileinput fnmatch "
    "fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac html http.client "
    "http.server imaplib inspect io ipaddress itertools json locale logging lzma mailbox "
    "mimetypes multiprocessing numbers operator optparse os pathlib pickle pkgutil platform "
    "poplib pprint queue random re sched secrets selectors shelve shlex shutil signal smtplib "
    "socket socketserver sqlite3 ssl statistics string struct subprocess tarfile tempfile "
    "textwrap threading timeit tokenize trace traceback turtle typing unittest urllib.parse "
    "urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile "
    "zoneinfo"
).split()

_PROSE = re.compile(r"^[A-Z][A-Za-z ,;'\-]+[.]$")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@cache
def sentences() -> tuple[str, ...]:
    """Every kept sentence, in a fixed pseudo-random order."""
    seen: dict[str, None] = {}
    for text in _docstrings():
        for sentence in _SPLIT.split(" ".join(text.split())):
            if 6 <= len(sentence.split()) <= 30 and _PROSE.match(sentence):
                seen.setdefault(sentence, None)
    return tuple(sorted(seen, key=lambda s: hashlib.sha1(s.encode()).hexdigest()))


def split(calibration: int = 512) -> tuple[list[str], list[str]]:
    """(calibration, validation): the first ``calibration`` sentences and the rest."""
    every = list(sentences())
    return every[:calibration], every[calibration:]


def _docstrings() -> list[str]:
    texts = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. a module this build of Python lacks (turtle without Tk)
            continue
        texts.append(inspect.getdoc(module) or "")
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            if attr.startswith("_"):
                continue
            member = getattr(module, attr, None)
            if inspect.isclass(member) or inspect.isfunction(member):
                texts.append(inspect.getdoc(member) or "")
                if inspect.isclass(member):
                    for _, method in sorted(vars(member).items()):
                        if inspect.isfunction(method):
                            texts.append(inspect.getdoc(method) or "")
    return texts


if __name__ == "__main__":  # pragma: no cover - a look at the corpus
    calib, valid = split()
    print(f"{len(sentences())} sentences: {len(calib)} calibration, {len(valid)} validation")
    for s in valid[:10]:
        print(" -", s)
