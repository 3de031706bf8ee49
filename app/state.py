"""Per-session model lists, what the Models tab shows about each model, and compatibility.

The session state is a plain dict (deep-copyable, so it can live in a `gr.State`)::

    {"models": [{"name": "base", "ref": "/path/or/org-name", "path": "/resolved/folder"},
                {"name": "adapter", "ref": "BASE+ADAPTER", "path": "/resolved/base+/resolved/adapter"}, ...],
     "base": "base" | None,
     "family": {...} | None,          # the demo family, if loaded (see demo_family.DemoFamily)
     "trust_remote_code": False}

A base + LoRA adapter model (`app.adapters`) keeps the recipe reference `BASE+ADAPTER` as given
and, as its `path`, both folders resolved and joined the same way (`source_path`): the engine
opens it as one model (`mergecore.io.adapter.open_adapter`), and whatever loads models whole
refuses it with the engine's one line.

It is kept per browser on disk (`app.session`) and read back through `clean_state`.
Opened `ModelSource`s (headers only, no weights) are cached process-wide by folder: they hold
no session data.
"""

from __future__ import annotations

import copy
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from mergecore.errors import MergeError

_SOURCES: dict[tuple[Any, ...], Any] = {}
_SOURCES_LOCK = threading.Lock()


MAX_MODELS = 64  # a restored session keeps at most this many models


def new_session() -> dict[str, Any]:
    return {"models": [], "base": None, "family": None, "trust_remote_code": False}


def clean_state(data: Any) -> tuple[dict[str, Any], list[str]]:
    """A session state rebuilt from data read back from disk (`app.session`): only the known
    keys, each of the expected type; models that are not {name, ref, path} strings (or repeat a
    name) are dropped, and "trust remote code" starts off again. (state, notes on what was
    dropped)."""
    state, notes = new_session(), []
    if not isinstance(data, dict):
        return state, ["the saved models were not readable"]
    seen: set[str] = set()
    for m in data.get("models") or []:
        ok = isinstance(m, dict) and all(isinstance(m.get(k), str) and m.get(k) for k in ("name", "ref", "path"))
        if not ok or m["name"] in seen or len(state["models"]) >= MAX_MODELS:
            notes.append("a saved model entry was not readable" if not ok else f"model '{m['name']}' dropped")
            continue
        seen.add(m["name"])
        state["models"].append({"name": m["name"], "ref": m["ref"], "path": m["path"]})
    base = data.get("base")
    state["base"] = base if isinstance(base, str) and base in seen else None
    fam = data.get("family")
    state["family"] = fam if isinstance(fam, dict) else None
    # "trust remote code" is not restored: the page's checkbox starts unticked, and so does the session
    return state, notes


def _stamp(path: Path) -> float:
    stamps = [p.stat().st_mtime for p in path.glob("*") if p.suffix in (".json", ".safetensors", ".bin")]
    return max(stamps, default=0.0)


def adapter_sides(path: str | Path) -> Optional[tuple[str, str]]:
    """(base, adapter) of a `BASE+ADAPTER` model source or reference, None for a plain one (the
    engine's `split_adapter_ref`: an existing folder with '+' in its name is a plain model)."""
    from mergecore.io.lora_config import split_adapter_ref

    return split_adapter_ref(str(path))


def source_path(path: str | Path) -> str:
    """A model's source as the session keeps it: its folder resolved, or for a base + adapter
    model `BASE+ADAPTER` with both folders resolved."""
    from mergecore.io.lora_config import join_adapter_ref

    sides = adapter_sides(path)
    if sides is None:
        return str(Path(path).expanduser().resolve())
    return join_adapter_ref(*(str(Path(side).expanduser().resolve()) for side in sides))


def open_source(path: str | Path):
    """A ModelSource for a local folder, or the engine's AdapterSource for a `BASE+ADAPTER` one
    (checked against its base when opened), cached until the folders' files change."""
    from mergecore.io.adapter import open_adapter
    from mergecore.io.source import ModelSource

    source = source_path(path)
    sides = adapter_sides(source)
    folders = [Path(source)] if sides is None else [Path(side) for side in sides]
    key = (source, *(_stamp(f) for f in folders))
    with _SOURCES_LOCK:
        src = _SOURCES.get(key)
    if src is None:
        src = ModelSource(source, path=folders[0]) if sides is None else open_adapter(*sides)
        with _SOURCES_LOCK:
            _SOURCES[key] = src
    return src


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def model_info(path: str | Path) -> dict[str, Any]:
    """Architecture, layers, parameters, dtype and size of a checkpoint folder."""
    from mergecore.arch import config_num_layers, main_stack
    from mergecore.io.source import dtype_name

    src = open_source(path)
    stack = main_stack(src.tensors)
    dtypes = Counter()
    for t in src.tensors.values():
        dtypes[dtype_name(t.dtype)] += t.numel
    return {
        "architecture": src.architecture,
        "layers": stack[1] if stack else (config_num_layers(src.config) or 0),
        "parameters": src.num_parameters(),
        "dtype": dtypes.most_common(1)[0][0] if dtypes else "?",
        "bytes": src.total_bytes(),
        "tensors": len(src.tensors),
    }


def short_name(ref: str, taken: list[str]) -> str:
    """A short unique display name for a model reference (folder or Hub id)."""
    base = ref.rstrip("/").split("@")[0]
    base = Path(base).name if not re.match(r"^[\w.\-]+/[\w.\-]+$", base) else base.split("/")[-1]
    base = re.sub(r"[^\w.\-]", "_", base) or "model"
    name, i = base, 2
    while name in taken:
        name = f"{base}-{i}"
        i += 1
    return name


def add_model(state: dict[str, Any], ref: str, path: str | Path, name: Optional[str] = None) -> dict[str, Any]:
    """A copy of `state` with the model added (its folder is opened to check it has weights; a
    `BASE+ADAPTER` source's adapter is checked against its base by the engine)."""
    state = copy.deepcopy(state or new_session())
    path = source_path(path)
    for m in state["models"]:
        if m["path"] == path:
            return state  # already there
    open_source(path)  # raises MergeError if the folder holds no usable weights
    taken = [m["name"] for m in state["models"]]
    name = name if name and name not in taken else short_name(name or ref, taken)
    state["models"].append({"name": name, "ref": ref, "path": path})
    if state.get("base") is None and len(state["models"]) == 1:
        state["base"] = name
    return state


def remove_model(state: dict[str, Any], name: str) -> dict[str, Any]:
    state = copy.deepcopy(state)
    state["models"] = [m for m in state["models"] if m["name"] != name]
    if state.get("base") == name:
        state["base"] = None
    return state


def model_names(state: dict[str, Any]) -> list[str]:
    return [m["name"] for m in (state or {}).get("models", [])]


def model_by_name(state: dict[str, Any], name: str) -> dict[str, Any]:
    for m in state.get("models", []):
        if m["name"] == name:
            return m
    raise MergeError(f"no model named '{name}' in this session")


def find_model(state: dict[str, Any], ref: str) -> Optional[dict[str, Any]]:
    """The session model a recipe reference points at (by name, reference or folder; a
    `BASE+ADAPTER` one by both folders)."""
    resolved = None
    try:
        sides = adapter_sides(ref)
        if all(Path(p).expanduser().is_dir() for p in sides or [ref]):
            resolved = source_path(ref)
    except (OSError, MergeError):
        pass
    for m in state.get("models", []):
        if ref in (m["name"], m["ref"]) or (resolved and resolved == m["path"]):
            return m
    return None


def models_table(state: dict[str, Any]) -> list[list[Any]]:
    """Rows for the Models tab: name, base?, architecture, layers, parameters, dtype, size, path."""
    rows = []
    for m in state.get("models", []):
        try:
            info = model_info(m["path"])
            arch = info["architecture"] + (" + LoRA" if adapter_sides(m["path"]) else "")
            rows.append([m["name"], "base" if m["name"] == state.get("base") else "", arch,
                         info["layers"], human_count(info["parameters"]), info["dtype"],
                         human_bytes(info["bytes"]), m["ref"]])
        except MergeError as err:
            rows.append([m["name"], "", f"unreadable: {err}", "", "", "", "", m["ref"]])
    return rows


MODEL_COLUMNS = ["name", "role", "architecture", "layers", "parameters", "dtype", "size", "source"]


def compatibility(state: dict[str, Any], limit: int = 6) -> tuple[bool, str]:
    """Whether the session's models can be merged tensor by tensor, and exactly what differs (the
    engine's `mergecore.compat`, shown as markdown)."""
    from mergecore.compat import compatibility as engine_compatibility

    models = state.get("models", [])
    if len(models) < 2:
        return False, "Add at least two models to merge."
    srcs = {m["name"]: open_source(m["path"]) for m in models}
    ref = state.get("base") if state.get("base") in srcs else next(iter(srcs))
    verdict = engine_compatibility(srcs, ref)
    problems = [p.replace("'", "`") for p in verdict.problems]
    if problems:
        shown = problems[:limit] + ([f"... and {len(problems) - limit} more differences"] if len(problems) > limit else [])
        return False, "**Not compatible** (a tensor-by-tensor merge needs the same architecture and shapes):\n" + \
            "\n".join(f"- {p}" for p in shown)
    info = model_info(srcs[ref].path)
    return True, (f"**Compatible**: {len(srcs)} models, all {verdict.architecture} with the same "
                  f"{verdict.tensors} tensors and shapes ({info['layers']} layers).")


def num_layers(state: dict[str, Any]) -> int:
    """Layer count of the base model (or the first model); 1 if there are no models."""
    models = state.get("models", [])
    if not models:
        return 1
    base = state.get("base")
    m = next((m for m in models if m["name"] == base), models[0])
    try:
        return max(1, int(model_info(m["path"])["layers"]))
    except MergeError:
        return 1


def tensor_names(state: dict[str, Any]) -> list[str]:
    models = state.get("models", [])
    if not models:
        return []
    base = state.get("base")
    m = next((m for m in models if m["name"] == base), models[0])
    return list(open_source(m["path"]).tensors)


def resolve_ref(ref: str) -> Path:
    """A local folder for a Hub id or a path (downloads Hub models through the engine)."""
    from mergecore.io.source import resolve_model_path

    ref = ref.strip()
    if not ref:
        raise MergeError("give a Hub id (org/name) or a local folder")
    return resolve_model_path(ref)
