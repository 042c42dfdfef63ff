"""A small English/technical text corpus that exists wherever CPython 3.11 does: the docstrings
of a fixed list of standard-library modules.

One *document* per module: its own docstring, then each public function's and class's own
docstring (and those of a class's public methods), in sorted order. Only ``__doc__`` attributes
are read (never signatures, whose default-value reprs can hold memory addresses), in a fresh
interpreter that imports nothing else, so the text is the same in every process on a machine. Other CPython patch versions may word a docstring
differently; ``corpus_fingerprint`` records which text a run saw, for information only.

The module list is fixed and sorted, and holds only modules whose import has no visible side
effect (no ``this``, ``antigravity``, ``tkinter``, ``turtle``, ``idlelib``, ``webbrowser``).
Modules are split into train / held-out by a hash of their name, so no held-out text is ever
trained on.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

MODULES = (
    "abc", "argparse", "array", "ast", "base64", "bisect", "bz2", "calendar", "cmath", "codecs",
    "collections", "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "email.message", "enum", "filecmp", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "html", "html.parser", "http.client", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma",
    "mailbox", "math", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "quopri", "random", "re",
    "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "tokenize", "traceback", "types", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "zipfile", "zlib",
)

SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 10  # one bucket in ten of module names is held out
DOC_SEPARATOR = "\n\n"


def is_heldout_module(name: str) -> bool:
    """Fixed ~10% of modules (by CRC32 of the name) never appear in the train split."""
    return zlib.crc32(name.encode()) % HELDOUT_BUCKETS == 0


def _normalise(doc: str) -> str:
    # Tabs and trailing spaces vary with how a docstring was typed; blank-line runs carry nothing.
    # Control characters become spaces so the stream can use bytes 0x01/0x02 as BOS/EOS sentinels.
    doc = inspect.cleandoc(doc).expandtabs(4)
    doc = re.sub(r"[\x00-\x09\x0b-\x1f\x7f]", " ", doc)
    doc = "\n".join(line.rstrip() for line in doc.splitlines())
    return re.sub(r"\n{3,}", "\n\n", doc).strip()


def _own_doc(obj) -> str | None:
    doc = getattr(obj, "__doc__", None)
    return _normalise(doc) if isinstance(doc, str) and doc.strip() else None


def _defined_here(obj, module_name: str) -> bool:
    # Only what the module (or its C accelerator `_name`) defines itself: re-exports would repeat
    # text, and objects that other code patched in at run time (pytest replaces
    # threading.excepthook, for one) would make the text depend on what else the process imported.
    owner = getattr(obj, "__module__", None)
    return owner is None or owner.lstrip("_") in (module_name, module_name.replace(".", "_"))


def _public_members(module) -> list[tuple[str, object]]:
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    members = [(n, getattr(module, n, None)) for n in sorted(set(names))]
    return [(n, v) for n, v in members if (inspect.isclass(v) or inspect.isroutine(v))
            and getattr(v, "__module__", None) is not None and _defined_here(v, module.__name__)]


def _module_document(name: str) -> str:
    module = importlib.import_module(name)
    parts = [f"Module {name}."]
    if doc := _own_doc(module):
        parts.append(doc)
    for member_name, obj in _public_members(module):
        if doc := _own_doc(obj):
            parts.append(f"{name}.{member_name}:\n{doc}")
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                if attr.startswith("_"):
                    continue
                method = getattr(obj, attr, None)
                # A data attribute would repeat its type's docstring (str's, int's) over and over.
                if not (inspect.isroutine(method) or isinstance(method, property)):
                    continue
                if _defined_here(method, name) and (doc := _own_doc(method)):
                    parts.append(f"{name}.{member_name}.{attr}:\n{doc}")
    return DOC_SEPARATOR.join(parts)


def _documents_in_this_process() -> dict[str, str]:
    return {name: _module_document(name) for name in MODULES}


_WORKER = ("import json, sys; from twotower_jax.data import corpus; "
           "sys.stdout.write(json.dumps(corpus._documents_in_this_process()))")


@functools.lru_cache(maxsize=None)
def _all_documents() -> dict[str, str]:
    """Collected in a fresh interpreter that imports nothing else: libraries patch standard-library
    functions when imported (torch replaces `inspect.getfile`), which would make the text depend on what
    this process happened to import before."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _WORKER], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"collecting the stdlib docstring corpus failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def corpus_documents(split: str = "train") -> list[str]:
    """The documents of ``split`` ("train", "heldout" or "all"), one per module, in ``MODULES``
    order."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
    docs = _all_documents()
    return [docs[name] for name in MODULES
            if split == "all" or (split == "heldout") == is_heldout_module(name)]


@functools.lru_cache(maxsize=None)
def load_corpus(max_bytes: int | None = None, split: str = "train") -> str:
    """The documents of ``split`` joined by blank lines, cut to at most ``max_bytes`` UTF-8 bytes
    (never inside a character)."""
    text = DOC_SEPARATOR.join(corpus_documents(split))
    if max_bytes is not None:
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return text


def corpus_fingerprint(split: str = "all") -> str:
    """SHA-256 of the UTF-8 corpus text; may differ between CPython versions (information only)."""
    return hashlib.sha256(load_corpus(split=split).encode("utf-8")).hexdigest()
