"""`mergecore eval --init-tasks DIR`: DIR/tasks.yml (test split) and DIR/tasks-val.yml (validation
split) scaffolded from the data files (.jsonl .json .csv .tsv .parquet .txt) in DIR and its
sub-folders, one level down; model folders (a config.json inside) are never searched for data.

Files `NAME-val.jsonl`, `NAME_test.csv`, `NAME.val.jsonl` (or `val.jsonl` in a folder NAME;
`NAME-test-REST.jsonl` is task NAME-REST) are one task NAME, scored on its test file in
tasks.yml and its val file in tasks-val.yml; `-train` files are named in a comment (for DAM's
`train_tasks`), never scored; a task with one scored file gets a seeded shuffled `split:` of it
(stratified by label for classification). A text column and a label column make a
`classification` task (string labels get `label_names`, in the order of the matching expert's
`id2label`, else sorted); a model folder whose name contains the task's name and that has a
classifier head becomes its `head_from`. A .txt file or records with only a text column make an
`lm` task; prompt/answer columns a `generation` task; a list column (choices, options, endings)
with an answer column a `multiple_choice` task. Every guess is a comment
beside its field. Reading is bounded (`MAX_FILES` files, `LABEL_BYTES` and `MAX_ROWS` of each);
the text is checked with `parse_tasks` before it is written, atomically, and existing files are
kept unless `overwrite`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from mergecore.errors import MergeError, clip
from mergecore.eval.scaffold_out import FoundTask, render, write_new

__all__ = ["FoundTask", "init_tasks"]

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
            ".parquet": "parquet", ".pq": "parquet", ".txt": "txt"}
MAX_FILES = 200            # data files looked at, in all
MAX_ENTRIES = 5000         # directory entries read per folder
MAX_MODELS = 64            # model folders whose heads are looked at
SAMPLE_ROWS = 300          # rows that decide the columns and the kind
LABEL_BYTES = 8 * 1000**2  # bytes of each file read (labels are collected from all of them)
MAX_ROWS = 200_000         # rows read from one file
VAL_FRACTION = 0.2
TEXT_COLUMNS = ("text", "sentence", "content", "document", "body", "review", "passage", "utterance", "tweet",
                "comment", "message", "abstract", "snippet", "paragraph")
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "gold", "intent", "topic", "sentiment", "tag", "y")
PAIRS = (("question", "answer"), ("prompt", "completion"), ("prompt", "answer"), ("prompt", "response"),
         ("input", "output"), ("instruction", "response"), ("instruction", "output"), ("query", "answer"))
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
          "test": "test", "testing": "test"}
NOT_DATA = {"readme", "license", "licence", "copying", "notice", "authors", "changelog", "requirements"}
HEAD_PREFIXES = ("classifier.", "score.")
_WORD = r"(?P<split>" + "|".join(SPLITS) + r")"
# NAME-test.jsonl first, then NAME-test-REST.jsonl (task NAME-REST)
_SPLIT_RES = (re.compile(r"^(?P<name>.+)[-_.]" + _WORD + "$", re.I),
              re.compile(r"^(?P<name>.+?)(?P<sep>[-_.])" + _WORD + r"[-_.](?P<rest>.+)$", re.I))
CHOICES = ("choices", "options", "endings", "candidates")
CONTEXTS = ("context", "question", "prompt", "query", "ctx", "stem")


# ---------------------------------------------------------------------------------------------
# finding files and models


def _entries(folder: Path) -> list[Path]:
    out = []
    try:
        with os.scandir(folder) as it:
            for i, e in enumerate(it):
                if i >= MAX_ENTRIES:
                    break
                if not e.name.startswith((".", "__")):
                    out.append(Path(e.path))
    except OSError as err:
        raise MergeError(f"cannot list {folder}: {err.strerror or err}") from None
    return sorted(out)


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _head(folder: Path) -> Optional[dict[str, Any]]:
    """{prefix, num_labels, id2label} of a checkpoint with a classifier head, or None."""
    from mergecore.io.source import ModelSource, read_json_object

    try:  # the config first: the weights' index is only opened for a classifier
        config = read_json_object(folder / "config.json", f"{folder}: config.json")
        archs = config.get("architectures") if isinstance(config.get("architectures"), list) else []
        if not any(isinstance(a, str) and "Classification" in a for a in archs):
            return None
        src = ModelSource(str(folder), folder)
        names = list(src.iter_names())
        src.close()
    except MergeError:
        return None
    prefix = next((p for p in HEAD_PREFIXES if any(n.startswith(p) for n in names)), None)
    if prefix is None:
        return None
    id2label = src.config.get("id2label") or {}
    labels = {int(k): str(v) for k, v in id2label.items() if str(k).isdigit()} if isinstance(id2label, dict) else {}
    positions = src.config.get("max_position_embeddings")
    return {"prefix": prefix, "num_labels": len(labels) or src.config.get("num_labels"), "id2label": labels,
            "max_length": positions if isinstance(positions, int) and positions > 0 else None}


def _group_files(root: Path) -> tuple[dict[tuple[str, str, str], dict[str, Path]], list[Path], list[str]]:
    """File groups {(folder, name, format): {role: path}}, model folders, and what was left out."""
    groups: dict[tuple[str, str, str], dict[str, Path]] = {}
    models: list[Path] = []
    left: list[str] = []
    count = 0
    folders = [root]
    for entry in _entries(root):
        if entry.is_dir():
            (models if _is_model(entry) else folders).append(entry)
    if len(models) > MAX_MODELS:
        left.append(f"more than {MAX_MODELS} model folders: only the first {MAX_MODELS} may give a head_from")
        models = models[:MAX_MODELS]
    for folder in folders:
        for f in _entries(folder):
            fmt = SUFFIXES.get(f.suffix.lower())
            if not f.is_file() or fmt is None or (fmt == "txt" and f.stem.lower() in NOT_DATA):
                continue
            if count >= MAX_FILES:
                left.append(f"more than {MAX_FILES} data files: the rest were not looked at")
                return groups, models, left
            count += 1
            stem = f.name[: -len(f.suffix)]
            m = _SPLIT_RES[0].match(stem) or _SPLIT_RES[1].match(stem)
            if stem.lower() in SPLITS:
                name, role = folder.name, SPLITS[stem.lower()]
            elif m:
                rest = m.groupdict().get("rest")
                name = m.group("name") + (m.group("sep") + rest if rest else "")
                role = SPLITS[m.group("split").lower()]
            else:
                name, role = stem, "whole"
            group = groups.setdefault((str(folder), name, fmt), {})
            if role in group:
                left.append(f"{_rel(f, root)}: a second '{role}' file for '{name}' (kept {_rel(group[role], root)})")
                continue
            group[role] = f
    return groups, models, left


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path.resolve())


def _read_head(path: Path) -> tuple[str, bool]:
    """The first `LABEL_BYTES` of a text file (cut at the last line break), and whether that is all."""
    with open(path, "rb") as f:
        raw = f.read(LABEL_BYTES + 1)
    whole = len(raw) <= LABEL_BYTES
    if not whole:
        raw = raw[: raw.rfind(b"\n", 0, LABEL_BYTES) + 1]
    try:
        return raw.decode("utf-8-sig"), whole
    except UnicodeDecodeError as err:
        raise MergeError(f"not UTF-8 text (byte {err.start})") from None


def _rows(path: Path, fmt: str) -> tuple[list[dict[str, Any]], bool]:
    """Rows of a record file (at most `MAX_ROWS`, from its first `LABEL_BYTES`), and whether that is all."""
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq

            pf, rows, size = pq.ParquetFile(path), [], 0
            for batch in pf.iter_batches(batch_size=1024):
                rows, size = rows + batch.to_pylist(), size + batch.nbytes
                if len(rows) >= MAX_ROWS or size >= LABEL_BYTES:
                    break
            return rows[:MAX_ROWS], len(rows) >= pf.metadata.num_rows
        except ImportError:
            raise MergeError("reading Parquet needs pyarrow: pip install pyarrow") from None
        except Exception as err:
            raise MergeError(f"not a readable Parquet file ({type(err).__name__})") from None
    text, whole = _read_head(path)
    if fmt == "json":
        if not whole:
            raise MergeError(f"a .json file over {LABEL_BYTES / 1e6:g} MB is not inspected; use JSONL")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise MergeError(f"not valid JSON ({clip(err, 80)})") from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list):
            raise MergeError("a JSON object, not a list of records")
        return data[:MAX_ROWS], len(data) <= MAX_ROWS
    if fmt == "jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except (ValueError, RecursionError):
                    raise MergeError(f"line {lineno} is not valid JSON") from None
                if len(rows) >= MAX_ROWS:
                    return rows, False
        return rows, whole
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        rows = [r for _, r in zip(range(MAX_ROWS + 1), reader)]
    except csv.Error as err:
        raise MergeError(f"not valid CSV ({clip(err, 80)})") from None
    whole = whole and len(rows) <= MAX_ROWS
    return rows[:MAX_ROWS] if whole else rows[:-1], whole  # a cut file's last row may be cut too


def _int_like(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.lstrip("-").isdigit())


def _pick(columns: Sequence[str], names: Sequence[str]) -> Optional[str]:
    low = {c.lower(): c for c in columns}
    return next((low[n] for n in names if n in low), None)


def _text_column(rows: list[dict[str, Any]], skip: set[str]) -> tuple[Optional[str], str]:
    cols = [c for c in rows[0] if c not in skip and all(isinstance(r.get(c), str) for r in rows)]
    named = _pick(cols, TEXT_COLUMNS)
    if named:
        return named, f"text column '{named}' (by its name)"
    if not cols:
        return None, ""
    best = max(cols, key=lambda c: sum(len(r[c]) for r in rows))
    return best, f"text column '{best}': the longest string column"


def _max_length(texts: list[str], limit: Optional[int]) -> tuple[int, str]:
    lengths = sorted(len(t) for t in texts)
    p95 = lengths[int(0.95 * (len(lengths) - 1))] if lengths else 0
    n = min(next(k for k in (32, 64, 128, 256, 512) if k >= min(512, p95 / 3)), limit or 512)
    return n, f"tokens kept per text: 95% of the sampled texts have at most {p95} characters (~{p95 // 3} tokens)"


def _classification(t: FoundTask, rows: list[dict[str, Any]], labels: list[Any], whole: bool, text: str,
                    label: str, heads: dict[Path, dict[str, Any]], root: Path) -> None:
    f, n = t.fields, t.notes
    f["input"] = "text"
    f["text_field"], f["label_field"] = text, label
    n["label_field"] = f"label column '{label}' (by its name)"
    values = {v for v in labels if v is not None}
    cut = "" if whole else f" (read from the first {LABEL_BYTES / 1e6:g} MB of each file: add any missing)"
    match = sorted((p for p in heads if t.name.lower() in p.name.lower()), key=lambda p: (len(p.name), p.name))
    head = heads[match[0]] if match else None
    if match:
        f["head_from"] = _rel(match[0], root)
        n["head_from"] = (f"own expert head: model folder named like the task" + (
            f" (also matched: {', '.join(p.name for p in match[1:])})" if len(match) > 1 else ""))
        f.update({"head_prefix": head["prefix"]} if head["prefix"] != "classifier." else {})
    if all(_int_like(v) for v in values):
        n["label_field"] += f": {len(values)} integer labels (label id = the number){cut}"
    else:
        names = sorted(str(v) for v in values)
        order = head["id2label"] if head else {}
        if order and set(names) <= set(order.values()):
            ids = {v: k for k, v in sorted(order.items(), reverse=True)}
            names = sorted(names, key=lambda s: ids[s])
            used = sorted(ids[s] for s in names)
            if used == list(range(len(names))):
                n["label_names"] = f"{len(names)} labels, in the order of {match[0].name}'s id2label{cut}"
                if (head["num_labels"] or 0) > len(names):
                    f["classes"] = used
                    n["classes"] = f"the head has {head['num_labels']} outputs; only these labels occur"
            else:
                names = sorted(names)
                n["label_names"] = (f"{len(names)} labels, sorted: {match[0].name}'s id2label has gaps; "
                                    f"list them in the head's output order{cut}")
        else:
            n["label_names"] = (f"{len(names)} labels, sorted; label id = position in this list, which must be the "
                                f"order of the scoring head's outputs (config.json id2label){cut}")
        f["label_names"] = names
    limit = head["max_length"] if head else None
    f["max_length"], n["max_length"] = _max_length([str(r.get(text, "")) for r in rows], limit)


def _decide(t: FoundTask, rows: list[dict[str, Any]], labels: list[Any], whole: bool,
            heads: dict[Path, dict[str, Any]], root: Path) -> None:
    """Set t.kind / t.fields / t.notes from the sampled rows (or t.problem)."""
    if not rows or not all(isinstance(r, dict) for r in rows):
        t.problem = "no rows" if not rows else "rows are not records (JSON objects / table rows)"
        return
    cols = list(rows[0])
    choices = _pick([c for c in cols if all(isinstance(r.get(c), list) for r in rows)], CHOICES)
    answer = _pick(cols, ("answer", "label", "gold", "target"))
    if choices and answer:
        context, why = (_pick(cols, CONTEXTS), "by its name") if _pick(cols, CONTEXTS) else _text_column(rows, {answer})
        if context is not None:
            t.kind = "multiple_choice"
            t.fields.update(context_field=context, choices_field=choices, answer_field=answer)
            t.notes.update(kind=f"a list column '{choices}' and an answer column '{answer}': the likeliest option wins",
                           context_field=f"context column '{context}' ({why})",
                           choices_field="each option follows choice_prefix (default a space; \"\\n\": next lines)",
                           answer_field="an option's index, letter or text")
            return
    label = _pick(cols, LABEL_COLUMNS)
    if label is not None:
        values = [r.get(label) for r in rows]
        if any(isinstance(v, float) or not isinstance(v, (str, int)) for v in values if v is not None):
            t.problem = f"column '{label}' holds values that are not class labels (numbers with decimals, lists ...)"
            return
        text, why = _text_column(rows, {label})
        if text is None:
            t.problem = f"a label column '{label}' but no text column"
            return
        t.kind = "classification"
        t.notes.update(kind="a text column and a label column", text_field=why)
        _classification(t, rows, labels, whole, text, label, heads, root)
        return
    low = {c.lower(): c for c in cols}
    pair = next((p for p in PAIRS if p[0] in low and p[1] in low), None)
    if pair is not None:
        (prompt, answer), t.kind = (low[pair[0]], low[pair[1]]), "generation"
        t.fields.update(prompt_field=prompt, answer_field=answer)
        t.notes["prompt_field"] = f"'{prompt}'/'{answer}' columns: a prompt and its expected answer"
        answers = [str(a) for r in rows for a in (r[answer] if isinstance(r[answer], list) else [r[answer]])]
        longest = max((len(a) for a in answers), default=1)
        multiline = any("\n" in a for a in answers)
        t.fields.update(max_new_tokens=min(256, max(8, longest // 2)), stop=[] if multiline else ["\n"])
        t.notes["max_new_tokens"] = f"the longest sampled answer has {longest} characters"
        t.notes["stop"] = "answers hold line breaks: no stop string" if multiline else "answers are one line"
        return
    text, why = _text_column(rows, set())
    if text is None:
        t.problem = f"no text, label or prompt/answer columns among {clip(', '.join(map(str, cols)), 120)}"
        return
    t.kind, t.fields["text_field"], t.notes["kind"] = "lm", text, f"{why}, no label column: perplexity"


def _describe(name: str, files: dict[str, Path], root: Path, heads: dict[Path, dict[str, Any]]) -> FoundTask:
    t = FoundTask(name, {role: _rel(p, root) for role, p in files.items()})
    scored = [r for r in ("test", "whole", "val") if r in files]
    if not scored:
        return FoundTask(name, t.files, problem="only a train file: not scored (DAM's train_tasks may name it)")
    test_role = scored[0]
    val_role = "val" if "val" in files and test_role != "val" else ("whole" if test_role == "test" and "whole" in files
                                                                    else None)
    first = files[test_role]
    fmt = SUFFIXES[first.suffix.lower()]
    try:
        if fmt == "txt":
            text, _ = _read_head(first)
            blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
            multi = sum(1 for b in blocks if b.strip().count("\n") >= 1)
            unit = "paragraph" if len(blocks) >= 2 and multi * 2 >= len(blocks) else "line"
            t.kind, t.problem = ("lm", "") if blocks else (None, "an empty text file")
            t.test["txt_unit"] = unit
            t.notes["kind"] = ("a text file: perplexity, one document per paragraph (blank-line separated)"
                               if unit == "paragraph" else "a text file: perplexity, one document per line")
        else:
            rows, every, whole_read = [], [], True
            for role in dict.fromkeys((test_role, val_role or test_role)):
                part, whole = _rows(files[role], SUFFIXES[files[role].suffix.lower()])
                rows, whole_read = rows or part, whole_read and whole
                every += part
            label = _pick(list(rows[0]), LABEL_COLUMNS) if rows and isinstance(rows[0], dict) else None
            labels = [r.get(label) for r in every if isinstance(r, dict)] if label else []
            _decide(t, rows[:SAMPLE_ROWS], labels, whole_read, heads, root)
    except (MergeError, OSError) as err:
        t.kind, t.problem = None, str(err) if isinstance(err, MergeError) else f"cannot read: {err.strerror or err}"
    if t.kind is None:
        return t
    txt = dict(t.test)
    t.test = {"path": t.files[test_role], **txt}
    if val_role is not None:
        t.val = {"path": t.files[val_role], **txt}
        if val_role == "whole":
            t.notes["val"] = f"no -val file: {t.files['whole']} is the validation split"
    else:
        split = {"val_fraction": VAL_FRACTION, "seed": 0, "stratify": t.kind == "classification"}
        t.test["split"] = {"part": "test", **split}
        t.val = {**t.test, "split": {"part": "val", **split}}
        t.notes["split"] = (f"one scored file: a seeded shuffled split, {VAL_FRACTION:.0%} validation"
                            + (", stratified by label" if split["stratify"] else ""))
    return t


def init_tasks(dir: str | Path, models: Optional[Sequence[str | Path]] = None, overwrite: bool = False) -> list[FoundTask]:
    """Scaffold DIR/tasks.yml and DIR/tasks-val.yml from the data files in DIR (see the module).

    `models`: checkpoint folders to take `head_from` from (besides those found in DIR). Returns
    every file group found, tasks and those not understood (`kind` None, `problem` says why).
    """
    from mergecore.eval.tasks import parse_tasks

    root = Path(dir).expanduser()
    if not root.is_dir():
        raise MergeError(f"--init-tasks: {root} is not a folder")
    root = root.resolve()
    outs = [root / "tasks.yml", root / "tasks-val.yml"]
    if not overwrite and (exists := [p for p in outs if p.exists()]):
        raise MergeError(f"{exists[0]} exists; give --overwrite to replace it")
    groups, found_models, left = _group_files(root)
    for m in models or ():
        p = Path(m).expanduser()
        if not _is_model(p):
            raise MergeError(f"--models: {p} is not a checkpoint folder (no config.json)")
        found_models.append(p.resolve())
    heads = {p: h for p in dict.fromkeys(found_models) if (h := _head(p)) is not None}
    left += [f"--models {p}: no classifier head (classifier.* / score.* tensors): not a head_from"
             for p in map(Path, models or ()) if p.expanduser().resolve() not in heads]
    names = [name for (_, name, _) in groups]
    found = []
    for (folder, name, fmt), files in groups.items():  # x.csv and data/x.jsonl: x_csv and x_jsonl
        unique = name if names.count(name) == 1 else f"{name}_{fmt}"
        if sum(1 for _, n, f in groups if (n, f) == (name, fmt)) > 1:
            unique = f"{unique}_{Path(folder).name}"
        found.append(_describe(unique, files, root, heads))
    found += [FoundTask("", {}, problem=why) for why in left]
    if not any(t.kind for t in found):
        seen = "; ".join(t.line() for t in found[:3])
        raise MergeError(f"--init-tasks: no usable data files in {root} (.jsonl .json .csv .tsv .parquet .txt, "
                         f"in it or one sub-folder down){': ' + clip(seen, 300) if seen else ''}")
    texts = [render(found, "test"), render(found, "val")]
    for p, text in zip(outs, texts):
        parse_tasks(text, base_dir=root, where=str(p))
    write_new(outs[0], texts[0], overwrite)
    try:
        write_new(outs[1], texts[1], overwrite)
    except BaseException:
        if not overwrite:  # this run created tasks.yml: take it back, so a retry starts clean
            outs[0].unlink(missing_ok=True)
        raise
    return found
