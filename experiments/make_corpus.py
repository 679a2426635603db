"""Build mpsearch/models/data/corpus.txt: the pinned English text every zoo model calibrates and evaluates on.

The sentences are prose from CPython 3.11's own documentation (module docstrings and the language
reference topics in ``pydoc_data``), under the PSF license. They were read from the standard library once
and frozen in the file, because the docstrings differ between Python versions (1214 to 1281 sentences on
3.10-3.13 for the same modules): the committed file is what every supported Python reads, and a test
checks its fingerprint. Re-running this script on another Python gives a different file: don't commit it
unless the fingerprint in mpsearch/models/sources.py is updated on purpose.

    python experiments/make_corpus.py            # rewrites the file
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "mpsearch" / "models" / "data" / "corpus.txt"
MODULES = (
    "argparse asyncio bisect calendar collections concurrent.futures contextlib csv dataclasses datetime decimal "
    "difflib email.message enum fractions ftplib functools gzip heapq http.client http.server imaplib inspect "
    "ipaddress itertools json logging mailbox multiprocessing numbers optparse os pathlib pickle pprint queue "
    "random re sched shelve shutil smtplib socket socketserver statistics string subprocess tarfile tempfile "
    "textwrap threading timeit tokenize traceback typing unittest urllib.parse urllib.request uuid warnings "
    "weakref xml.dom.minidom zipfile abc ast base64 codecs copy dis doctest filecmp fnmatch glob hashlib hmac "
    "html io locale mimetypes operator pdb platform plistlib pydoc selectors shlex signal sqlite3 ssl stat "
    "struct symtable sysconfig trace tracemalloc types wave zipimport lzma bz2 array math time builtins gc"
).split()
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-/]+[.!?]$")


def texts():
    for name in MODULES:
        mod = importlib.import_module(name)
        yield inspect.getdoc(mod) or ""
        for attr in sorted(vars(mod)):
            obj = vars(mod)[attr]
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            with warnings.catch_warnings():  # some members (typing.io, typing.re) warn when touched
                warnings.simplefilter("ignore", DeprecationWarning)
                yield inspect.getdoc(obj) or ""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    seen, out = set(), []
    for doc in texts():
        for para in doc.split("\n\n"):
            for sentence in SENTENCE_END.split(" ".join(para.split())):
                n = len(sentence.split())
                if min_words <= n <= max_words and PROSE.match(sentence) and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return out


if __name__ == "__main__":
    found = sentences()
    OUT.write_text("\n".join(found) + "\n")
    print(f"{len(found)} sentences, {sum(len(s.split()) for s in found)} words -> {OUT}")
