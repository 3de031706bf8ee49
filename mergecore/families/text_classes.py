"""Labelled text found offline on a Debian machine: the classification tasks of `minilm-textclass`.

Four tasks, each a question about where a piece of text comes from, each collected
deterministically (sorted file lists, seeded choices) with nothing downloaded:

- ``man_section``: a prose paragraph of a manual page -> its section (1 user commands, 5 file
  formats, 7 overviews and conventions, 8 administration). The pages of
  `text_domains.man_files` (the ``gcloud_*`` reference pages left out), rendered by
  `roff.roff_to_text`; paragraphs under NAME, SYNOPSIS, SEE ALSO, AUTHOR, COPYRIGHT and the like
  are skipped (they name the section or hold no prose).
- ``code_language``: a few lines of source -> the language: Python (the interpreter's standard
  library), C (headers under /usr/include), Perl (modules under /usr/share/perl and perl5, POD
  removed) or shell (scripts with a sh/bash shebang in /usr/bin, /usr/sbin, /etc/init.d and
  the bash completions). Windows mentioning a copyright or licence are skipped.
- ``python_package``: a few lines of the Python standard library -> the part they come from:
  asyncio, email, xml, concurrency (multiprocessing, concurrent), GUI (tkinter, idlelib,
  turtledemo), importlib, unittest or web (http, urllib, wsgiref, html, xmlrpc). The same
  inputs as code_language's Python class, another question about them.
- ``licence``: a paragraph of licence text -> the licence family (GPL, LGPL, BSD, MIT-style,
  Apache, MPL): the ``License:`` stanzas of the machine-readable Debian copyright files (one
  licence named, no "or") and the texts in /usr/share/common-licenses.

In every task a text is kept once (compared whitespace- and case-insensitively, the first
occurrence in sorted file order wins), and a text found under two labels is dropped.

Splits: man pages and source files are split **by file** (no file gives text to two splits),
licence paragraphs one by one, all with one seeded permutation per class. Each split keeps at
most a given number of examples per class, spread round-robin over files, so the classes are
balanced where the data allows and no big file dominates.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mergecore.errors import MergeError
from mergecore.families import text_domains
from mergecore.families.roff import roff_to_text

TASKS: dict[str, tuple[str, ...]] = {
    "man_section": ("user commands (1)", "file formats (5)", "overviews (7)", "administration (8)"),
    "code_language": ("Python", "C", "Perl", "shell"),
    "licence": ("GPL", "LGPL", "BSD", "MIT-style", "Apache", "MPL"),
    "python_package": ("asyncio", "email", "xml", "concurrency", "GUI", "importlib", "unittest", "web"),
}
DESCRIPTIONS = {
    "man_section": "which manual section a paragraph of a man page comes from",
    "code_language": "which language a few lines of source code are in",
    "licence": "which licence family a paragraph of licence text belongs to",
    "python_package": "which part of the Python standard library a few lines of its source come from",
}
PY_PACKAGE_LABEL = {"asyncio": 0, "email": 1, "xml": 2, "multiprocessing": 3, "concurrent": 3, "idlelib": 4,
                    "tkinter": 4, "turtledemo": 4, "importlib": 5, "unittest": 6, "http": 7, "urllib": 7,
                    "wsgiref": 7, "html": 7, "xmlrpc": 7}
MAN_SECTION_LABEL = {"1": 0, "5": 1, "7": 2, "8": 3}
MAN_SKIP_HEADINGS = {"NAME", "SYNOPSIS", "SEE ALSO", "AUTHOR", "AUTHORS", "COPYRIGHT", "REPORTING BUGS", "COLOPHON",
                     "LICENSE", "LICENCE", "HISTORY", "AVAILABILITY", "BUGS"}
C_ROOT = Path("/usr/include")
PERL_ROOTS = (Path("/usr/share/perl"), Path("/usr/share/perl5"))
SHELL_DIRS = (Path("/usr/bin"), Path("/usr/sbin"), Path("/etc/init.d"))
SHELL_COMPLETIONS = Path("/usr/share/bash-completion/completions")
SHELL_SHEBANG = re.compile(rb"#!\s*(?:/usr)?/bin/(?:env\s+)?(?:sh|bash|dash)\b")
LICENCE_FAMILIES = (  # (family, pattern on the licence name); the first match wins, so LGPL before GPL
    ("LGPL", re.compile(r"^(LGPL|GNU.?Lesser|GNU.?Library)", re.I)),
    ("GPL", re.compile(r"^(GPL|GNU.?GPL|GNU.?General)", re.I)),
    ("BSD", re.compile(r"^BSD", re.I)),
    ("MIT-style", re.compile(r"^(MIT|Expat|X11|ISC)\b", re.I)),
    ("Apache", re.compile(r"^Apache", re.I)),
    ("MPL", re.compile(r"^MPL", re.I)),
)
COMMON_LICENCES = {"Apache-2.0": "Apache", "BSD": "BSD", "GPL-1": "GPL", "GPL-2": "GPL", "GPL-3": "GPL",
                   "LGPL-2": "LGPL", "LGPL-2.1": "LGPL", "LGPL-3": "LGPL", "MPL-1.1": "MPL", "MPL-2.0": "MPL"}
LEGAL_WORDS = re.compile(r"copyright|licen[cs]e|\(c\)", re.I)


@dataclass(frozen=True)
class Example:
    """One labelled text; `group` is the unit the split goes by (a file, or the paragraph itself)."""

    text: str
    label: int
    source: str
    group: str


# ---------------------------------------------------------------------------------------------
# man_section


def _clip(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars`, at a word boundary where there is one."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars)
    return text[:cut if cut > max_chars // 2 else max_chars]


def _prose(text: str, min_chars: int) -> bool:
    letters = sum(c.isalpha() or c == " " for c in text)
    return len(text) >= min_chars and letters >= 0.8 * len(text)


def man_paragraphs(text: str, *, min_chars: int, max_chars: int) -> list[str]:
    """The prose paragraphs of a rendered man page, each on one line (headings of MAN_SKIP_HEADINGS skipped)."""
    out: list[str] = []
    heading = ""
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if lines and re.fullmatch(r"[A-Z][A-Z0-9 /&-]*", lines[0].strip()):
            heading, lines = lines[0].strip(), lines[1:]
        if not lines or heading in MAN_SKIP_HEADINGS:
            continue
        para = " ".join(" ".join(lines).split())
        if _prose(para, min_chars):
            out.append(_clip(para, max_chars))
    return out


def man_section_examples(*, max_files: Optional[int], per_file: int, min_chars: int, max_chars: int,
                         seed: int) -> list[Example]:
    """Paragraphs of the man pages (`max_files` per section, spread over its sorted list)."""
    by_section: dict[int, list[tuple[str, Path]]] = {}
    for s, p in text_domains.man_files():
        section = s.split("/")[1].removeprefix("man")
        if section in MAN_SECTION_LABEL:
            by_section.setdefault(MAN_SECTION_LABEL[section], []).append((s, p))
    out: list[Example] = []
    for label in sorted(by_section):
        for source, path in text_domains.evenly(by_section[label], max_files):
            raw = text_domains.read_text(path)
            if raw is None:
                continue
            paras = man_paragraphs(roff_to_text(raw), min_chars=min_chars, max_chars=max_chars)
            out += [Example(t, label, source, source) for t in _pick(paras, per_file, seed, source)]
    return unique(out)


def _pick(items: list[str], k: int, seed: int, key: str) -> list[str]:
    """At most `k` of `items` (distinct), chosen with a seed derived from `key`, in their order."""
    items = list(dict.fromkeys(items))
    if len(items) <= k:
        return items
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return [items[i] for i in sorted(rng.choice(len(items), k, replace=False).tolist())]


# ---------------------------------------------------------------------------------------------
# code_language


def _rfiles(roots: Sequence[Path], pattern: str) -> list[Path]:
    out: list[Path] = []
    for r in roots:
        if r.is_dir():
            out += [p for p in sorted(r.rglob(pattern)) if p.is_file() and not p.is_symlink()]
    return out


def _shell_files() -> list[Path]:
    out: list[Path] = []
    for d in SHELL_DIRS:
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            try:
                if p.is_symlink() or not p.is_file():
                    continue
                with open(p, "rb") as f:
                    head = f.read(64)
            except OSError:
                continue
            if SHELL_SHEBANG.match(head):
                out.append(p)
    if SHELL_COMPLETIONS.is_dir():
        out += [p for p in sorted(SHELL_COMPLETIONS.iterdir()) if p.is_file() and not p.is_symlink()]
    return out


def code_files() -> dict[int, list[tuple[str, Path]]]:
    """Label -> (source name, path) of every source file found, in sorted order."""
    stdlib = [(s, p) for s, p in text_domains.code_files()]
    c = [(f"include/{p.relative_to(C_ROOT).as_posix()}", p) for p in _rfiles([C_ROOT], "*.h")]
    perl = [(f"perl/{p.as_posix().lstrip('/')}", p) for p in _rfiles(PERL_ROOTS, "*.pm")]
    shell = [(f"shell/{p.as_posix().lstrip('/')}", p) for p in _shell_files()]
    return {0: stdlib, 1: c, 2: perl, 3: shell}


def code_windows(text: str, *, lines: int, min_chars: int, max_chars: int, perl: bool = False) -> list[str]:
    """Windows of `lines` consecutive lines (blank runs squeezed, a shebang and Perl POD dropped)
    with at least `min_chars` visible characters and no word about copyright or licences."""
    if perl:
        text = re.sub(r"^=[a-zA-Z].*?(^=cut\b.*?$|\Z)", "", text, flags=re.M | re.S)
    rows = [ln.rstrip().expandtabs(4) for ln in text.split("\n")]
    if rows and rows[0].startswith("#!"):
        rows = rows[1:]
    squeezed: list[str] = []
    for ln in rows:
        if ln or (squeezed and squeezed[-1]):
            squeezed.append(ln)
    out = []
    for i in range(0, len(squeezed), lines):
        w = "\n".join(squeezed[i:i + lines]).strip("\n")
        visible = sum(not c.isspace() for c in w)
        if visible >= min_chars and not LEGAL_WORDS.search(w):
            out.append(w[:max_chars])
    return out


def code_language_examples(*, max_files: Optional[int], per_file: int, lines: int, min_chars: int, max_chars: int,
                           seed: int) -> list[Example]:
    out: list[Example] = []
    for label, files in code_files().items():
        for source, path in text_domains.evenly(files, max_files):
            text = text_domains.read_text(path)
            if text is None:
                continue
            wins = code_windows(text, lines=lines, min_chars=min_chars, max_chars=max_chars, perl=label == 2)
            out += [Example(w, label, source, source) for w in _pick(wins, per_file, seed, source)]
    return unique(out)


def python_package_examples(*, per_file: int, lines: int, min_chars: int, max_chars: int,
                            seed: int) -> list[Example]:
    """Windows of the standard library's source, labelled by the package (group) the file is in."""
    out: list[Example] = []
    for source, path in text_domains.code_files():
        parts = source.split("/")
        label = PY_PACKAGE_LABEL.get(parts[1]) if len(parts) > 2 else None
        if label is None or (text := text_domains.read_text(path)) is None:
            continue
        wins = code_windows(text, lines=lines, min_chars=min_chars, max_chars=max_chars)
        out += [Example(w, label, source, source) for w in _pick(wins, per_file, seed, source)]
    return unique(out)


# ---------------------------------------------------------------------------------------------
# licence


def licence_family(name: str) -> Optional[int]:
    """The label of a DEP-5 licence name (None: not one of the families, or a choice of several)."""
    name = name.strip()
    if re.search(r"\bor\b|_or_|\||\band\b|,", name, re.I):
        return None
    for family, pat in LICENCE_FAMILIES:
        if pat.search(name):
            return TASKS["licence"].index(family)
    return None


def dep5_licence_paragraphs(text: str) -> list[tuple[int, str]]:
    """(label, paragraph) of each `License:` stanza with a body in a machine-readable copyright file."""
    out = []
    for m in re.finditer(r"^License:[ \t]*(\S[^\n]*)\n((?:[ \t]+\S[^\n]*\n?|[ \t]*\.[ \t]*\n?)+)", text, re.M):
        label = licence_family(m.group(1))
        if label is None:
            continue
        for para in re.split(r"\n[ \t]*\.[ \t]*(?:\n|$)", m.group(2)):
            out.append((label, para))
    return out


def licence_examples(*, min_chars: int, max_chars: int, licences: Path = text_domains.LICENSES_DIR,
                     docs: Path = text_domains.DOC_DIR) -> list[Example]:
    family = {n: i for i, n in enumerate(TASKS["licence"])}
    raw: list[tuple[int, str, str]] = []  # (label, paragraph, source) in sorted source order
    for name in sorted(COMMON_LICENCES):
        p = licences / name
        if p.is_file() and not p.is_symlink() and (t := text_domains.read_text(p)) is not None:
            raw += [(family[COMMON_LICENCES[name]], para, f"common-licenses/{name}") for para in re.split(r"\n\s*\n", t)]
    seen: set[Path] = set()
    for d in sorted(docs.iterdir()) if docs.is_dir() else []:
        p = d / "copyright"
        if not p.is_file() or p.resolve() in seen:
            continue
        seen.add(p.resolve())
        t = text_domains.read_text(p)
        if t is not None and t.lstrip().startswith("Format:"):
            raw += [(label, para, f"doc/{d.name}/copyright") for label, para in dep5_licence_paragraphs(t)]
    out = []
    for label, para, source in raw:
        text = " ".join(para.split())
        if len(text) >= min_chars:
            text = _clip(text, max_chars)
            out.append(Example(text, label, source, hashlib.sha1(text.lower().encode()).hexdigest()))
    return unique(out)


def unique(examples: Sequence[Example]) -> list[Example]:
    """Each text once (compared whitespace- and case-insensitively; the first occurrence kept), and
    none that occurs under two labels."""
    labels: dict[str, set[int]] = {}
    first: dict[str, Example] = {}
    for e in examples:
        key = " ".join(e.text.lower().split())
        labels.setdefault(key, set()).add(e.label)
        first.setdefault(key, e)
    return [e for key, e in first.items() if len(labels[key]) == 1]


# ---------------------------------------------------------------------------------------------
# splits


def split_examples(examples: Sequence[Example], *, task: str, val_fraction: float, test_fraction: float, seed: int,
                   caps: dict[str, Optional[int]]) -> dict[str, list[Example]]:
    """{'train', 'val', 'test'}: per class, the groups (files) split with a seeded permutation,
    then at most `caps[split]` examples per class taken round-robin over the groups."""
    out: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(TASKS[task]):
        mine = [e for e in examples if e.label == label]
        groups = sorted({e.group for e in mine})
        if len(groups) < 3:
            raise MergeError(f"task '{task}': class '{name}' has {len(groups)} files or paragraphs here; "
                             f"at least 3 are needed (one per split)")
        rng = np.random.default_rng([seed, zlib.crc32(f"{task}/{label}".encode())])
        perm = [groups[i] for i in rng.permutation(len(groups))]
        n_test = max(1, int(round(len(groups) * test_fraction)))
        n_val = max(1, int(round(len(groups) * val_fraction)))
        parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
        for split, part in parts.items():
            order = {g: i for i, g in enumerate(part)}
            chosen = _round_robin([e for e in mine if e.group in order], order, caps.get(split))
            out[split] += chosen
    for split, rows in out.items():
        if not rows:
            raise MergeError(f"task '{task}': the {split} split is empty")
        rows.sort(key=lambda e: (e.label, e.source, e.text))
    return out


def _round_robin(examples: list[Example], order: dict[str, int], cap: Optional[int]) -> list[Example]:
    """Up to `cap` examples: one from each group in `order` per round, groups in that order."""
    by_group: dict[str, list[Example]] = {}
    for e in examples:
        by_group.setdefault(e.group, []).append(e)
    groups = sorted(by_group, key=order.__getitem__)
    out: list[Example] = []
    rnd = 0
    while any(len(by_group[g]) > rnd for g in groups):
        for g in groups:
            if cap is not None and len(out) >= cap:
                return out
            if len(by_group[g]) > rnd:
                out.append(by_group[g][rnd])
        rnd += 1
    return out


def examples_sha256(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.label}\0{e.source}\0{e.text}\0".encode())
    return h.hexdigest()
