"""Recipe YAML applied in the Recipe tab: checked whole before anything changes, with the line and
column of the first problem, and what applying it would change in the session.

`parse(text, where)` checks the syntax, the schema, the methods and every parameter value against
its method's schema (`ParamSpec.coerce`: `density: 2.5` is refused here, not only by the plan);
an error names the line and column of the key it is about. `prepare(...)` then loads the recipe's
models into a copy of the session and fills a form (`app.forms`), and says what applying would
change: models loaded, models leaving or joining the recipe (the others stay loaded), the base,
parameters dropped, and the warnings (parameters the method does not read: the engine's
`validate_parameters`; filters that match no tensor of the models). The tab asks for a
confirmation when any of that is there (`Prepared.needs_confirm`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from mergecore.errors import MergeError, short

from app import forms


def position(text: str, path: Sequence[Any]) -> Optional[tuple[int, int]]:
    """(line, column), 1-based, of the node at `path` in the YAML `text` (of a key, for a path
    that ends at one; of the deepest node found, for a path that goes further than the text)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes only: aliases are shared, not expanded
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    mark = node.start_mark
    for step in path:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(step)),
                        None)
            if pair is None:
                break
            mark, node = pair[0].start_mark, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and 0 <= step < len(node.value):
            node = node.value[step]
            mark = node.start_mark
        else:
            break
    return mark.line + 1, mark.column + 1


def scalar_position(text: str, value: str) -> Optional[tuple[int, int]]:
    """(line, column) of the first scalar that is `value` (a model reference named in an error)."""
    from collections import deque

    import yaml

    try:
        stack = deque([yaml.compose(text, Loader=yaml.SafeLoader)])
    except yaml.YAMLError:
        return None
    seen: set[int] = set()
    while stack:
        node = stack.popleft()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode) and node.value == value:
            return node.start_mark.line + 1, node.start_mark.column + 1
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
    return None


def located(err: MergeError | str, where: str, pos: Optional[tuple[int, int]]) -> MergeError:
    """The error as `where: line L, column C: problem` (the shape of a YAML syntax error)."""
    msg = str(err).removeprefix(f"{where}: ")
    if pos is None or msg.startswith("line "):
        return MergeError(f"{where}: {msg}")
    return MergeError(f"{where}: line {pos[0]}, column {pos[1]}: {msg}")


def _schema_path(data: Any) -> tuple:
    """Where the recipe schema's first problem is (pydantic's location of it)."""
    from pydantic import ValidationError

    from mergecore.recipe import Recipe

    try:
        Recipe.model_validate(data)
    except ValidationError as err:
        return tuple(err.errors(include_url=False, include_input=False)[0]["loc"])
    return ()


def _blocks(data: dict[str, Any]) -> list[tuple[tuple, dict[str, Any], list[str]]]:
    """(path, parameters, the methods that read them) of every parameter block of a recipe."""
    method = data["merge_method"]
    slices = data.get("slices") or []
    out = [(("parameters",), data.get("parameters") or {}, [method, *[s.get("merge_method") or method for s in slices]])]
    out += [(("models", i, "parameters"), m.get("parameters") or {}, [method]) for i, m in enumerate(data.get("models") or [])]
    for i, s in enumerate(slices):
        methods = [s.get("merge_method") or method]
        out.append((("slices", i, "parameters"), s.get("parameters") or {}, methods))
        out += [(("slices", i, "sources", j, "parameters"), src.get("parameters") or {}, methods)
                for j, src in enumerate(s["sources"])]
    return out


def _where(path: tuple) -> str:
    """A parameter block's place in a recipe, as the engine names it: `models[1]`, `slices[0].sources[1]`."""
    out = ""
    for step in path[:-1] or path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


def _check_value(spec, value: Any, path: tuple, where: str) -> None:
    """A recipe value of parameter `spec` checked as the merge will (scalars, curve anchors and
    filter entries' values); a MergeError carries the path of the offending part as `err.path`."""
    from mergecore.params import is_filter_list

    def fail(err: MergeError | str, at: tuple) -> None:
        e = MergeError(str(err))
        e.path = at
        raise e

    if is_filter_list(value):
        for k, entry in enumerate(value):
            if "value" not in entry or set(entry) - {"filter", "value"}:
                fail(f"parameter '{spec.name}' ({where}): each filter entry needs 'value' and optionally "
                     f"'filter', got {short(entry)}", path + (k,))
            _check_value(spec, entry["value"], path + (k, "value"), where)
    elif isinstance(value, list):
        for k, anchor in enumerate(value):
            if isinstance(anchor, (list, dict)):
                fail(f"parameter '{spec.name}' ({where}): a curve's anchors are values, got {short(anchor)}",
                     path + (k,))
            try:
                spec.coerce(anchor, where)
            except MergeError as err:
                fail(err, path + (k,))
    elif isinstance(value, dict):
        fail(f"parameter '{spec.name}' ({where}): a value is a scalar, a curve or a list of filters, got "
             f"{short(value)}", path)
    else:
        try:
            spec.coerce(value, where)
        except MergeError as err:
            fail(err, path)


def parse(text: str | bytes, where: str = "recipe"):
    """The recipe in `text`, checked whole (syntax, schema, methods, every parameter value); a
    MergeError names the line and column of the first problem."""
    from mergecore.methods import get_method
    from mergecore.recipe import recipe_from_dict
    from mergecore.yamlio import load_yaml

    if isinstance(text, bytes):
        data = load_yaml(text, where)  # the size and encoding checks, then the text for positions
        text = text.decode("utf-8")
    else:
        data = load_yaml(text or "", where)  # syntax errors name their line and column
    try:
        recipe = recipe_from_dict(data, where)
    except MergeError as err:
        raise located(err, where, position(text, _schema_path(data)) if isinstance(data, dict) else None) from None
    for path, name in [(("merge_method",), recipe.merge_method),
                       *[(("slices", i, "merge_method"), s.merge_method) for i, s in enumerate(recipe.slices or [])
                         if s.merge_method]]:
        try:
            get_method(name)
        except MergeError as err:
            raise located(err, where, position(text, path)) from None
    for path, params, names in _blocks(data):
        for key, value in params.items():
            spec = next((p for p in (get_method(n).param(str(key)) for n in names) if p is not None), None)
            if spec is None:
                continue  # a parameter no method reads: a warning (validate_parameters), not an error
            try:
                _check_value(spec, value, path + (key,), _where(path))
            except MergeError as err:
                raise located(err, where, position(text, getattr(err, "path", path + (key,)))) from None
    return recipe, text


@dataclass
class Prepared:
    """A recipe ready to apply: the session and form it gives, and what it changes."""

    state: dict[str, Any]
    form: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # what the form made of the recipe
    warnings: list[str] = field(default_factory=list)  # the engine's (unused parameters), unmatched filters
    changes: list[str] = field(default_factory=list)  # to the session: models, the recipe's models, the base
    dropped: list[str] = field(default_factory=list)  # parameters the form does not keep
    method: str = ""  # the method change, in words ("" when the method stays)

    @property
    def needs_confirm(self) -> bool:
        return bool(self.changes or self.warnings or self.dropped)

    def preview_md(self) -> str:
        lines = ["**Applying this recipe will:**"] + [f"- {c}" for c in [self.method] + self.changes + self.dropped if c]
        if not self.changes and not self.dropped:
            lines = ["**Applying this recipe changes no models.**"] + ([f"- {self.method}"] if self.method else [])
        if self.warnings:
            lines += ["", "**Warnings:**"] + [f"- ⚠ {w}" for w in self.warnings]
        lines += ["", "**Apply** it, or **Cancel** to keep the session as it is (your text stays in the editor)."]
        return "\n".join(lines)

    def applied_md(self) -> str:
        from app.moe_form import MOE, is_on

        names = forms.recipe_models(self.state, self.form)
        method = MOE if is_on(self.form) else self.form.get("method")
        first = f"**Applied**: {method} of {', '.join(names) or 'no models'}."
        return "\n".join([first] + [f"- {x}" for x in self.changes + self.dropped]
                         + [f"- ⚠ {w}" for w in self.warnings])


def session_changes(old_state: dict[str, Any], old_form: dict[str, Any], state: dict[str, Any],
                    form: dict[str, Any]) -> list[str]:
    """What a new session and form change about the models: loaded, leaving or joining the
    recipe (the others stay loaded), the base."""
    old_names = [m["name"] for m in (old_state or {}).get("models", [])]
    loaded = [m["name"] for m in state.get("models", []) if m["name"] not in old_names]
    before = forms.recipe_models(old_state or {}, forms.filled(old_form, old_state or {})) if old_names else []
    after = forms.recipe_models(state, form)
    out = []
    if loaded:
        out.append(f"load into the session: {', '.join(loaded)}")
    leaving = [n for n in before if n not in after]
    if leaving:
        out.append(f"leave out of the recipe (they stay loaded): {', '.join(leaving)}")
    joining = [n for n in after if n not in before and n not in loaded]
    if joining:
        out.append(f"bring into the recipe: {', '.join(joining)}")
    if old_names and (old_state or {}).get("base") != state.get("base"):
        out.append(f"change the base model: {(old_state or {}).get('base') or 'none'} → {state.get('base') or 'none'}")
    return out


def prepare_moe(text: str | bytes, data: Any, state: dict[str, Any], form: dict[str, Any], roots: Sequence[Path],
                where: str = "recipe") -> Prepared:
    """A mergekit-moe config applied: checked by the engine, its models loaded, the form on the
    mixture (`app.moe_form`), and what that changes; a MergeError names the line and column."""
    from app.moe_form import LABEL, error_path, is_on

    shown = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else (text or "")
    try:
        new_state, new_form, notes = forms.import_recipe(text, state, roots, where, form=form)
    except MergeError as err:
        ref = getattr(err, "ref", None)
        path = error_path(data, err)
        raise located(err, where, scalar_position(shown, ref) if ref else position(shown, path) if path else None
                      ) from None
    old = (form or {}).get("method")
    method = "" if is_on(form) else f"switch the method: {old} → {LABEL}" if old else ""
    return Prepared(new_state, new_form, notes, [], session_changes(state, form, new_state, new_form), [], method)


def prepare(text: str | bytes, state: dict[str, Any], form: dict[str, Any], roots: Sequence[Path],
            where: str = "recipe", search_dirs: Sequence[str | Path] = ()) -> Prepared:
    """Recipe YAML checked (`parse`) and made into a session and form, with what that changes. A
    mergekit-moe config goes to the mixture-of-experts form (`app.moe_form.prepare`)."""
    from mergecore.moe.config import is_moe_config
    from mergecore.recipe import validate_parameters
    from mergecore.yamlio import load_yaml

    data = load_yaml(text or "", where)
    if is_moe_config(data):
        return prepare_moe(text, data, state, form, roots, where)
    recipe, text = parse(text, where)
    try:
        new_state = forms.load_recipe_models(recipe, state, roots, search_dirs)
    except MergeError as err:
        ref = getattr(err, "ref", None)
        raise located(err, where, scalar_position(text, ref) if ref else None) from None
    new_state, new_form, notes = forms.form_from_recipe(recipe, new_state, search_dirs)
    warnings = validate_parameters(recipe) + forms.recipe_warnings(new_form, new_state)
    dropped = [n for n in notes if n.startswith("parameters")]
    kept = [n for n in notes if n not in dropped and not n.startswith("models not in the recipe")]
    changes = session_changes(state, form, new_state, new_form)
    from app.moe_form import LABEL, is_on

    old = LABEL if is_on(form) else (form or {}).get("method")
    method = f"switch the method: {old} → {new_form['method']}" if old and old != new_form["method"] else ""
    if (form or {}).get("moe"):  # a recipe goes to its method; the mixture's form stays, off
        new_form["moe"] = {**form["moe"], "on": False}
    return Prepared(new_state, new_form, kept, warnings, changes, dropped, method)
