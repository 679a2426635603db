"""Real data shipped with installed packages: English sentences and photos. Nothing is downloaded."""

from __future__ import annotations

import importlib
import inspect
import re
import warnings

import numpy as np
import torch

# Standard-library modules whose docstrings are read as English prose, in this fixed order.
_DOC_MODULES = (
    "argparse",
    "asyncio",
    "bisect",
    "calendar",
    "collections",
    "concurrent.futures",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "fractions",
    "ftplib",
    "functools",
    "gzip",
    "heapq",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "multiprocessing",
    "numbers",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "shelve",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-/]+[.!?]$")


def _docstrings():
    for modname in _DOC_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        yield inspect.getdoc(mod) or ""
        for name in sorted(vars(mod)):
            obj = vars(mod)[name]
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            with warnings.catch_warnings():  # some members (typing.io, typing.re) warn when touched
                warnings.simplefilter("ignore", DeprecationWarning)
                yield inspect.getdoc(obj) or ""


def stdlib_sentences(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Prose sentences from standard-library docstrings, deduplicated, in a fixed order."""
    seen, out = set(), []
    for doc in _docstrings():
        for para in doc.split("\n\n"):
            text = " ".join(para.split())
            for sentence in _SENTENCE_END.split(text):
                n = len(sentence.split())
                if min_words <= n <= max_words and _PROSE.match(sentence) and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return out


def split_sentences(n_calib: int, n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sentences, shuffled with ``seed``."""
    sentences = stdlib_sentences()
    if len(sentences) < n_calib + n_eval:
        raise ValueError(f"only {len(sentences)} sentences available, {n_calib + n_eval} requested")
    order = np.random.default_rng(seed).permutation(len(sentences))
    chosen = [sentences[i] for i in order[: n_calib + n_eval]]
    return chosen[:n_calib], chosen[n_calib:]


def photos() -> dict[str, np.ndarray]:
    """Real RGB photos bundled with scikit-image and scikit-learn (uint8, HxWx3)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        out[name] = np.asarray(getattr(skimage.data, name)())
    for fname, img in zip(("china", "flower"), load_sample_images().images):
        out[fname] = np.asarray(img)
    return out


def crops(images: list[np.ndarray], n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` random square crops (30-100% of the short side), resized to ``size``, half flipped. uint8->float."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        patch = torch.from_numpy(np.ascontiguousarray(img[y : y + side, x : x + side])).permute(2, 0, 1)
        patch = patch[None].float()
        patch = torch.nn.functional.interpolate(patch, size=(size, size), mode="bilinear", antialias=True)[0]
        if rng.random() < 0.5:
            patch = patch.flip(-1)
        out.append(patch)
    return torch.stack(out)
