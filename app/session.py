"""A browser's session on disk: its models, the recipe form, its merges, its evaluations and
its saved recipes, so a reload, a second tab or a restarted app shows the same session.

    <work_dir>/sessions/<owner digest>/session.json
        {"version": 1, "saved": <epoch>, "state": {...}, "form": {...},
         "merges": [<merge record>, ...], "evaluations": [<evaluation>, ...]}
    <work_dir>/sessions/<owner digest>/recipes.json
        {"version": 1, "recipes": {"<name>": {"yaml": "...", "saved": <epoch>, "method": "..."}}}

The owner is the browser (`app.context.browser_owner`: the random key the browser keeps in
its local storage), so the folder is the one its searches and merges are written in. Files are
plain JSON (never pickle), written atomically (a temporary file renamed over the old one) and
read within a size limit; lists are bounded (the oldest entries go first). A file that cannot
be read (corrupt, oversized, not an object) is moved aside as `<name>.bad` and the session
starts fresh, with a one-line warning the page shows once (`take_warning`); nothing raises.
Merge records and evaluations are `app.history`'s.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from mergecore.errors import MergeError

from app.files import Workspace

log = logging.getLogger("mergecore.app")

VERSION = 1
SESSION_FILE = "session.json"
RECIPES_FILE = "recipes.json"
MAX_SESSION_BYTES = 4 * 1000**2  # a larger session.json is not read (a fresh session, and a warning)
MAX_RECIPES_BYTES = 4 * 1000**2
MAX_MERGES = 100  # merge records kept (the oldest go first)
MAX_EVALUATIONS = 10
MAX_SAVED_RECIPES = 100
MAX_RECIPE_CHARS = 200_000  # one recipe's YAML, in a record or the library
NAME_RE = re.compile(r"[^\w ]+")


def fresh() -> dict[str, Any]:
    """An empty session file's content."""
    return {"version": VERSION, "saved": None, "state": None, "form": None, "merges": [], "evaluations": []}


def recipe_name(name: Any) -> str:
    """A saved recipe's name: letters, digits, spaces, `-` and `_` (any other run of characters
    is one `-`), at most 60 characters."""
    clean = re.sub(r"\s*-[\s-]*", "-", " ".join(NAME_RE.sub("-", str(name or "")).split()))
    clean = clean.strip(" -")[:60].strip(" -")
    if not clean:
        raise MergeError("give the recipe a name (letters, digits, spaces, '-', '_')")
    return clean


class SessionStore:
    """The sessions of a workspace on disk, one folder per owner (thread-safe within a process)."""

    def __init__(self, workspace: Workspace):
        self.ws = workspace
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()
        self._warnings: dict[str, str] = {}

    def folder(self, owner: str) -> Path:
        return self.ws.session_dir(owner)

    def lock(self, owner: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(owner, threading.RLock())

    # -- reading and writing ----------------------------------------------------------------------

    def _read(self, owner: str, name: str, limit: int, default: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        path = self.folder(owner) / name
        try:
            if not path.exists():
                return default()
            if path.is_symlink() or not path.is_file():
                raise ValueError("not a regular file")
            size = path.stat().st_size
            if size > limit:
                raise ValueError(f"{size} bytes, over the {limit // 1000**2} MB limit")
            data = json.loads(path.read_bytes().decode("utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            reason = " ".join(str(err).split())[:120]
            warning = f"The saved {name} could not be read ({reason}); starting a fresh one (the old file is {name}.bad)."
            log.warning("%s: %s", path, warning)
            self._warnings[owner] = warning
            try:
                if path.is_file() and not path.is_symlink():
                    os.replace(path, path.with_name(name + ".bad"))
                else:
                    path.unlink()
            except OSError:
                pass
            return default()
        return data

    def _write(self, owner: str, name: str, data: dict[str, Any], limit: int) -> bool:
        path = self.folder(owner) / name
        text = _dumps(data)
        if len(text.encode("utf-8")) > limit:
            log.warning("%s: not saved, it would be over %d bytes", path, limit)
            return False
        tmp = path.with_name(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            log.warning("%s: not saved (%s)", path, err)
            try:
                tmp.unlink()
            except OSError:
                pass
            return False
        return True

    def read(self, owner: str) -> dict[str, Any]:
        """The owner's session (a fresh one when there is none or it cannot be read)."""
        with self.lock(owner):
            data = self._read(owner, SESSION_FILE, MAX_SESSION_BYTES, fresh)
        out = fresh()
        out.update({k: data.get(k) for k in ("saved", "state", "form")})
        for key in ("merges", "evaluations"):
            value = data.get(key)
            out[key] = [r for r in value if isinstance(r, dict)] if isinstance(value, list) else []
        out["form"] = out["form"] if isinstance(out["form"], dict) else None
        return out

    def update(self, owner: str, change: Callable[[dict[str, Any]], Any]) -> Any:
        """Read the session, `change(data)` it in place and write it back (under the owner's lock,
        so the page and the jobs never lose each other's writes); returns what `change` returned.
        Lists over their bounds lose their oldest entries; a session still too large is not
        written (it keeps its previous content)."""
        with self.lock(owner):
            data = self.read(owner)
            result = change(data)
            data["version"], data["saved"] = VERSION, time.time()
            data["merges"] = data["merges"][-MAX_MERGES:]
            data["evaluations"] = data["evaluations"][-MAX_EVALUATIONS:]
            if _size({**data, "merges": [], "evaluations": []}) > MAX_SESSION_BYTES:
                log.warning("session of %s: not saved, its models and form are over %d bytes", owner,
                            MAX_SESSION_BYTES)
                return result
            while _size(data) > MAX_SESSION_BYTES and (data["evaluations"] or data["merges"]):
                (data["evaluations"] or data["merges"]).pop(0)  # the oldest go first
            self._write(owner, SESSION_FILE, data, MAX_SESSION_BYTES)
            return result

    def save_page(self, owner: str, state: Any, form: Any) -> None:
        """The page's models and recipe form (the merges and evaluations are kept as they are)."""

        def change(data: dict[str, Any]) -> None:
            data["state"], data["form"] = state, form

        self.update(owner, change)

    def take_warning(self, owner: str) -> Optional[str]:
        """The one-line warning about an unreadable file of this owner's, once."""
        return self._warnings.pop(owner, None)

    # -- saved recipes ----------------------------------------------------------------------------

    def recipes(self, owner: str) -> dict[str, dict[str, Any]]:
        """name -> {"yaml", "saved", "method"} of the owner's saved recipes, oldest first."""
        with self.lock(owner):
            data = self._read(owner, RECIPES_FILE, MAX_RECIPES_BYTES, lambda: {"recipes": {}})
        found = data.get("recipes")
        if not isinstance(found, dict):
            return {}
        return {k: v for k, v in found.items()
                if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("yaml"), str)}

    def save_recipe(self, owner: str, name: str, yaml_text: str, method: Optional[str] = None) -> str:
        """Save (or replace) the recipe `name`; returns the name as stored."""
        name = recipe_name(name)
        if len(yaml_text) > MAX_RECIPE_CHARS:
            raise MergeError(f"the recipe is {len(yaml_text)} characters, over the {MAX_RECIPE_CHARS} limit for "
                             "saved recipes")
        with self.lock(owner):
            found = self.recipes(owner)
            if name not in found and len(found) >= MAX_SAVED_RECIPES:
                raise MergeError(f"{MAX_SAVED_RECIPES} recipes are saved already; delete one first")
            found.pop(name, None)
            found[name] = {"yaml": yaml_text, "saved": time.time(), "method": method}
            if not self._write(owner, RECIPES_FILE, {"version": VERSION, "recipes": found}, MAX_RECIPES_BYTES):
                raise MergeError("the saved recipes are over their size limit; delete some first")
        return name

    def delete_recipe(self, owner: str, name: str) -> None:
        with self.lock(owner):
            found = self.recipes(owner)
            if name not in found:
                raise MergeError(f"no saved recipe called '{name}'")
            del found[name]
            self._write(owner, RECIPES_FILE, {"version": VERSION, "recipes": found}, MAX_RECIPES_BYTES)


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=_jsonable)


def _size(data: Any) -> int:
    return len(_dumps(data).encode("utf-8"))


def _jsonable(value: Any) -> Any:
    """What JSON does not know, as plain data (numpy scalars, paths, tuples ...)."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# the page's models and form, read back


def clean_form(data: Any, state: dict[str, Any], roots: Any) -> tuple[dict[str, Any], list[str]]:
    """A recipe form read back from disk: a known method, its values checked against the fields
    (a value that does not pass is back at its default), the other keys of the expected types
    (artifact folders only inside `roots`). (form, notes)."""
    from app import forms
    from app.paths import confine
    from app.values import check_value

    notes: list[str] = []
    if not isinstance(data, dict) or data.get("method") not in forms.method_choices():
        return ({}, ["the saved recipe form was not readable"]) if data else ({}, [])
    form: dict[str, Any] = {"method": data["method"]}
    values = data.get("values") if isinstance(data.get("values"), dict) else {}
    if state.get("models"):
        fields = {f["key"]: f for f in forms.form_fields(form["method"], state)}
        kept = {}
        for k, v in values.items():
            if k in fields:
                try:
                    kept[k] = check_value(fields[k], v)
                except MergeError:
                    notes.append(f"the saved value of '{k}' did not pass its checks")
            elif isinstance(data.get("slices"), list) and isinstance(k, str):
                kept[k] = v  # a slices recipe's per-model values the form does not show
        form["values"] = kept
    form["explicit"] = [k for k in data.get("explicit") or [] if isinstance(k, str) and k in form.get("values", {})]
    form["extra"] = data["extra"] if isinstance(data.get("extra"), dict) else {}
    form["slices"] = data["slices"] if isinstance(data.get("slices"), list) else None
    form["slices_base"] = data.get("slices_base") is True
    left_out = data.get("left_out") if isinstance(data.get("left_out"), list) else []  # models out of the recipe
    form["left_out"] = [n for n in left_out if isinstance(n, str)]
    dirs = []
    for d in data.get("search_dirs") or []:
        try:
            dirs.append(str(confine(str(d), roots, "artifact folder")))
        except MergeError:
            notes.append("an artifact folder outside the folders this app may read was dropped")
    form["search_dirs"] = dirs
    if isinstance(data.get("moe"), dict):  # the mixture-of-experts form, its models the session's
        from app.moe_form import sync

        form["moe"] = sync(data["moe"], state)
    if state.get("models"):
        form = forms.sync_form(form, state)
    return form, notes


def restore_page(store: SessionStore, owner: str, roots: Any
                 ) -> tuple[Optional[dict[str, Any]], Optional[dict[str, Any]], Optional[str]]:
    """(state, form, warning) of the owner's saved session, checked as the page's own would be:
    models only inside `roots` (the folders the app may read). (None, None, warning) when there
    is no saved session (or it could not be read: then the warning says so, in one line)."""
    from app.paths import confine_source
    from app.state import clean_state

    data = store.read(owner)
    warning = store.take_warning(owner)
    if data["state"] is None and data["form"] is None:
        return None, None, warning
    try:
        state, notes = clean_state(data["state"])
        kept = []
        for m in state["models"]:
            try:
                confine_source(m["path"], roots)  # a BASE+ADAPTER source: both folders
                kept.append(m)
            except MergeError:
                notes.append(f"model '{m['name']}' is outside the folders this app may read")
        state["models"] = kept
        if state["base"] not in [m["name"] for m in kept]:
            state["base"] = None
        form, more = clean_form(data["form"], state, roots)
        notes += more
    except Exception as err:  # whatever the file holds, the page opens
        log.warning("session of %s not restored: %s", owner, err)
        return None, None, f"The saved session could not be restored ({type(err).__name__}); starting a fresh one."
    if notes:
        shown = "; ".join(notes[:3]) + (f" (and {len(notes) - 3} more)" if len(notes) > 3 else "")
        warning = " ".join(filter(None, [warning, f"Restored the saved session, except: {shown}."]))
    return state, form, warning
