"""Text domains found offline on a Debian machine, split by file, and the evaluation sets made from them.

Three clearly different domains, each collected deterministically (sorted file lists, a seeded
split), with nothing downloaded:

- ``code``: Python source, the standard library of the running interpreter (``*.py`` under
  ``sysconfig.get_paths()["stdlib"]``, without test suites, ``site-packages`` and
  ``pydoc_data``).
- ``legal``: English licence and copyright text: ``/usr/share/common-licenses/*`` and the
  Debian ``/usr/share/doc/*/copyright`` files. Licence boilerplate repeats across packages, so
  paragraphs are de-duplicated over the whole domain (first occurrence in sorted order wins)
  before the split: no paragraph of a test file also appears in a training file.
- ``docs``: English technical documentation, the manual pages of sections 1, 5, 7 and 8 under
  ``/usr/share/man`` (the auto-generated ``gcloud_*`` reference pages left out), turned from
  roff into plain text by `mergecore.families.roff.roff_to_text` (pure Python, no groff needed)
  and wrapped at 78 columns.

Each domain's documents are split **by file** into train / validation / test with one seeded
permutation, so no text is shared across splits. From the validation and test files come
the evaluation sets: perplexity segments (runs of whole lines, about `segment_chars` long) and
next-line multiple choice questions (a few lines of context; the true next line against lines
of the same length from *other* files of the same domain and split).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from mergecore.errors import MergeError
from mergecore.families.roff import roff_to_text

DOMAINS = ("code", "legal", "docs")
DOMAIN_DESCRIPTIONS = {
    "code": "Python source code (the interpreter's standard library)",
    "legal": "English licence and copyright text (/usr/share/common-licenses, Debian copyright files)",
    "docs": "English technical documentation (manual pages, sections 1, 5, 7, 8)",
}
CODE_EXCLUDE_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}
LICENSES_DIR = Path("/usr/share/common-licenses")
DOC_DIR = Path("/usr/share/doc")
MAN_DIR = Path("/usr/share/man")
MAN_SECTIONS = ("1", "5", "7", "8")
MAN_EXCLUDE_PREFIXES = ("gcloud",)
MIN_DOC_CHARS = 200


@dataclass(frozen=True)
class Doc:
    """One source file of a domain: `source` names it (stable, relative), `text` is its content."""

    source: str
    text: str


# ---------------------------------------------------------------------------------------------
# file lists (sorted) and readers


def evenly(items: list[Any], limit: Optional[int]) -> list[Any]:
    """`limit` items spread evenly over the sorted list (all when limit is None or large)."""
    if limit is None or limit >= len(items):
        return items
    if limit <= 0:
        return []
    idx = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


def read_text(path: Path) -> Optional[str]:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_files(root: Optional[Path] = None) -> list[tuple[str, Path]]:
    root = Path(root) if root is not None else stdlib_dir()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if CODE_EXCLUDE_PARTS & set(rel.parts) or not p.is_file():
            continue
        out.append((f"python-stdlib/{rel.as_posix()}", p))
    return out


def legal_files(licenses: Path = LICENSES_DIR, docs: Path = DOC_DIR) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    cands = [(f"common-licenses/{p.name}", p) for p in sorted(licenses.iterdir())] if licenses.is_dir() else []
    if docs.is_dir():
        cands += [(f"doc/{d.name}/copyright", d / "copyright") for d in sorted(docs.iterdir())]
    for name, p in cands:
        try:
            real = p.resolve()
        except OSError:
            continue
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        out.append((name, p))
    return out


def man_files(root: Path = MAN_DIR) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for sec in MAN_SECTIONS:
        d = root / f"man{sec}"
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.name.startswith(MAN_EXCLUDE_PREFIXES) or p.is_symlink() or not p.is_file():
                continue
            real = p.resolve()
            if real in seen:
                continue
            seen.add(real)
            out.append((f"man/man{sec}/{p.name}", p))
    return out


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def dedupe_paragraphs(docs: list[Doc]) -> list[Doc]:
    """Drop every paragraph (blank-line separated, compared whitespace-insensitively) seen in an earlier document."""
    seen: set[bytes] = set()
    out = []
    for d in docs:
        keep = []
        for para in _paragraphs(d.text):
            key = hashlib.sha1(" ".join(para.split()).lower().encode()).digest()
            if key in seen:
                continue
            seen.add(key)
            keep.append(para.rstrip())
        text = "\n\n".join(keep).strip("\n")
        if len(text) >= MIN_DOC_CHARS:
            out.append(Doc(d.source, text + "\n"))
    return out


def collect_domain(domain: str, max_files: Optional[int] = None) -> list[Doc]:
    """The domain's documents in sorted order (`max_files`: that many files spread over the sorted list)."""
    if domain == "code":
        files = evenly(code_files(), max_files)
        docs = [Doc(s, t) for s, p in files if (t := read_text(p)) is not None and len(t.strip()) >= MIN_DOC_CHARS]
        where = f"Python standard library at {stdlib_dir()}"
    elif domain == "legal":
        files = evenly(legal_files(), max_files)
        docs = dedupe_paragraphs([Doc(s, _clean_legal(t)) for s, p in files if (t := read_text(p)) is not None])
        where = f"{LICENSES_DIR} and {DOC_DIR}/*/copyright"
    elif domain == "docs":
        files = evenly(man_files(), max_files)
        docs = []
        for s, p in files:
            t = read_text(p)
            if t is None:
                continue
            t = roff_to_text(t)
            if len(t) >= MIN_DOC_CHARS:
                docs.append(Doc(s, t))
        where = f"manual pages under {MAN_DIR}/man{{{','.join(MAN_SECTIONS)}}}"
    else:
        raise MergeError(f"unknown text domain '{domain}'; known: {', '.join(DOMAINS)}")
    if len(docs) < 3:
        raise MergeError(f"text domain '{domain}': found only {len(docs)} usable files in the {where}; "
                         f"at least 3 are needed (one per split)")
    return docs


def _clean_legal(text: str) -> str:
    # tabs and form feeds in old licence files; keep line structure
    return text.replace("\f", "\n").expandtabs(8)


# ---------------------------------------------------------------------------------------------
# splits by file


def split_docs(docs: Sequence[Doc], *, val_fraction: float, test_fraction: float, seed: int,
               domain: str) -> dict[str, list[Doc]]:
    """A seeded split of the documents by file: {'train', 'val', 'test'} (each in sorted order, non-empty)."""
    n = len(docs)
    n_test = max(1, int(round(n * test_fraction)))
    n_val = max(1, int(round(n * val_fraction)))
    if n_test + n_val >= n:
        raise MergeError(f"text domain '{domain}': {n} files cannot be split into train / val / test "
                         f"({n_test} test and {n_val} validation files leave none for training)")
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    perm = rng.permutation(n)
    parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    return {k: [docs[i] for i in sorted(v.tolist())] for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# training text


def training_sample(docs: Sequence[Doc], *, max_chars: int, max_doc_chars: int, seed: int, domain: str) -> list[Doc]:
    """A seeded sample of the training files (each cut to `max_doc_chars`, at a line end) totalling about `max_chars`."""
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode()), 1])
    out: list[Doc] = []
    total = 0
    for i in rng.permutation(len(docs)):
        if total >= max_chars:
            break
        d = docs[int(i)]
        text = _cut_at_line(d.text, min(max_doc_chars, max_chars - total))
        if text.strip():
            out.append(Doc(d.source, text))
            total += len(text)
    return out


def _cut_at_line(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[:cut + 1] if cut > limit // 2 else text[:limit]


# ---------------------------------------------------------------------------------------------
# evaluation sets


def segments(docs: Sequence[Doc], *, count: int, segment_chars: int, seed: int, domain: str,
             split: str) -> list[dict[str, str]]:
    """`count` text segments (runs of whole lines, about `segment_chars` long) drawn from the
    documents with a fixed seed, at most a few per file, in document order."""
    cands: list[tuple[int, str]] = []
    for di, d in enumerate(docs):
        cur: list[str] = []
        size = 0
        for line in d.text.split("\n"):
            if len(line) > segment_chars:
                line = line[:segment_chars]
            cur.append(line)
            size += len(line) + 1
            if size >= segment_chars:
                seg = "\n".join(cur).strip("\n")
                if len(seg.strip()) >= segment_chars // 3:
                    cands.append((di, seg))
                cur, size = [], 0
        seg = "\n".join(cur).strip("\n")
        if len(seg.strip()) >= segment_chars // 3:
            cands.append((di, seg))
    if not cands:
        raise MergeError(f"text domain '{domain}': the {split} files give no text segment")
    chosen = sorted(_spread(cands, count, np.random.default_rng([seed, zlib.crc32(f"{domain}/{split}/seg".encode())])))
    return [{"text": cands[i][1], "source": docs[cands[i][0]].source} for i in chosen]


def _spread(cands: list[tuple[int, Any]], count: int, rng: np.random.Generator) -> list[int]:
    """Indices of `count` candidates in pick order: files visited round-robin in a seeded order, a
    random candidate of each per round (so the picks spread over as many files as possible)."""
    by_doc: dict[int, list[int]] = {}
    for i, (di, _) in enumerate(cands):
        by_doc.setdefault(di, []).append(i)
    for v in by_doc.values():
        rng.shuffle(v)
    order = [int(d) for d in rng.permutation(sorted(by_doc))]
    chosen: list[int] = []
    rnd = 0
    while len(chosen) < count and any(len(by_doc[d]) > rnd for d in order):
        for d in order:
            if len(chosen) >= count:
                break
            if len(by_doc[d]) > rnd:
                chosen.append(by_doc[d][rnd])
        rnd += 1
    return chosen


def _good_line(line: str) -> bool:
    s = line.strip()
    return 20 <= len(s) <= 100 and sum(c.isalnum() for c in s) >= 0.4 * len(s)


def next_line_questions(docs: Sequence[Doc], *, count: int, options: int, context_lines: int, seed: int,
                        domain: str, split: str) -> list[dict[str, Any]]:
    """Multiple choice: which line comes next? Context: the `context_lines` lines before a line
    of 20-100 characters; the other options are lines of about the same length (and, where
    there are enough, the same indentation) taken from other files of the same split (never
    equal to the answer), in a seeded order."""
    rng = np.random.default_rng([seed, zlib.crc32(f"{domain}/{split}/mc".encode())])
    doc_lines = [[ln.rstrip() for ln in d.text.split("\n")] for d in docs]
    pool: list[tuple[int, str]] = []  # (doc, line) distractor candidates, unique text per doc
    cands: list[tuple[int, int]] = []
    for di, lines in enumerate(doc_lines):
        seen: set[str] = set()
        for li, ln in enumerate(lines):
            if not _good_line(ln):
                continue
            if ln.strip() not in seen:
                pool.append((di, ln))
                seen.add(ln.strip())
            ctx = lines[max(0, li - context_lines):li]
            if li >= context_lines and sum(1 for c in ctx if c.strip()) >= 1 and ln.strip() not in {c.strip() for c in ctx}:
                cands.append((di, li))
    if len({d for d, _ in pool}) < 2 or not cands:
        raise MergeError(f"text domain '{domain}': the {split} files are too few for next-line questions")
    lengths = np.asarray([len(ln.strip()) for _, ln in pool])
    indents = [len(ln) - len(ln.lstrip()) for _, ln in pool]
    rows: list[dict[str, Any]] = []
    for ci in _spread(cands, len(cands), rng):
        if len(rows) >= count:
            break
        di, li = cands[ci]
        answer = doc_lines[di][li]
        n = len(answer.strip())
        indent = len(answer) - len(answer.lstrip())
        ok = [int(j) for j in np.flatnonzero(np.abs(lengths - n) <= max(4, 0.25 * n))
              if pool[j][0] != di and pool[j][1].strip() != answer.strip()]
        # same indentation as the answer first (otherwise, in code, the indent alone gives it away)
        same = [j for j in ok if indents[j] == indent]
        other = [j for j in ok if indents[j] != indent]
        distractors: list[str] = []
        for group in (same, other):
            for j in (rng.permutation(group) if group else []):
                t = pool[int(j)][1]
                if t.strip() not in {x.strip() for x in distractors}:
                    distractors.append(t)
                if len(distractors) == options - 1:
                    break
            if len(distractors) == options - 1:
                break
        if len(distractors) < options - 1:
            continue
        choices = distractors[:]
        pos = int(rng.integers(0, options))
        choices.insert(pos, answer)
        context = "\n".join(doc_lines[di][li - context_lines:li])
        rows.append({"context": context, "choices": choices, "answer": pos, "source": docs[di].source})
    if not rows:
        raise MergeError(f"text domain '{domain}': no next-line question could be made from the {split} files")
    rows.sort(key=lambda r: (r["source"], r["context"]))
    return rows


def corpus_sha256(docs: Sequence[Doc]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.source.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()

