"""The searches the Search tab runs: a small registry; each entry is a form, a runner and plots.

The Search tab knows nothing about any one search. It draws the form of the chosen entry, runs
it as a background job (`app.jobs`, kind 'search') and redraws its plots from the job's events
on every poll. A search registers a `SearchSpec`:

- `fields`: the form, as `Field`s. Kinds: 'float', 'int', 'bool', 'choice', 'text', and
  session-aware ones the tab fills in: 'models' (the session's models but the base; ticked
  boxes), 'base' (the session's base model), 'tasks' (a tasks YAML; defaults to the demo
  family's validation tasks) and 'operators' (a YAML list of merge methods with fixed
  parameters, with an "add" dropdown fed by the method registry). `advanced=True` puts a
  field in a closed accordion.
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
- `progress(events, meta) -> (fraction or None, text)` and `summary(result, meta) -> markdown`.
- `dump_config` / `load_config`: the config as JSON data and back (saved as
  `app_search.json` in the out dir, so Resume works after the page or the app restarted).

RMM (`mergecore.search.rmm`) is registered below; DAM and evolutionary search register the
same way (`register_search(SearchSpec(...))`) and appear in the tab's dropdown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml

from mergecore.errors import MergeError
from mergecore.events import CancelToken, Event

from app import plots

FIELD_KINDS = ("float", "int", "bool", "choice", "text", "models", "base", "tasks", "operators")


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

    try:
        data = yaml.safe_load(text or "") or []
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        raise MergeError(f"operators: line {mark.line + 1 if mark else '?'}: malformed YAML: {err.problem}") from None
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
            raise MergeError(f"operators: entry {i + 1} has unknown key(s) {', '.join(sorted(extra))}")
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


def _rmm_config(values: dict[str, Any], session: SearchSession):
    from pydantic import ValidationError

    from mergecore.search.rmm.run import RMMConfig

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
        raise MergeError(f"tasks file not found: {tasks}")
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


def _rmm_load(d: dict[str, Any]):
    from mergecore.search.rmm.run import RMMConfig

    return RMMConfig.model_validate(d)


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
    load_config=_rmm_load,
    meta=_rmm_meta,
    log_line=_rmm_log_line,
))
