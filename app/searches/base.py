"""What every search of the Search tab is made of: its form (`Field`s), its `SearchSpec` and the
registry, plus the helpers the searches share (form checks, operators, event series).

A search registers a `SearchSpec` named as the engine's search (`mergecore.search.base.SEARCHES`:
its config class, and the one program it runs through, come from there):

- `fields`: the form, as `Field`s. Kinds: 'float', 'int', 'bool', 'choice', 'multichoice'
  (several of `choices`), 'text', 'yaml' (a YAML code box), and session-aware ones the tab
  fills in: 'models' (the session's models but the base; ticked boxes), 'base' (the session's
  base model), 'tasks' (a tasks YAML; by default the demo family's validation tasks, with
  `tasks_from` its test tasks or only a separate validation file) and 'operators' (a YAML list
  of merge methods with fixed parameters, with an "add" dropdown fed by the method registry).
  `advanced=True` puts a field in a closed accordion. The form follows the fields' order:
  the session's models, the scalars listed before the first YAML / tasks field, those wide
  fields, then the other scalars in rows of four.
- `make_config(values, session) -> config`: the form's values (field key -> value) and the
  session (`SearchSession`: model name -> folder, base, tasks) -> the engine search's config,
  or a `MergeError` with a one-line message. `SearchSpec.run` runs it (`run_search`: events,
  cancel, resume with the checkpointed history re-sent as `replayed` events, `recipe.yml`).
- `plots`: `PlotSpec(title, figure)` where `figure(events, meta) -> plotly Figure`; `events`
  are `Event.as_dict()`s of the job, `meta` what `meta(config, session)` returned at start
  (e.g. the action names of a merging-map heatmap).
- `table` (optional): `TableSpec(title, rows(events, meta) -> (headers, rows))`, a live table
  shown above the plots and redrawn with them (the leaderboard's ranking).
- `progress(events, meta) -> (fraction or None, text)` and `summary_md(result, meta) -> markdown`.
  The search log shows the engine's line for each event (`mergecore.search.report.event_line`).
- `meta(config, session)`: what the plots and the progress need besides the events;
  `stops_after`: what Stop waits for; `log_every`: how often the log shows a training step.

`dump_config` / `load_config` turn the config into JSON data and back (saved as
`app_search.json` in the out dir, so Resume works after the page or the app restarted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from mergecore.errors import MergeError, short
from mergecore.events import CancelToken, Event
from mergecore.yamlio import load_yaml

FIELD_KINDS = ("float", "int", "bool", "choice", "multichoice", "text", "yaml", "models", "base", "tasks",
               "operators")
TASKS_FROM = ("val", "test", "val_file")  # what a tasks field starts from (see `field_default`)


@dataclass
class Field:
    key: str
    label: str
    kind: str
    default: Any = None
    info: str = ""
    choices: Optional[list[Any]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    advanced: bool = False
    tasks_from: str = "val"  # a tasks field: the session's tasks it starts from (TASKS_FROM)

    def __post_init__(self) -> None:
        if self.kind not in FIELD_KINDS:
            raise ValueError(f"field '{self.key}': unknown kind '{self.kind}' (one of {', '.join(FIELD_KINDS)})")
        if self.tasks_from not in TASKS_FROM:
            raise ValueError(f"field '{self.key}': tasks_from must be one of {', '.join(TASKS_FROM)}")


def session_fields(models_info: str, base_info: str) -> list[Field]:
    """The models and base fields every search starts with (filled from the session)."""
    return [Field("models", "Models to merge", "models", info=models_info),
            Field("base", "Base model", "base", info=base_info)]


def tasks_field(label: str, info: str = "validation tasks keep the test split for the final comparison") -> Field:
    return Field("tasks", label, "tasks", info=info)


SEED = Field("seed", "Seed", "int", 0, minimum=0)


@dataclass
class PlotSpec:
    title: str
    figure: Callable[[list[dict[str, Any]], dict[str, Any]], Any]


@dataclass
class TableSpec:
    """A live table beside the plots: `rows(events, meta) -> (headers, rows)`, redrawn as the plots are."""

    title: str
    rows: Callable[[list[dict[str, Any]], dict[str, Any]], tuple[list[str], list[list[Any]]]]


@dataclass
class SearchSession:
    """What a search form sees of the browser session."""

    models: dict[str, str]  # name -> folder, in the session's order
    base: Optional[str]
    tasks: Optional[str] = None  # the family's test tasks (for final evaluations)
    val_tasks: Optional[str] = None  # the family's validation tasks (what searches score on)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "SearchSession":
        fam = (state or {}).get("family") or {}
        return cls({m["name"]: m["path"] for m in (state or {}).get("models", [])}, (state or {}).get("base"),
                   fam.get("tasks"), fam.get("val_tasks") or fam.get("tasks"))

    def path(self, name: str) -> str:
        if name not in self.models:
            raise MergeError(f"no model named '{name}' in this session")
        return self.models[name]

    def names(self, paths: Sequence[str]) -> list[str]:
        """The session's names of model folders (the folder's name for one not in the session)."""
        by_path = {p: n for n, p in self.models.items()}
        return [by_path.get(p, Path(p).name) for p in paths]


@dataclass
class SearchSpec:
    name: str
    title: str
    summary: str  # one paragraph, shown above the form
    fields: list[Field]
    make_config: Callable[[dict[str, Any], SearchSession], Any]
    plots: list[PlotSpec]
    progress: Callable[[list[dict[str, Any]], dict[str, Any]], tuple[Optional[float], str]]
    summary_md: Callable[[dict[str, Any], dict[str, Any]], str]
    meta: Callable[[Any, SearchSession], dict[str, Any]] = lambda config, session: {}
    log_every: int = 1  # the log shows every n-th training step (the first and the last)
    stops_after: str = "the current evaluation"  # what Stop waits for (the engine checks its cancel token there)
    table: Optional[TableSpec] = None  # a live table above the plots (e.g. the leaderboard's ranking)

    def field(self, key: str) -> Field:
        for f in self.fields:
            if f.key == key:
                return f
        raise KeyError(key)

    def engine(self) -> Any:
        """The engine's search of this name (its class: `config_class`, built from a config)."""
        from mergecore.search.base import search_class

        return search_class(self.name)

    def dump_config(self, config: Any) -> dict[str, Any]:
        return config.model_dump(mode="json")

    def load_config(self, data: dict[str, Any]) -> Any:
        return self.engine().config_class.model_validate(data)

    def run(self, config: Any, out_dir: Path, emit: Callable[[Event], None], cancel: CancelToken,
            resume: bool) -> dict[str, Any]:
        """Run (or resume) the search into `out_dir` through the engine's one search program
        (`mergecore.search.base.run_search`); a resumed run first sends its checkpointed history
        as `replayed` events, so the plots start from the beginning."""
        from mergecore.search.base import run_search

        search = self.engine()(config, Path(out_dir))  # the form's configs hold absolute paths
        return run_search(search, out_dir, on_event=emit, cancel=cancel, resume=resume, replay_history=True)


SEARCHES: dict[str, SearchSpec] = {}


def register_search(spec: SearchSpec) -> SearchSpec:
    SEARCHES[spec.name] = spec
    return spec


def get_search(name: str) -> SearchSpec:
    if name not in SEARCHES:
        raise MergeError(f"unknown search '{name}'; known: {', '.join(SEARCHES)}")
    return SEARCHES[name]


def search_names() -> list[str]:
    return list(SEARCHES)


def field_default(f: Field, session: SearchSession) -> Any:
    """The starting value of a field, the session-aware ones from the session."""
    if f.kind == "models":
        return [n for n in session.models if n != session.base]
    if f.kind == "base":
        return session.base
    if f.kind == "tasks":
        if f.tasks_from == "test":
            return session.tasks or ""
        if f.tasks_from == "val_file":  # a validation file apart from the test tasks, or none
            return session.val_tasks if session.val_tasks and session.val_tasks != session.tasks else ""
        return session.val_tasks or session.tasks or ""
    if f.kind == "multichoice":
        return list(f.default or [])
    return f.default


# ---------------------------------------------------------------------------------------------
# checking a form


def checked_inputs(values: dict[str, Any], session: SearchSession) -> tuple[str, list[str], str]:
    """(base name, names of the models to merge, tasks file) of a form, checked (one-line errors)."""
    base = values.get("base") or session.base
    if not base:
        raise MergeError("choose the base model")
    names = [n for n in (values.get("models") or []) if n != base]
    if not names:
        raise MergeError("tick at least one model to merge (besides the base)")
    tasks = str(values.get("tasks") or "").strip()
    if not tasks:
        raise MergeError("give a tasks YAML to score candidates on (the demo family has one)")
    if not Path(tasks).is_file():
        raise MergeError(f"tasks file not found: {short(tasks)}")
    return base, names, tasks


def validated(cls, data: dict[str, Any]):
    """`cls.model_validate(data)` with the first validation error as a one-line MergeError."""
    from pydantic import ValidationError

    try:
        return cls.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        raise MergeError(f"{loc}: {e['msg'].removeprefix('Value error, ')}") from None


def number(values: dict[str, Any], key: str, kind=float, default: Any = 0):
    """A form number (None / empty: `default`); a clear error for anything else."""
    v = values.get(key)
    if v is None or v == "":
        return default
    try:
        return kind(v)
    except (TypeError, ValueError):
        raise MergeError(f"{key}: {short(v)} is not a number") from None


def yaml_mapping(text: str, where: str) -> dict[str, Any]:
    """A YAML mapping typed into the form ({} when empty)."""
    data = load_yaml(text or "", where)  # size and alias limits: the text comes from the browser
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MergeError(f"{where}: write a YAML mapping, e.g. weight: {{min: 0.0, max: 1.0}}")
    return data


# ---------------------------------------------------------------------------------------------
# merge methods as operators and templates (what the method registry says they are)


def needs_stats(method) -> bool:
    """Whether a method reads statistics collected over data (`MergeMethod.stats`): a search has
    none to give it, so it is not offered as an operator or a template."""
    return bool(method.stats)


def operator_methods(n_models: int = 2) -> list[str]:
    """Merge methods usable as per-layer operators over `n_models` models (registry order)."""
    from mergecore.methods import all_methods

    return [name for name, m in all_methods().items() if m.operator and m.accepts(n_models) and not needs_stats(m)]


def starting_method() -> str:
    """The method a new evolutionary template starts on (the engine's default template)."""
    from mergecore.methods import DEFAULT_TEMPLATE

    return DEFAULT_TEMPLATE


def operator_entry(method_name: str, n_models: int) -> dict[str, Any]:
    """One operator for the YAML list: the method with the parameters it starts from."""
    from mergecore.methods import get_method

    params = get_method(method_name).starting_params()
    return {"method": method_name, "parameters": params} if params else {"method": method_name}


def default_operators() -> list[dict[str, Any]]:
    """The operators a new RMM form starts with (the engine's defaults, with their starting values)."""
    from mergecore.methods import DEFAULT_OPERATORS

    return [operator_entry(n, 2) for n in DEFAULT_OPERATORS]


def operators_yaml(entries: Sequence[dict[str, Any]]) -> str:
    return "".join("- " + yaml.safe_dump(e, default_flow_style=True, sort_keys=False).strip() + "\n" for e in entries)


def add_operator(text: str, method_name: str, n_models: int) -> str:
    text = (text or "").rstrip()
    return (text + "\n" if text else "") + operators_yaml([operator_entry(method_name, n_models)])


def parse_operators(text: str, n_models: int) -> list[dict[str, Any]]:
    """The operators YAML as [{name, method, parameters}], checked against the method registry."""
    from mergecore.search.rmm.layers import Operator

    data = load_yaml(text or "", "operators") or []  # size and alias limits: the text comes from the browser
    if not isinstance(data, list):
        raise MergeError("operators: write a YAML list of {method: NAME, parameters: {...}} entries")
    out, names = [], set()
    for i, item in enumerate(data):
        if isinstance(item, str):  # a bare method name: its starting parameters
            item = operator_entry(item, n_models)
        if not isinstance(item, dict) or "method" not in item:
            raise MergeError(f"operators: entry {i + 1} needs a 'method'")
        extra = set(item) - {"name", "method", "parameters"}
        if extra:
            raise MergeError(f"operators: entry {i + 1} has unknown key(s) {short(sorted(map(str, extra)))}")
        name = str(item.get("name") or item["method"])
        base_name, k = name, 2
        while name in names:
            name, k = f"{base_name}_{k}", k + 1
        names.add(name)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise MergeError(f"operators: entry {i + 1}: parameters must be a mapping")
        method, _ = Operator(name, str(item["method"]), dict(params)).resolved(n_models)  # unknown, out of range
        if needs_stats(method):
            raise MergeError(f"operators: {method.name} needs {method.stats} statistics collected over data, "
                             f"which a search cannot give it")
        if not method.accepts(n_models):
            most = "" if method.max_models is None else f" and at most {method.max_models}"
            raise MergeError(f"operators: {method.name} takes at least {method.min_models}{most} model(s); "
                             f"the search merges {n_models}")
        out.append({"name": name, "method": method.name, "parameters": dict(params)})
    return out


# ---------------------------------------------------------------------------------------------
# events: the latest data per step, series for the plots


def latest(events: Sequence[dict[str, Any]], kind: str, *keys: str) -> list[dict[str, Any]]:
    """The latest data of each step of `kind` (a step is told by `keys`), in step order (a resumed
    run repeats the steps after its checkpoint)."""
    by_key: dict[tuple, dict[str, Any]] = {}
    for e in events:
        if e.get("kind") == kind:
            d = e["data"]
            by_key[tuple(int(d.get(k) or 0) for k in keys)] = d
    return [by_key[k] for k in sorted(by_key)]


def has_event(events: Sequence[dict[str, Any]], kind: str) -> bool:
    return any(e.get("kind") == kind for e in events)


def task_series(rows: Sequence[dict[str, Any]], x: Callable[[dict[str, Any]], Any], scores: str,
                size: int = 5) -> list[dict[str, Any]]:
    """One line per task of the `scores` mapping of each row (tasks as the last row names them)."""
    tasks = list(rows[-1][scores]) if rows else []
    return [{"name": t, "x": [x(d) for d in rows if t in d[scores]], "y": [d[scores][t] for d in rows if t in d[scores]],
             "mode": "lines+markers", "width": 1.5, "size": size} for t in tasks]


def mean_series(name: str, x: list[Any], y: list[Any]) -> dict[str, Any]:
    return {"name": name, "x": x, "y": y, "mode": "lines+markers", "color": "#111827", "width": 3, "dash": "dash"}


def fraction(n: int, total: Optional[int]) -> Optional[float]:
    return min(1.0, n / total) if total else None


def wall_time(result: dict[str, Any]) -> str:
    """'N s in all': the engine counts a resumed run's wall time from its first start."""
    return f"{result.get('seconds', 0):.1f} s in all"


def scores_text(scores: Optional[dict[str, float]]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in (scores or {}).items())
