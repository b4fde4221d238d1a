"""An offline English text corpus: sentences from the standard library's documentation.

The docstrings of a list of stdlib modules, their classes and methods, and the language
reference topics that ship with Python (``pydoc_data.topics``): real prose, not templates,
available on every machine with Python, no download (about 7,700 unique sentences).
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings

MODULES = (
    "argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "functools", "http.client",
    "json", "logging", "os", "pathlib", "random", "re", "shutil", "socket", "sqlite3", "statistics",
    "string", "subprocess", "tarfile", "textwrap", "threading", "unittest", "urllib.request", "zipfile",
    "heapq", "itertools", "calendar", "difflib", "fractions", "ftplib", "gzip", "hashlib", "imaplib",
    "inspect", "locale", "mailbox", "pickle", "pprint", "queue", "sched", "smtplib", "ssl", "tempfile",
    "timeit", "turtle", "typing", "uuid", "wave", "xml.dom.minidom", "configparser", "contextlib",
)
_SENT = re.compile(r"(?<=[.!?])\s+")


def sentences(min_words: int = 5, max_words: int = 40, seed: int = 0) -> list[str]:
    """Unique docstring sentences, shuffled with ``seed``."""
    seen: set[str] = set()
    out: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - an optional stdlib module (turtle needs tk)
                continue
            docs = [inspect.getdoc(mod) or ""]
            for _, obj in inspect.getmembers(mod):
                if inspect.isfunction(obj) or inspect.isclass(obj):
                    docs.append(inspect.getdoc(obj) or "")
                if inspect.isclass(obj):
                    docs.extend(_method_docs(obj))
            _add(docs, seen, out, min_words, max_words)
        from pydoc_data.topics import topics

        _add(list(topics.values()), seen, out, min_words, max_words)
    random.Random(seed).shuffle(out)
    return out


AREAS = {
    "network": ("socket", "http.client", "ftplib", "imaplib", "smtplib", "ssl", "urllib.request", "email"),
    "files": ("os", "pathlib", "shutil", "tarfile", "zipfile", "gzip", "tempfile", "mailbox"),
    "concurrency": ("asyncio", "threading", "queue", "sched", "subprocess"),
    "text": ("re", "string", "textwrap", "difflib", "json", "csv", "pprint", "configparser", "xml.dom.minidom"),
    "numbers_and_time": ("decimal", "fractions", "statistics", "random", "datetime", "calendar", "heapq",
                         "timeit"),
}
"""Library areas and their modules: which area a docstring sentence comes from is a text task."""


def labelled_sentences(min_words: int = 5, max_words: int = 40, seed: int = 0) -> list[tuple[str, str]]:
    """(sentence, area) for the docstrings of the modules of each area in `AREAS` and of the classes,
    functions and methods they define (not those they import); a sentence found in two areas is dropped."""
    by_area: dict[str, list[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for area, modules in AREAS.items():
            seen: set[str] = set()
            out: list[str] = []
            for name in modules:
                mod = importlib.import_module(name)
                root = name.split(".")[0]
                docs = [inspect.getdoc(mod) or ""]
                for _, obj in inspect.getmembers(mod):
                    own = str(getattr(obj, "__module__", "") or "").split(".")[0] in (root, "_" + root)
                    if (inspect.isfunction(obj) or inspect.isclass(obj)) and own:
                        docs.append(inspect.getdoc(obj) or "")
                        if inspect.isclass(obj):
                            docs.extend(_method_docs(obj))
                _add(docs, seen, out, min_words, max_words)
            by_area[area] = out
    counts: dict[str, int] = {}
    for out in by_area.values():
        for s in out:
            counts[s] = counts.get(s, 0) + 1
    rows = [(s, area) for area, out in by_area.items() for s in out if counts[s] == 1]
    random.Random(seed).shuffle(rows)
    return rows


def _method_docs(cls: type) -> list[str]:
    docs = []
    for _, member in inspect.getmembers(cls):
        if inspect.isfunction(member) or inspect.ismethoddescriptor(member) or inspect.ismethod(member):
            try:
                docs.append(inspect.getdoc(member) or "")
            except Exception:  # noqa: BLE001 - an odd descriptor
                continue
    return docs


def _add(docs: list[str], seen: set[str], out: list[str], min_words: int, max_words: int) -> None:
    for doc in docs:
        text = " ".join(doc.split())
        for s in _SENT.split(text):
            words = s.split()
            if min_words <= len(words) <= max_words and s[0].isupper() and s not in seen:
                seen.add(s)
                out.append(s)


if __name__ == "__main__":
    s = sentences()
    print(len(s))
    print("\n".join(s[:5]))
