"""What `mergecore eval --init-tasks` found (`FoundTask`, one per file group) and how it is
written: the YAML text of tasks.yml / tasks-val.yml with every guess as a comment beside its
field (`render`), and the atomic write that never replaces an existing file unless asked
(`write_new`). The guessing itself is `mergecore.eval.scaffold`."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from mergecore.errors import MergeError


@dataclass
class FoundTask:
    """One file group found in the folder: a task (`kind` set) or what could not be understood."""

    name: str
    files: dict[str, str]  # role (train / val / test / whole) -> path relative to DIR
    kind: Optional[str] = None  # classification | lm | generation | multiple_choice; None: see `problem`
    fields: dict[str, Any] = field(default_factory=dict)  # YAML keys after name / kind / data
    notes: dict[str, str] = field(default_factory=dict)  # key -> the comment written beside it
    problem: str = ""
    test: dict[str, Any] = field(default_factory=dict)  # data block in tasks.yml
    val: dict[str, Any] = field(default_factory=dict)  # data block in tasks-val.yml

    def line(self) -> str:
        """The one-line summary the command prints."""
        if self.kind is None:
            return f"not understood: {''.join(f + ': ' for f in list(self.files.values())[:1])}{self.problem}"
        f = self.fields
        what = {"classification": f"text '{f.get('text_field')}' -> label '{f.get('label_field')}'"
                + (f" ({len(f['label_names'])} label names)" if f.get("label_names") else " (integer labels)"),
                "lm": f"perplexity of '{f.get('text_field', 'text')}'",
                "generation": f"'{f.get('prompt_field')}' -> exact match of '{f.get('answer_field')}'",
                "multiple_choice": f"'{f.get('context_field')}' -> the likeliest of '{f.get('choices_field')}'"}[self.kind]
        head = "" if self.kind != "classification" else (
            f", head_from {f['head_from']}" if f.get("head_from") else ", the evaluated model's own head")
        return f"{self.name}: {self.kind}, {what}; test {_data_text(self.test)}, val {_data_text(self.val)}{head}"


def _data_text(d: dict[str, Any]) -> str:
    s = d.get("split")
    return d["path"] + (f" ({s['part']} part, {s['val_fraction']:.0%} val)" if s else "")


def _value(v: Any) -> str:
    """`v` as one line of YAML (flow style; JSON where YAML would need more than a line)."""
    text = yaml.safe_dump(v, default_flow_style=True, allow_unicode=True, width=1 << 20, sort_keys=False).rstrip("\n")
    text = text[:-4] if text.endswith("\n...") else text
    return json.dumps(v, ensure_ascii=False) if "\n" in text else text


def _comment(text: str) -> str:
    return "  # " + " ".join(text.split()) if text else ""


def render(found: list[FoundTask], part: str) -> str:
    """The YAML text of tasks.yml (`part` test) or tasks-val.yml (`part` val)."""
    lines = [f"# Scaffolded by `mergecore eval --init-tasks` ({'test' if part == 'test' else 'validation'} split). "
             "Every guess is a comment beside its field: check them.",
             "# head_from: score a classification task with that checkpoint's classifier head on the evaluated body "
             "(each expert's own head);",
             "# without it the evaluated model's own head scores the task (a shared head). Paths are relative to "
             "this file. Format: mergecore/eval/tasks.py.", "tasks:"]
    for t in found:
        if t.kind is None:
            continue
        n = t.notes
        lines.append(f"- name: {_value(t.name)}")
        lines.append(f"  kind: {t.kind}{_comment(n.get('kind', ''))}")
        data = t.test if part == "test" else t.val
        lines.append(f"  data: {_value(data)}{_comment(n.get('split', '') or (n.get('val', '') if part == 'val' else ''))}")
        for k, v in t.fields.items():
            lines.append(f"  {k}: {_value(v)}{_comment(n.get(k, ''))}")
        if t.kind == "classification" and "head_from" not in t.fields:
            lines.append("  # head_from: MODEL_FOLDER  # no model folder here is named like this task: add the "
                         "expert trained on it to score with its own head, or leave this out (a shared head)")
        if "train" in t.files:
            lines.append(f"  # train data: {t.files['train']} (what DAM's train_tasks may name; never scored)")
    return "\n".join(lines) + "\n"


def write_new(path: Path, text: str, overwrite: bool) -> None:
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any new file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails, atomically, if the file appeared meanwhile
            except FileExistsError:
                raise MergeError(f"{path} exists; give --overwrite to replace it") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
