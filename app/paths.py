"""Which files the app may read: one confinement rule for every path a user types into it.

The app runs on a server and the person in the browser may not be the server's owner, so a path
typed into a field (the tasks file of Evaluate or of a search, a model or adapter folder on the
Models tab, a model or an artifact named in an imported recipe; each side of a `BASE+ADAPTER`
reference) is only read when it lies inside one of:

* the app's work dir (`--work-dir`: merges, searches, exports);
* the demo dir (`--demo-dir`) and the folders of the demo family in use;
* the Hugging Face cache (`huggingface_hub.constants.HF_HUB_CACHE`: Hub downloads);
* each folder given with `--allow-dir DIR` (`make_context(allowed_dirs=...)`).

Symlinks and `..` are resolved first, so a link inside a root that points outside is refused.
A Hub id (org/name) that is not a local path is not a path: it goes to the Hub code unchanged.

Errors never show what a file holds: a user-named file that is not what it should be is
reported with its name and the problem (a line and column at most), the problem cut short, so
pointing a field at a server file cannot echo it back (`tasks_file`). YAML a user uploads goes
through `mergecore.yamlio` and an upload over its size limit is refused before it is read
(`read_upload`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from mergecore.errors import MergeError
from mergecore.yamlio import MAX_YAML_BYTES, load_yaml_file

ROOTS_TEXT = "work dir, demo dir, Hugging Face cache, --allow-dir"
PROBLEM_CHARS = 160  # how much of an engine's message about a user-named file is shown


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache (where Hub downloads land), as huggingface_hub sets it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _shown(path: object, limit: int = 300) -> str:
    """A typed path as shown in a message: one line, bounded, its start kept whole."""
    text = " ".join(str(path)[: limit + 1].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolved_roots(roots: Iterable[str | Path]) -> list[Path]:
    out = []
    for r in roots:
        try:
            out.append(Path(r).expanduser().resolve())
        except (OSError, RuntimeError):  # a root that cannot be resolved allows nothing
            continue
    return out


def confine(path: str | Path, roots: Sequence[str | Path], what: str = "path") -> Path:
    """`path` resolved (symlinks and `..` followed; relative to the current directory), if it
    lies in one of `roots`; otherwise a one-line MergeError that says how to allow it.

    Nothing is read to decide this, so a refused path tells nothing about what is there."""
    text = str(path).strip()
    if not text:
        raise MergeError(f"give a {what}")
    if "\x00" in text:
        raise MergeError(f"{what} {_shown(text)}: not a valid path")
    try:
        resolved = Path(text).expanduser().resolve()
    except (OSError, RuntimeError):  # e.g. a symlink loop
        raise MergeError(f"{what} {_shown(text)}: cannot be resolved (a symlink loop?)") from None
    for root in _resolved_roots(roots):
        if resolved == root or resolved.is_relative_to(root):
            return resolved
    raise MergeError(f"{what} {_shown(text)} is outside the folders this app may read ({ROOTS_TEXT}); "
                     f"start the app with --allow-dir DIR to allow it")


def local_model(ref: str, roots: Sequence[str | Path], what: str = "model folder") -> Optional[Path]:
    """The confined local folder a model reference names, or None when it is a Hub id to fetch.

    An org/name that is also an existing local path (relative to the current directory) is
    that path, as the engine would take it, so it is confined like any other. A `BASE+ADAPTER`
    reference is two of them (`local_sides`), refused here so neither side escapes the roots."""
    from mergecore.io.lora_config import split_adapter_ref
    from mergecore.io.source import is_hub_id

    ref = ref.strip()
    if split_adapter_ref(ref) is not None:
        raise MergeError(f"'{_shown(ref)}' is a base+adapter reference, not one {what}")
    if is_hub_id(ref):
        try:
            exists = Path(ref).expanduser().exists()
        except OSError:
            exists = False
        if not exists:
            return None
    return confine(ref, roots, what)


def local_sides(ref: str, roots: Sequence[str | Path]) -> list[Optional[Path]]:
    """`local_model` of each side of a model reference: one for a plain reference, the base's and
    the adapter's for a `BASE+ADAPTER` one (the engine's split)."""
    from mergecore.io.lora_config import split_adapter_ref

    sides = split_adapter_ref(ref.strip())
    if sides is None:
        return [local_model(ref, roots)]
    return [local_model(sides[0], roots, "base model folder"), local_model(sides[1], roots, "adapter folder")]


def confine_source(source: str | Path, roots: Sequence[str | Path]) -> str:
    """A session model's source confined: its folder resolved, or both folders of a
    `BASE+ADAPTER` source (`app.state.source_path`), each inside `roots`."""
    from mergecore.io.lora_config import join_adapter_ref, split_adapter_ref

    sides = split_adapter_ref(str(source))
    if sides is None:
        return str(confine(source, roots, "model folder"))
    return join_adapter_ref(str(confine(sides[0], roots, "base model folder")),
                            str(confine(sides[1], roots, "adapter folder")))


def clipped_problem(err: BaseException, name: str, quoted: bool = True) -> str:
    """An engine message about a user-named file as a bounded problem: the file's name (which the
    app's own message gives) taken off the front, with `quoted=False` quoted runs of four or
    more characters blanked (what a YAML parser quotes from the text: an alias, a tag), then cut
    to `PROBLEM_CHARS` characters."""
    msg = " ".join(str(err).split())
    if msg.startswith(name):
        msg = msg[len(name):].lstrip(":").strip()
    if not quoted:
        msg = re.sub(r"'[^']{4,}'|\"[^\"]{4,}\"", "'...'", msg)
    return msg if len(msg) <= PROBLEM_CHARS else msg[: PROBLEM_CHARS - 3] + "..."


def _yaml_kind(value: Any) -> str:
    """What a parsed YAML value is, in words, without any of it."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "a value"


def _not_tasks(data: Any) -> Optional[str]:
    """Why parsed YAML is not shaped like a tasks file (a list of tasks, or `tasks:` with one, each
    a mapping with at least `name` and `data`), in words that quote nothing from it; None when
    it is shaped like one, and the engine's own (bounded) message may say what is wrong."""
    if isinstance(data, dict):
        other = [k for k in data if k not in ("tasks", "description", "name")]
        if other:
            return (f"it holds a mapping with {len(other)} key(s) a tasks file does not have (a tasks file is a "
                    f"list of tasks, or 'tasks:' with one)")
        data = data.get("tasks")
    if not isinstance(data, list) or not data:
        return f"it holds {_yaml_kind(data)}, not a list of tasks" if data != [] else "its list of tasks is empty"
    for i, t in enumerate(data):
        if not isinstance(t, dict):
            return f"tasks[{i}] is {_yaml_kind(t)}, not a task (a mapping with name, kind and data)"
        if "name" not in t or "data" not in t:
            return f"tasks[{i}] has no 'name' or no 'data', so it is not a task"
    return None


def tasks_file(path: str, roots: Sequence[str | Path], what: str = "tasks file") -> Path:
    """A typed tasks file, confined and checked to be a tasks YAML the evaluator can build (its
    data is not loaded). The error names the file and the problem, never the file's text: a
    file not shaped like a tasks file is described by its shape alone, and only one that is gets
    the engine's message (cut short) about what is wrong in it."""
    p = confine(path, roots, what)
    if not p.is_file():
        raise MergeError(f"{what} not found: {_shown(path)}")
    from mergecore.eval.tasks import load_tasks

    shown = _shown(path)
    try:
        data = load_yaml_file(p, what)  # size, alias and depth limits before anything walks it
    except MergeError as err:
        problem = clipped_problem(err, str(p), quoted=False)
        raise MergeError(f"{what} {shown} is not a usable tasks file: {problem}") from None
    shape = _not_tasks(data)
    if shape is not None:
        raise MergeError(f"{what} {shown} is not a tasks file: {shape}")
    try:
        load_tasks(p)
    except MergeError as err:
        raise MergeError(f"{what} {shown} is not a usable tasks file: {clipped_problem(err, str(p))}") from None
    except (OSError, UnicodeError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise MergeError(f"cannot read {what} {shown}: {reason}") from None
    return p


def read_upload(path: str | Path, what: str = "file", limit: int = MAX_YAML_BYTES) -> bytes:
    """The bytes of a file a user uploaded, refused before it is read when over `limit`."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > limit:
            raise MergeError(f"{what} {_shown(p.name)} is {size} bytes, over the {limit // 1000**2} MB limit")
        return p.read_bytes()
    except OSError as err:
        raise MergeError(f"cannot read {what} {_shown(p.name)}: {err.strerror or type(err).__name__}") from None
