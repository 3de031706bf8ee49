"""The searches the Search tab runs: a small registry; each entry is a form, a runner and plots.

The Search tab knows nothing about any one search. It draws the form of the chosen entry, runs
it as a background job (`app.jobs`, kind 'search') and redraws its plots from the job's events
on every poll. A search registers a `SearchSpec`:

- `fields`: the form, as `Field`s. Kinds: 'float', 'int', 'bool', 'choice', 'text', 'yaml'
  (a YAML code box), and session-aware ones the tab fills in: 'models' (the session's models
  but the base; ticked boxes), 'base' (the session's base model), 'tasks' (a tasks YAML;
  defaults to the demo family's validation tasks) and 'operators' (a YAML list of merge
  methods with fixed parameters, with an "add" dropdown fed by the method registry).
  `advanced=True` puts a field in a closed accordion. The form follows the fields' order:
  the session's models, the scalars listed before the first YAML / tasks field, those wide
  fields, then the other scalars in rows of four.
- `make_config(values, session) -> config`: the form's values (field key -> value) and the
  session (`SearchSession`: model name -> folder, base, tasks) -> the search's own config
  object, or a `MergeError` with a one-line message.
- `run(config, out_dir, emit, cancel, resume) -> summary dict`: runs the search, writing into
  `out_dir`; `emit(Event)` for each event, `cancel` checked by the engine, `resume=True`
  continues from the checkpoint in `out_dir`. It must leave `recipe.yml` in `out_dir` when
  it finishes.
- `plots`: `PlotSpec(title, figure)` where `figure(events, meta) -> plotly Figure`; `events`
  are `Event.as_dict()`s of the job, `meta` what `meta(config, session)` returned at start
  (e.g. the action names of a merging-map heatmap).
- `progress(events, meta) -> (fraction or None, text)` and `summary_md(result, meta) -> markdown`;
  `log_line(event)`: the search log's line for an event, or None.
- `dump_config` / `load_config`: the config as JSON data and back (saved as
  `app_search.json` in the out dir, so Resume works after the page or the app restarted).

Registered below, in the tab's dropdown in this order: RMM (`mergecore.search.rmm`), DAM
(`mergecore.search.dam`: trained merge coefficients, or layer-wise AdaMerging) and the
evolutionary search (`mergecore.search.evo`: CMA-ES over a recipe template's parameters). A
resumed run replays the events before its checkpoint from the run's own log, so its plots start
from the beginning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from mergecore.errors import MergeError, short
from mergecore.events import CancelToken, Event
from mergecore.yamlio import load_yaml

from app import plots

FIELD_KINDS = ("float", "int", "bool", "choice", "text", "yaml", "models", "base", "tasks", "operators")


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

    def __post_init__(self) -> None:
        if self.kind not in FIELD_KINDS:
            raise ValueError(f"field '{self.key}': unknown kind '{self.kind}' (one of {', '.join(FIELD_KINDS)})")


@dataclass
class PlotSpec:
    title: str
    figure: Callable[[list[dict[str, Any]], dict[str, Any]], Any]


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


SearchFn = Callable[[Any, Path, Callable[[Event], None], CancelToken, bool], dict[str, Any]]


@dataclass
class SearchSpec:
    name: str
    title: str
    summary: str  # one paragraph, shown above the form
    fields: list[Field]
    make_config: Callable[[dict[str, Any], SearchSession], Any]
    run: SearchFn
    plots: list[PlotSpec]
    progress: Callable[[list[dict[str, Any]], dict[str, Any]], tuple[Optional[float], str]]
    summary_md: Callable[[dict[str, Any], dict[str, Any]], str]
    dump_config: Callable[[Any], dict[str, Any]]
    load_config: Callable[[dict[str, Any]], Any]
    meta: Callable[[Any, SearchSession], dict[str, Any]] = lambda config, session: {}
    log_line: Callable[[Event], Optional[str]] = lambda event: None  # a log line for an event, or None
    recipe_file: str = "recipe.yml"
    stops_after: str = "the current evaluation"  # what Stop waits for (the engine checks its cancel token there)

    def field(self, key: str) -> Field:
        for f in self.fields:
            if f.key == key:
                return f
        raise KeyError(key)


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


# ---------------------------------------------------------------------------------------------
# defaults of session-aware fields, and operators


def field_default(f: Field, session: SearchSession) -> Any:
    if f.kind == "models":
        return [n for n in session.models if n != session.base]
    if f.kind == "base":
        return session.base
    if f.kind == "tasks":
        return session.val_tasks or session.tasks or ""
    return f.default


def operator_methods(n_models: int = 2) -> list[str]:
    """Merge methods usable as per-layer operators over `n_models` models (registry order)."""
    from mergecore.methods import all_methods

    out = []
    for name, m in all_methods().items():
        if name == "passthrough":
            continue
        if m.min_models <= n_models and (m.max_models is None or n_models <= m.max_models):
            out.append(name)
    return out


def operator_entry(method_name: str, n_models: int) -> dict[str, Any]:
    """One operator for the YAML list: the method with starting parameters (required ones filled)."""
    from mergecore.methods import get_method

    m = get_method(method_name)
    params: dict[str, Any] = {}
    for p in m.params:
        if p.name == "weight" and p.required:
            params["weight"] = 1.0
        elif p.name == "density":
            params["density"] = 0.5
        elif p.required:
            params[p.name] = 0.5 if p.type is float else (p.choices[0] if p.choices else 1)
    if method_name == "task_arithmetic":
        params["lambda"] = 0.3
    entry: dict[str, Any] = {"method": method_name}
    if params:
        entry["parameters"] = params
    return entry


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
        raise MergeError("operators: write a YAML list, e.g. - {method: ties, parameters: {density: 0.5, weight: 1.0}}")
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
        op = Operator(name, str(item["method"]), dict(params))
        method, _ = op.resolved(n_models)  # unknown method / parameter, out of range: MergeError
        if n_models < method.min_models or (method.max_models is not None and n_models > method.max_models):
            most = "" if method.max_models is None else f" and at most {method.max_models}"
            raise MergeError(f"operators: {method.name} takes at least {method.min_models}{most} model(s); "
                             f"the search merges {n_models}")
        out.append({"name": name, "method": method.name, "parameters": dict(params)})
    return out


# ---------------------------------------------------------------------------------------------
# RMM


def _inputs(values: dict[str, Any], session: SearchSession) -> tuple[str, list[str], str]:
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


def _validated(cls, data: dict[str, Any]):
    """`cls.model_validate(data)` with the first validation error as a one-line MergeError."""
    from pydantic import ValidationError

    try:
        return cls.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        raise MergeError(f"{loc}: {e['msg'].removeprefix('Value error, ')}") from None


def _number(values: dict[str, Any], key: str, kind=float, default: Any = 0):
    """A form number (None / empty: `default`); a clear error for anything else."""
    v = values.get(key)
    if v is None or v == "":
        return default
    try:
        return kind(v)
    except (TypeError, ValueError):
        raise MergeError(f"{key}: {short(v)} is not a number") from None


def _names_by_path(session: SearchSession, paths: Sequence[str]) -> list[str]:
    by_path = {p: n for n, p in session.models.items()}
    return [by_path.get(p, Path(p).name) for p in paths]


def _config_loader(module: str, cls: str) -> Callable[[dict[str, Any]], Any]:
    """`load_config` for a search whose config is a pydantic model (imported on first use)."""

    def load(d: dict[str, Any]):
        import importlib

        return getattr(importlib.import_module(module), cls).model_validate(d)

    return load


def _rmm_config(values: dict[str, Any], session: SearchSession):
    from pydantic import ValidationError

    from mergecore.search.rmm.run import RMMConfig

    base, names, tasks = _inputs(values, session)
    ops = parse_operators(values.get("operators") or "", len(names))
    try:
        return RMMConfig(
            base_model=session.path(base), models=[session.path(n) for n in names], operators=ops, tasks=tasks,
            data_ratio=float(values.get("data_ratio") or 0), episodes=int(values.get("episodes") or 0),
            dar=bool(values.get("dar")), seed=int(values.get("seed") or 0),
            update_every=int(values.get("update_every") or 0), rerank_top=int(values.get("rerank_top") or 0),
            max_steps=int(values["max_steps"]) if values.get("max_steps") else None,
        )
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        raise MergeError(f"{loc}: {e['msg'].removeprefix('Value error, ')}") from None


def _rmm_meta(config, session: SearchSession) -> dict[str, Any]:
    by_path = {p: n for n, p in session.models.items()}
    names = [by_path.get(p, Path(p).name) for p in config.models]
    ops = [o.name or o.method for o in config.operators]
    try:
        from app.state import model_info

        layers = int(model_info(config.base_model)["layers"])
    except Exception:
        layers = 0
    return {"episodes": config.episodes, "layers": layers, "models": names, "operators": ops, "action_names": names + ops,
            "base": by_path.get(config.base_model, Path(config.base_model).name), "dar": config.dar,
            "data_ratio": config.data_ratio}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _rmm_run(config, out_dir: Path, emit: Callable[[Event], None], cancel: CancelToken, resume: bool) -> dict[str, Any]:
    from mergecore.search.rmm.run import run_rmm

    def on_event(ev: Event) -> None:
        if ev.kind == "rmm.resumed":
            # the episodes before the checkpoint, so the plots show the whole run
            done = int(ev.data.get("episode", 0))
            for info in _read_jsonl(out_dir / "rmm_log.jsonl"):
                if int(info.get("episode", -1)) < done:
                    emit(Event("rmm.episode", dict(info, replayed=True)))
        emit(ev)

    return run_rmm(config, out_dir, out_dir, on_event=on_event, cancel=cancel, resume=resume)


def _episodes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest data of each episode (a resumed run repeats the episodes after its checkpoint)."""
    by_ep: dict[int, dict[str, Any]] = {}
    for e in events:
        if e.get("kind") == "rmm.episode":
            by_ep[int(e["data"]["episode"])] = e["data"]
    return [by_ep[k] for k in sorted(by_ep)]


def _rmm_reward_figure(events, meta):
    eps = _episodes(events)
    if not eps:
        return plots.empty_figure("Reward per episode")
    x = [d["episode"] + 1 for d in eps]
    series = [
        {"name": "raw reward", "x": x, "y": [d["raw_reward"] for d in eps], "mode": "markers", "color": "#94a3b8",
         "size": 6},
        {"name": "DAR reward" if meta.get("dar", True) else "reward (DAR off)", "x": x,
         "y": [d["dar_reward"] for d in eps], "mode": "lines", "color": "#2563eb"},
        {"name": "best so far", "x": [d["episode"] + 1 for d in eps if d.get("best_reward") is not None],
         "y": [d["best_reward"] for d in eps if d.get("best_reward") is not None], "mode": "lines",
         "color": "#16a34a", "width": 3},
    ]
    return plots.line_figure("Reward per episode (raw, DAR, best so far)", series, x_title="episode",
                             y_title="reward (100 × mean score)")


def _rmm_time_figure(events, meta):
    eps = _episodes(events)
    if not eps:
        return plots.empty_figure("Time per evaluation")
    x = [d["episode"] + 1 for d in eps]
    return plots.line_figure("Time per evaluation (0: reused, fell off, or cached)", [
        {"name": "seconds", "x": x, "y": [d.get("eval_seconds", 0.0) for d in eps], "kind": "bar", "color": "#f97316"},
    ], x_title="episode", y_title="seconds")


def _rmm_metrics_figure(events, meta):
    eps = [d for d in _episodes(events) if d.get("metrics")]
    if not eps:
        return plots.empty_figure("Task metrics per episode")
    tasks = list(eps[0]["metrics"])
    series = [{"name": t, "x": [d["episode"] + 1 for d in eps if t in d["metrics"]],
               "y": [d["metrics"][t] for d in eps if t in d["metrics"]], "mode": "lines+markers", "width": 1.5,
               "size": 4} for t in tasks]
    return plots.line_figure("Task metrics per episode (on the episode's data subset)", series, x_title="episode",
                             y_title="score")


def merging_map(trajectory: Sequence[Sequence[int]], n_actions: int, n_layers: int) -> tuple[list[list[float]], list[list[str]]]:
    """(counts, text) of a trajectory's emitted (layer, action) pairs, actions x layers; the
    text of a cell lists the output positions it fills (#1 is the first layer of the merge)."""
    z = [[0.0] * n_layers for _ in range(n_actions)]
    text = [[""] * n_layers for _ in range(n_actions)]
    for pos, (layer, action) in enumerate(trajectory):
        if 0 <= action < n_actions and 0 <= layer < n_layers:
            z[action][layer] += 1
            text[action][layer] = (text[action][layer] + " " if text[action][layer] else "") + f"#{pos + 1}"
    return z, text


def _rmm_heatmap_figure(events, meta):
    eps = _episodes(events)
    best = next((d["best_trajectory"] for d in reversed(eps) if d.get("best_trajectory")), None)
    names = list(meta.get("action_names") or [])
    if not best or not names:
        return plots.empty_figure("Best merging map (layers × actions)")
    n_layers = max(int(meta.get("layers") or 0), max(layer for layer, _ in best) + 1)
    z, text = merging_map(best, len(names), n_layers)
    reward = next((d["best_reward"] for d in reversed(eps) if d.get("best_reward") is not None), None)
    title = "Best merging map (layers × actions)" + (f", subset reward {reward:.1f}" if reward is not None else "")
    return plots.heatmap_figure(title, z, [f"layer {i}" for i in range(n_layers)], names, text=text,
                                x_title="source layer (cells: position in the merged model)")


def _rmm_progress(events, meta) -> tuple[Optional[float], str]:
    eps = _episodes(events)
    total = int(meta.get("episodes") or 0) or None
    if not eps:
        loading = any(e.get("kind") == "rmm.loading" for e in events)
        return 0.0, "loading the models and the tasks ..." if loading else "starting ..."
    last = eps[-1]
    n = len(eps)
    best = last.get("best_reward")
    timed = [d.get("eval_seconds", 0.0) for d in eps if d.get("eval_seconds")]
    per = sum(timed[-20:]) / len(timed[-20:]) if timed else 0.0
    text = f"episode {n}/{total or '?'} · best {best:.2f}" if best is not None else f"episode {n}/{total or '?'}"
    text += f" · {last.get('evaluations', 0)} evaluations · {per:.2f} s each"
    if total and n >= total and not any(e.get("kind") == "rmm.done" for e in events):
        text += " · re-scoring the best trajectories on all the data ..."
    return (min(1.0, n / total) if total else None), text


def _rmm_summary(result: dict[str, Any], meta: dict[str, Any]) -> str:
    best = result["best"]
    names = list(meta.get("action_names") or [])
    steps = []
    for pos, (layer, action) in enumerate(best["emitted"]):
        src = names[action] if action < len(names) else f"action {action}"
        steps.append(f"#{pos + 1} = layer {layer} of **{src}**")
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in (best.get("metrics") or {}).items())
    return (f"**Best merge**: reward **{best['reward']:.2f}** ({best['scored_on']}), found at episode "
            f"{best['episode'] + 1}; {len(best['emitted'])} layers: " + "; ".join(steps) + "."
            + (f"\n\nTask scores: {metrics}." if metrics else "")
            + f"\n\n{result['episodes']} episodes, {result['evaluations']} evaluations "
              f"({result['eval_seconds']:.1f} s evaluating), {result['seconds']:.1f} s in all.")


def _rmm_log_line(ev: Event) -> Optional[str]:
    d = ev.data
    if ev.kind == "rmm.episode" and not d.get("replayed"):
        best = d.get("best_reward")
        return (f"episode {d['episode'] + 1}: reward {d['raw_reward']:.2f} (DAR {d['dar_reward']:.2f}), best "
                f"{'-' if best is None else f'{best:.2f}'}, depth {d['depth']}, {d['eval_seconds']:.2f} s: "
                + " ".join(d.get("actions") or []))
    if ev.kind == "rmm.loading":
        return f"loading {len(d.get('models') or [])} models and the tasks ..."
    if ev.kind == "rmm.resumed":
        return f"resumed from the checkpoint at episode {d.get('episode')}"
    if ev.kind == "rmm.done":
        return f"done: best reward {d.get('best_reward', 0):.2f}; recipe {d.get('recipe')}"
    return None


RMM = register_search(SearchSpec(
    name="rmm",
    title="RMM: reinforced model merging",
    summary=("An agent walks the layers of the merged model and picks, for each layer, one source model's layer "
             "or a merge operator applied to that layer (or skips it, or goes back); each episode's model is "
             "scored on a slice of the tasks' validation data and PPO learns from the rewards. The best "
             "trajectory becomes a replayable `passthrough` recipe (RMM, Lu et al. 2025)."),
    fields=[
        Field("models", "Models to merge", "models", info="the session's models (the base is not merged)"),
        Field("base", "Base model", "base", info="task vectors are taken against it; embeddings and heads come "
                                                 "from it"),
        Field("operators", "Merge operators (one per line; each merges one layer of all the models)", "operators",
              default=operators_yaml([{"method": "ties", "parameters": {"density": 0.5, "weight": 1.0}},
                                      {"method": "task_arithmetic", "parameters": {"weight": 1.0, "lambda": 0.3}}])),
        Field("tasks", "Tasks YAML (scored each episode)", "tasks",
              info="validation tasks keep the test split for the final comparison"),
        Field("data_ratio", "Data ratio per episode", "float", 0.1, minimum=0.001, maximum=1.0,
              info="fraction of each task scored per episode; the subsets rotate"),
        Field("episodes", "Episodes", "int", 40, minimum=1, maximum=100000),
        Field("dar", "Dynamic average reward (DAR)", "bool", True, info="smooth the noisy subset rewards"),
        Field("seed", "Seed", "int", 0, minimum=0),
        Field("update_every", "PPO update every (episodes)", "int", 4, minimum=1, advanced=True,
              info="also the checkpoint interval: Stop resumes from the last update"),
        Field("rerank_top", "Re-score the top trajectories on all the data", "int", 3, minimum=0, advanced=True),
        Field("max_steps", "Max steps per episode (0: twice the layers)", "int", 0, minimum=0, advanced=True),
    ],
    make_config=_rmm_config,
    run=_rmm_run,
    plots=[PlotSpec("Reward per episode", _rmm_reward_figure), PlotSpec("Time per evaluation", _rmm_time_figure),
           PlotSpec("Task metrics", _rmm_metrics_figure), PlotSpec("Best merging map", _rmm_heatmap_figure)],
    progress=_rmm_progress,
    summary_md=_rmm_summary,
    dump_config=lambda c: c.model_dump(mode="json"),
    load_config=_config_loader("mergecore.search.rmm.run", "RMMConfig"),
    meta=_rmm_meta,
    log_line=_rmm_log_line,
))


# ---------------------------------------------------------------------------------------------
# DAM (and layer-wise AdaMerging)

DAM_REGULARISERS = ("cos", "l1", "l2")


def _task_pairs(names: list[str], paths: list[str], tasks_file: str) -> list[Any]:
    """Each model's D_i: the task of its name, else the task scored with its head (`head_from`),
    else the tasks in order when there are as many as models."""
    from mergecore.eval.tasks import load_tasks

    tasks = load_tasks(tasks_file)
    heads: dict[str, str] = {}
    for t in tasks:
        try:
            head = t.head_path() if hasattr(t, "head_path") else None
        except MergeError:
            head = None
        if head is not None:
            heads.setdefault(str(Path(head).resolve()), t.name)
    task_names = [t.name for t in tasks]
    paired = [n if n in task_names else heads.get(str(Path(p).resolve())) for n, p in zip(names, paths)]
    if all(paired):
        return [{"model": p, "task": t} for p, t in zip(paths, paired)]
    if len(tasks) == len(names):
        return list(paths)
    lost = ", ".join(n for n, t in zip(names, paired) if not t)
    raise MergeError(f"no task for {lost}: DAM trains each model's coefficients on its own task's inputs; the tasks "
                     f"file has {short(task_names)} (a task pairs with the model of its name or its head_from)")


def _dam_config(values: dict[str, Any], session: SearchSession):
    from mergecore.search.dam.run import DAMConfig

    base, names, tasks = _inputs(values, session)
    paths = [session.path(n) for n in names]
    ratio = _number(values, "eval_subset", float, 1.0)
    if not 0 < ratio <= 1:
        raise MergeError("eval_subset: the part of the tasks scored by the periodic evaluations must be in (0, 1]")
    eval_every = _number(values, "eval_every", int, 0)
    return _validated(DAMConfig, {
        "base_model": session.path(base), "models": _task_pairs(names, paths, tasks),
        "train_tasks": tasks, "eval_tasks": tasks, "eval_subset": None if ratio >= 1 else ratio,
        "granularity": values.get("granularity") or "column",
        "loss": {"kind": values.get("loss") or "kl", "temperature": _number(values, "temperature", float, 2.0),
                 "lambda_cos": _number(values, "lambda_cos"), "lambda_l1": _number(values, "lambda_l1"),
                 "lambda_l2": _number(values, "lambda_l2")},
        "optimizer": {"lr": _number(values, "lr", float, 0.01), "weight_decay": _number(values, "weight_decay")},
        "steps": _number(values, "steps", int), "batch_size": _number(values, "batch_size", int),
        "examples_per_task": _number(values, "examples_per_task", int),
        "eval_every": eval_every, "checkpoint_every": eval_every if eval_every > 0 else 10,
        "seed": _number(values, "seed", int),
    })


def _dam_meta(config, session: SearchSession) -> dict[str, Any]:
    refs = config.model_refs()
    tasks = [m.task if not isinstance(m, str) and m.task else None for m in config.models]
    return {"steps": config.steps, "models": _names_by_path(session, refs), "tasks": tasks,
            "base": _names_by_path(session, [config.base_model])[0], "granularity": config.granularity,
            "loss": config.loss.kind, "lambdas": {"cos": config.loss.lambda_cos, "l1": config.loss.lambda_l1,
                                                   "l2": config.loss.lambda_l2},
            "eval_every": config.eval_every, "eval_subset": config.eval_subset}


def _dam_run(config, out_dir: Path, emit: Callable[[Event], None], cancel: CancelToken, resume: bool) -> dict[str, Any]:
    from mergecore.search.dam.run import run_dam

    def on_event(ev: Event) -> None:
        if ev.kind == "dam.resumed":
            # the steps and evaluations before the checkpoint (the log still holds them), for the plots
            done = int(ev.data.get("step", 0))
            for row in _read_jsonl(out_dir / "dam_log.jsonl"):
                kind = row.pop("event", None)
                if kind in ("step", "eval") and int(row.get("step", -1)) <= done and not row.get("final"):
                    emit(Event(f"dam.{kind}", dict(row, replayed=True)))
        emit(ev)

    return run_dam(config, out_dir, out_dir, on_event=on_event, cancel=cancel, resume=resume)


def _dam_steps(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest data of each step (a resumed run repeats the steps after its checkpoint)."""
    by_step: dict[int, dict[str, Any]] = {}
    for e in events:
        if e.get("kind") == "dam.step":
            by_step[int(e["data"]["step"])] = e["data"]
    return [by_step[k] for k in sorted(by_step)]


def _dam_evals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_step: dict[tuple[int, bool], dict[str, Any]] = {}
    for e in events:
        if e.get("kind") == "dam.eval":
            d = e["data"]
            by_step[(int(d["step"]), bool(d.get("final")))] = d
    return [by_step[k] for k in sorted(by_step)]


def _dam_loss_figure(events, meta):
    steps = _dam_steps(events)
    title = "Loss per step (total, and each task's term)"
    if not steps:
        return plots.empty_figure(title)
    x = [d["step"] for d in steps]
    terms = [k for k in steps[-1]["terms"] if k not in DAM_REGULARISERS]
    terms = [k for k in terms if "/" not in k] + [k for k in terms if "/" in k]  # the sum first, then each task
    series = [{"name": "total", "x": x, "y": [d["loss"] for d in steps], "color": "#111827", "width": 3}]
    for i, k in enumerate(terms):
        series.append({"name": k if "/" in k else f"{k} (sum over tasks)", "x": x,
                       "y": [d["terms"].get(k) for d in steps], "color": plots.PALETTE[i % len(plots.PALETTE)],
                       "width": 2 if "/" not in k else 1.5, "dash": "dash" if "/" not in k else "solid"})
    return plots.line_figure(title, series, x_title="step", y_title=f"{meta.get('loss', 'loss')} loss")


def _dam_regulariser_figure(events, meta):
    steps = _dam_steps(events)
    title = "Regularisers per step (raw; the loss adds λ × each)"
    if not steps:
        return plots.empty_figure(title)
    x = [d["step"] for d in steps]
    lambdas = meta.get("lambdas") or {}
    names = {"cos": "cos: Σ cos(c_i, c_j)", "l1": "l1: Σ |c|", "l2": "l2: Σ c²"}
    series = [{"name": f"{names[k]} (λ {lambdas.get(k, 0):g})", "x": x, "y": [d["terms"].get(k) for d in steps],
               "dash": "solid" if lambdas.get(k) else "dot"} for k in DAM_REGULARISERS]
    return plots.line_figure(title, series, x_title="step", y_title="value")


def _dam_metrics_figure(events, meta):
    evals = _dam_evals(events)
    title = "Task metrics per evaluation"
    if not evals:
        return plots.empty_figure(title)
    tasks = list(evals[-1]["scores"])
    series = [{"name": t, "x": [d["step"] for d in evals if t in d["scores"]],
               "y": [d["scores"][t] for d in evals if t in d["scores"]], "mode": "lines+markers", "width": 1.5,
               "size": 5} for t in tasks]
    series.append({"name": "mean", "x": [d["step"] for d in evals], "y": [d["mean"] for d in evals],
                   "mode": "lines+markers", "color": "#111827", "width": 3, "dash": "dash"})
    sub = meta.get("eval_subset")
    note = f" (on {sub:g} of the data; the final one on all)" if sub else ""
    return plots.line_figure(title + note, series, x_title="step", y_title="score")


def _dam_grad_figure(events, meta):
    steps = [d for d in _dam_steps(events) if d.get("grad_norm") is not None]
    title = "Gradient norm of the coefficients per step"
    if not steps:
        return plots.empty_figure(title)
    return plots.line_figure(title + " (before clipping)", [
        {"name": "gradient norm", "x": [d["step"] for d in steps], "y": [d["grad_norm"] for d in steps],
         "color": "#9333ea"},
    ], x_title="step", y_title="‖∇c‖")


def _dam_progress(events, meta) -> tuple[Optional[float], str]:
    steps = _dam_steps(events)
    total = int(meta.get("steps") or 0) or None
    if not steps:
        kinds = {e.get("kind") for e in events}
        if "dam.start" in kinds:
            return 0.0, "evaluating the starting point ..."
        if "dam.teachers" in kinds:
            return 0.0, "setting up the training ..."
        if "dam.data" in kinds:
            return 0.0, "computing the source models' outputs (teachers) ..."
        if "dam.loading" in kinds:
            return 0.0, "loading the models and each task's data ..."
        return 0.0, "starting ..."
    last = steps[-1]
    n = int(last["step"])
    per = [d["seconds"] for d in steps[-20:] if d.get("seconds")]
    text = f"step {n}/{total or '?'} · loss {last['loss']:.4g}"
    evals = _dam_evals(events)
    if evals:
        text += f" · mean score {evals[-1]['mean']:.3f} (step {evals[-1]['step']})"
    if per:
        text += f" · {sum(per) / len(per):.2f} s/step"
    if total and n >= total and not any(e.get("kind") == "dam.done" for e in events):
        text += " · final evaluation on all the data ..."
    return (min(1.0, n / total) if total else None), text


def _dam_summary(result: dict[str, Any], meta: dict[str, Any]) -> str:
    ev = result.get("eval") or {}
    scores = ", ".join(f"{k} {v:.3f}" for k, v in (ev.get("scores") or {}).items())
    kind = "per-column (DAM)" if meta.get("granularity") == "column" else "layer-wise (AdaMerging)"
    out = (f"**Trained** {result['coefficients']} {kind} coefficients on {len(result.get('tensors') or [])} tensors "
           f"in {result['steps']} steps ({meta.get('loss', 'kl')} loss, {result.get('examples_seen', 0)} examples).")
    if ev:
        out += f"\n\nFinal evaluation (step {ev.get('step')}): mean **{ev['mean']:.3f}**" + (
            f"; {scores}." if scores else ".")
    out += ("\n\nThe recipe (`recipe.yml`, method `dam`) reads the coefficients from `dam_coefficients.safetensors` "
            "next to it; `mergecore merge` replays it."
            f"\n\n{result.get('train_seconds', 0):.1f} s training, {result.get('eval_seconds', 0):.1f} s evaluating, "
            f"{result.get('teacher_seconds', 0):.1f} s for the teachers, {result.get('seconds', 0):.1f} s in all.")
    return out


def _dam_log_line(ev: Event) -> Optional[str]:
    d = ev.data
    if d.get("replayed"):
        return None
    if ev.kind == "dam.step":
        if d["step"] % 10 and d["step"] not in (1, d.get("steps")):
            return None
        terms = " ".join(f"{k} {v:.4g}" for k, v in d["terms"].items() if "/" not in k)
        return f"step {d['step']}/{d.get('steps')}: loss {d['loss']:.5g} ({terms}), {d['seconds']:.2f} s"
    if ev.kind == "dam.eval":
        scores = " ".join(f"{k} {v:.3f}" for k, v in d["scores"].items())
        label = "final evaluation" if d.get("final") else "evaluation"
        return f"{label} at step {d['step']}: mean {d['mean']:.3f} ({scores})"
    if ev.kind == "dam.loading":
        return f"loading {len(d.get('models') or [])} models and the tasks ..."
    if ev.kind == "dam.teachers":
        return f"teachers: {d.get('mode')} ({d.get('seconds', 0):.1f} s)"
    if ev.kind == "dam.start":
        return f"training {d.get('coefficients')} coefficients on {d.get('tensors')} tensors from step {d.get('step')}"
    if ev.kind == "dam.resumed":
        return f"resumed from the checkpoint at step {d.get('step')}"
    if ev.kind == "dam.done":
        return f"done; recipe {d.get('recipe')}"
    return None


DAM = register_search(SearchSpec(
    name="dam",
    stops_after="the current training step or evaluation",
    title="DAM: trained merge coefficients",
    summary=("Differentiable Adaptive Merging trains merge coefficients by gradient descent: the merged model runs "
             "on each source model's task inputs (labels are never used) and is pulled towards that model's outputs "
             "(KL or MSE) or made confident (entropy), with optional regularisers. *column*: one coefficient per "
             "model and input column of every tensor (DAM, Gauthier-Caron et al. 2024); *layer*: one per model and "
             "tensor (layer-wise AdaMerging, Yang et al. 2024). The trained coefficients become a replayable `dam` "
             "recipe."),
    fields=[
        Field("models", "Models to merge", "models", info="each is paired with its task (by name or head_from)"),
        Field("base", "Base model", "base", info="embeddings, norms and heads come from it"),
        Field("tasks", "Tasks YAML (each model's training inputs; scored at every evaluation)", "tasks",
              info="one task per model; the demo's validation tasks keep the test split for the final comparison"),
        Field("granularity", "Granularity", "choice", "column",
              choices=[("column: one coefficient per input column (DAM)", "column"),
                       ("layer: one per model and tensor (layer-wise AdaMerging)", "layer")]),
        Field("loss", "Loss", "choice", "kl",
              choices=[("kl: to each model's outputs", "kl"), ("entropy: confident predictions", "entropy"),
                       ("mse: to each model's logits", "mse")]),
        Field("temperature", "KL temperature", "float", 2.0, minimum=0.01),
        Field("steps", "Steps", "int", 20, minimum=1, maximum=1000000),
        Field("batch_size", "Batch size (examples per task per step)", "int", 16, minimum=1),
        Field("examples_per_task", "Examples per task", "int", 128, minimum=1,
              info="a seeded sample of each task's inputs"),
        Field("lr", "Learning rate", "float", 0.01, minimum=0.0),
        Field("weight_decay", "Weight decay", "float", 0.0, minimum=0.0, info="pulls the coefficients towards 0"),
        Field("seed", "Seed", "int", 0, minimum=0),
        Field("lambda_cos", "λ_cos (coefficients of different models apart)", "float", 0.0, minimum=0.0,
              advanced=True),
        Field("lambda_l1", "λ1 (L1 of the coefficients)", "float", 0.0, minimum=0.0, advanced=True),
        Field("lambda_l2", "λ2 (L2 of the coefficients)", "float", 0.0, minimum=0.0, advanced=True),
        Field("eval_every", "Evaluate every (steps; 0: only at the end)", "int", 5, minimum=0, advanced=True,
              info="also the checkpoint interval (Stop saves at the current step)"),
        Field("eval_subset", "Part of the tasks the periodic evaluations score", "float", 0.25, minimum=0.001,
              maximum=1.0, advanced=True, info="the final evaluation scores all of it"),
    ],
    make_config=_dam_config,
    run=_dam_run,
    plots=[PlotSpec("Loss per step", _dam_loss_figure), PlotSpec("Task metrics", _dam_metrics_figure),
           PlotSpec("Regularisers", _dam_regulariser_figure), PlotSpec("Gradient norm", _dam_grad_figure)],
    progress=_dam_progress,
    summary_md=_dam_summary,
    dump_config=lambda c: c.model_dump(mode="json"),
    load_config=_config_loader("mergecore.search.dam.run", "DAMConfig"),
    meta=_dam_meta,
    log_line=_dam_log_line,
))


# ---------------------------------------------------------------------------------------------
# evolutionary search (CMA-ES over a recipe template)


def evo_methods() -> list[str]:
    """Merge methods with a real-valued parameter to search (registry order)."""
    from mergecore.methods import all_methods

    out = []
    for name, m in all_methods().items():
        if name in ("passthrough", "dam"):
            continue
        if any(p.type is float and not p.choices for p in m.params):
            out.append(name)
    return out


def default_bounds(method_name: str) -> dict[str, dict[str, float]]:
    """The method's required real parameters, searched within [0, 1] (cut to their range)."""
    from mergecore.methods import get_method

    out = {}
    for p in get_method(method_name).params:
        if p.type is float and not p.choices and p.required:
            lo, hi, r = 0.0, 1.0, p.range
            if r is not None and r.lo is not None and r.lo >= lo:
                lo = r.lo + (0.01 if r.lo_open else 0.0)
            if r is not None and r.hi is not None and r.hi <= hi:
                hi = r.hi - (0.01 if r.hi_open else 0.0)
            if lo < hi:
                out[p.name] = {"min": lo, "max": hi}
    return out


def _yaml_mapping(text: str, where: str) -> dict[str, Any]:
    data = load_yaml(text or "", where)  # size and alias limits: the text comes from the browser
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MergeError(f"{where}: write a YAML mapping, e.g. weight: {{min: 0.0, max: 1.0}}")
    return data


def parse_bounds(text: str, method_name: str) -> dict[str, dict[str, Any]]:
    """The searched parameters: `name: {min, max[, init]}` or `name: [min, max]`; empty: the
    method's required real parameters."""
    data = _yaml_mapping(text, "searched parameters")
    if not data:
        found = default_bounds(method_name)
        if not found:
            raise MergeError(f"searched parameters: name at least one parameter of '{method_name}' to search")
        return found
    out = {}
    for name, b in data.items():
        if isinstance(b, (list, tuple)) and len(b) in (2, 3):
            b = dict(zip(("min", "max", "init"), b))
        if not isinstance(b, dict):
            raise MergeError(f"searched parameters: {short(name, 60)} needs bounds, e.g. {short(name, 60)}: "
                             f"{{min: 0.0, max: 1.0}}")
        out[str(name)] = b
    return out


def _evo_config(values: dict[str, Any], session: SearchSession):
    from mergecore.search.evo.run import EvoConfig, check_config

    base, names, tasks = _inputs(values, session)
    method = values.get("method") or "task_arithmetic"
    filters = [f.strip() for f in str(values.get("filters") or "").split(",") if f.strip()]
    popsize = _number(values, "popsize", int, 0)
    config = _validated(EvoConfig, {
        "method": method, "base_model": session.path(base), "models": [session.path(n) for n in names],
        "parameters": parse_bounds(values.get("parameters") or "", method),
        "fixed": _yaml_mapping(values.get("fixed") or "", "fixed parameters"),
        "layer_groups": _number(values, "layer_groups", int, 1), "filters": filters, "tasks": tasks,
        "data_ratio": _number(values, "data_ratio", float, 0.25), "max_evals": _number(values, "max_evals", int),
        "sigma0": _number(values, "sigma0", float, 1 / 6), "popsize": popsize if popsize > 0 else None,
        "seed": _number(values, "seed", int), "backend": "local",
    })
    check_config(config, Path(tasks).parent)  # the template against the models' headers: errors now, not later
    return config


def _evo_popsize(config, genes: int) -> int:
    import math

    return int(config.popsize) if config.popsize else 4 + int(3 * math.log(max(genes, 1)))


def _evo_meta(config, session: SearchSession) -> dict[str, Any]:
    genome = config.genome(Path(config.tasks).parent)
    pop = _evo_popsize(config, genome.dim)
    return {"max_evals": config.max_evals, "popsize": pop, "expected_evals": max(1, config.max_evals // pop) * pop,
            "genes": genome.dim, "labels": genome.labels(), "method": config.method,
            "models": _names_by_path(session, config.models),
            "base": _names_by_path(session, [config.base_model])[0] if config.base_model else None}


def _evo_run(config, out_dir: Path, emit: Callable[[Event], None], cancel: CancelToken, resume: bool) -> dict[str, Any]:
    from mergecore.search.evo.run import run_evo

    root = Path(config.tasks).parent

    def on_event(ev: Event) -> None:
        if ev.kind == "evo.resumed":
            # the generations before the checkpoint and its best candidate, for the plots
            done = int(ev.data.get("generation", 0))
            for row in _read_jsonl(out_dir / "evo_log.jsonl"):
                if int(row.get("generation", -1)) < done:
                    emit(Event("evo.generation", dict(row, replayed=True)))
            best = _evo_checkpoint_best(config, root, out_dir)
            if best:
                emit(Event("evo.best", best))
        emit(ev)

    return run_evo(config, root, out_dir, on_event=on_event, cancel=cancel, resume=resume)


def _evo_checkpoint_best(config, root: Path, out_dir: Path) -> Optional[dict[str, Any]]:
    """The best candidate of the checkpoint in `out_dir` as an `evo.best` event's data (or None)."""
    from mergecore.search.evo.search import checkpoint_best

    try:
        best = checkpoint_best(out_dir)  # safetensors + JSON, never unpickled
        if best is None:
            return None
        genome = config.genome(root)
        return {"generation": best.generation, "evaluation": best.evaluation, "score": best.score,
                "scores": best.scores, "values": dict(zip(genome.labels(), genome.values(best.genome))),
                "replayed": True}
    except Exception:  # noqa: BLE001 - only the plot of the best's parameters misses it
        return None


def _evo_generations(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest data of each generation (a resumed run redoes a generation cut short)."""
    by_gen: dict[int, dict[str, Any]] = {}
    for e in events:
        if e.get("kind") == "evo.generation":
            by_gen[int(e["data"]["generation"])] = e["data"]
    return [by_gen[k] for k in sorted(by_gen)]


def _evo_candidates(gens: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(evaluation number from 1, score) of every candidate, in the order they were scored."""
    out = []
    for g in gens:
        scores = list(g.get("scores") or [])
        first = int(g["evaluations"]) - len(scores)
        out += [(first + i + 1, float(s)) for i, s in enumerate(scores)]
    return out


def _evo_score_figure(events, meta):
    cands = _evo_candidates(_evo_generations(events))
    title = "Score of each candidate and the best so far"
    if not cands:
        return plots.empty_figure(title)
    best, running = [], float("-inf")
    for _, s in cands:
        running = max(running, s)
        best.append(running)
    x = [n for n, _ in cands]
    return plots.line_figure(title, [
        {"name": "candidate", "x": x, "y": [s for _, s in cands], "mode": "markers", "color": "#94a3b8", "size": 6},
        {"name": "best so far", "x": x, "y": best, "mode": "lines", "color": "#16a34a", "width": 3},
    ], x_title="evaluation", y_title="mean task score (data subset)")


def _evo_metrics_figure(events, meta):
    gens = [g for g in _evo_generations(events) if g.get("best_scores")]
    title = "Task metrics of the best so far"
    if not gens:
        return plots.empty_figure(title)
    tasks = list(gens[-1]["best_scores"])
    x = [g["evaluations"] for g in gens]
    series = [{"name": t, "x": x, "y": [g["best_scores"].get(t) for g in gens], "mode": "lines+markers",
               "width": 1.5, "size": 5} for t in tasks]
    series.append({"name": "mean (the score)", "x": x, "y": [g["best"] for g in gens], "mode": "lines+markers",
                   "color": "#111827", "width": 3, "dash": "dash"})
    return plots.line_figure(title + " (after each generation)", series, x_title="evaluation", y_title="score")


def _evo_generation_figure(events, meta):
    gens = _evo_generations(events)
    title = "Population per generation"
    if not gens:
        return plots.empty_figure(title)
    x = [g["generation"] + 1 for g in gens]
    return plots.line_figure(title + " (min, mean, max score)", [
        {"name": "max", "x": x, "y": [g["max"] for g in gens], "mode": "lines+markers", "color": "#16a34a"},
        {"name": "mean", "x": x, "y": [g["mean"] for g in gens], "mode": "lines+markers", "color": "#2563eb"},
        {"name": "min", "x": x, "y": [g["min"] for g in gens], "mode": "lines+markers", "color": "#f97316"},
    ], x_title="generation", y_title="score")


def _evo_values_figure(events, meta):
    best = next((e["data"] for e in reversed(events) if e.get("kind") == "evo.best"), None)
    title = "Parameters of the best candidate"
    if not best or not best.get("values"):
        return plots.empty_figure(title)
    labels = list(best["values"])
    return plots.line_figure(f"{title} (score {best['score']:.4f}, evaluation {best['evaluation'] + 1})", [
        {"name": "value", "x": labels, "y": [best["values"][k] for k in labels], "kind": "bar", "color": "#2563eb"},
    ], x_title="gene (parameter.model[.filter].layer group)", y_title="value")


def _evo_progress(events, meta) -> tuple[Optional[float], str]:
    gens = _evo_generations(events)
    total = int(meta.get("expected_evals") or meta.get("max_evals") or 0) or None
    if not gens:
        if any(e.get("kind") == "evo.loading" for e in events):
            return 0.0, "scoring the first generation (and loading the models and the tasks) ..."
        return 0.0, "checking the template against the models ..."
    last = gens[-1]
    n = int(last["evaluations"])
    text = (f"generation {last['generation'] + 1} · {n}/{total or '?'} evaluations · best {last['best']:.4f} · "
            f"sigma {last['sigma']:.3f} · {last.get('eval_seconds') or 0:.2f} s each")
    if total and n >= total and not any(e.get("kind") == "evo.done" for e in events):
        text += " · writing the recipe ..."
    return (min(1.0, n / total) if total else None), text


def _evo_summary(result: dict[str, Any], meta: dict[str, Any]) -> str:
    best = result["best"]
    scores = ", ".join(f"{k} {v:.3f}" for k, v in (best.get("scores") or {}).items())
    genes = best.get("genes") or {}
    shown = ", ".join(f"{k} = {v:g}" for k, v in list(genes.items())[:12]) + (" ..." if len(genes) > 12 else "")
    out = (f"**Best candidate**: score **{best['score']:.4f}** ({best['scored_on']}), evaluation "
           f"{best['evaluation'] + 1} (generation {best['generation'] + 1}) of {result['evaluations']}.")
    if scores:
        out += f"\n\nTask scores: {scores}."
    if shown:
        out += f"\n\nParameters ({meta.get('method', 'the template')}): {shown}."
    if result.get("final"):
        out += f"\n\nOn {result['final']['tasks']}: mean {result['final']['mean']:.4f}."
    out += (f"\n\nThe recipe (`recipe.yml`) is a plain `{meta.get('method', '')}` recipe with these values. "
            f"{result['generations']} generations of {result['popsize']} ({result['genes']} genes; stopped: "
            f"{result['stop'] or 'done'}), {result['eval_seconds']:.1f} s evaluating, "
            f"{result['seconds']:.1f} s in all.")
    return out


def _evo_log_line(ev: Event) -> Optional[str]:
    d = ev.data
    if d.get("replayed"):
        return None
    if ev.kind == "evo.generation":
        return (f"generation {d['generation'] + 1}: best {d['best']:.4f}, mean {d['mean']:.4f}, sigma "
                f"{d['sigma']:.4f}, {d.get('eval_seconds') or 0:.2f} s per evaluation, {d['evaluations']} evaluations")
    if ev.kind == "evo.best":
        return f"new best {d['score']:.4f} at evaluation {d['evaluation'] + 1}"
    if ev.kind == "evo.loading":
        return f"{d.get('genes')} genes; loading {len(d.get('models') or [])} models and the tasks ..."
    if ev.kind == "evo.resumed":
        return f"resumed after generation {d.get('generation')} ({d.get('evaluations')} evaluations)"
    if ev.kind == "evo.done":
        return f"done: best score {d.get('best_score', 0):.4f}; recipe {d.get('recipe')}"
    return None


EVO = register_search(SearchSpec(
    name="evo",
    title="Evolutionary search (CMA-ES)",
    summary=("CMA-ES searches the free parameters of a recipe template: the method, the parameters to search with "
             "their bounds (one value per model, per tensor filter and per layer group), and fixed ones. Every "
             "candidate is merged in memory and scored on a fixed part of the tasks; the best becomes a plain, "
             "replayable recipe (as mergekit-evolve, Akiba et al. 2024). Runs in this process."),
    fields=[
        Field("models", "Models to merge", "models", info="the session's models (the base is not merged)"),
        Field("base", "Base model", "base", info="task vectors are taken against it"),
        Field("method", "Method (the template)", "choice", "task_arithmetic", choices=evo_methods()),
        Field("parameters", "Searched parameters and their bounds (YAML; empty: the method's required ones in "
              "[0, 1])", "yaml", "weight: {min: 0.0, max: 1.0, init: 0.3}\n"),
        Field("tasks", "Tasks YAML (each candidate is scored on it)", "tasks",
              info="validation tasks keep the test split for the final comparison"),
        Field("max_evals", "Budget (evaluations)", "int", 24, minimum=1, maximum=1000000,
              info="whole generations while they fit"),
        Field("data_ratio", "Data ratio per candidate", "float", 0.25, minimum=0.001, maximum=1.0,
              info="the same part of each task for every candidate"),
        Field("sigma0", "Initial step size σ0 (genes in [0, 1])", "float", round(1 / 6, 4), minimum=0.001,
              maximum=1.0),
        Field("popsize", "Population (0: CMA-ES's default 4 + 3 ln genes)", "int", 0, minimum=0),
        Field("seed", "Seed", "int", 0, minimum=0),
        Field("layer_groups", "Layer groups (values per parameter along the layers)", "int", 1, minimum=1,
              advanced=True),
        Field("filters", "Tensor filters (comma-separated; each gets its own genes)", "text", "", advanced=True,
              info="e.g. attention, mlp"),
        Field("fixed", "Fixed parameters (YAML)", "yaml", "", advanced=True),
    ],
    make_config=_evo_config,
    run=_evo_run,
    plots=[PlotSpec("Score per evaluation", _evo_score_figure), PlotSpec("Task metrics", _evo_metrics_figure),
           PlotSpec("Population per generation", _evo_generation_figure),
           PlotSpec("Best parameters", _evo_values_figure)],
    progress=_evo_progress,
    summary_md=_evo_summary,
    dump_config=lambda c: c.model_dump(mode="json"),
    load_config=_config_loader("mergecore.search.evo.run", "EvoConfig"),
    meta=_evo_meta,
    log_line=_evo_log_line,
))
