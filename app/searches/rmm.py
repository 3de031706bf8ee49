"""RMM (`mergecore.search.rmm`): reinforced model merging, as a Search tab entry."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from app import plots
from app.searches.base import (
    SEED, Field, PlotSpec, SearchSession, SearchSpec, checked_inputs, default_operators, fraction, has_event, latest,
    operators_yaml, parse_operators, register_search, scores_text, session_fields, task_series, tasks_field,
    validated,
)


def _config(values: dict[str, Any], session: SearchSession):
    from mergecore.search.rmm.run import RMMConfig

    base, names, tasks = checked_inputs(values, session)
    return validated(RMMConfig, {
        "base_model": session.path(base), "models": [session.path(n) for n in names],
        "operators": parse_operators(values.get("operators") or "", len(names)), "tasks": tasks,
        "data_ratio": float(values.get("data_ratio") or 0), "episodes": int(values.get("episodes") or 0),
        "dar": bool(values.get("dar")), "seed": int(values.get("seed") or 0),
        "update_every": int(values.get("update_every") or 0), "rerank_top": int(values.get("rerank_top") or 1),
        "max_steps": int(values["max_steps"]) if values.get("max_steps") else None,
    })


def _meta(config, session: SearchSession) -> dict[str, Any]:
    names = session.names(config.models)
    ops = [o.name or o.method for o in config.operators]
    try:
        from app.state import model_info

        layers = int(model_info(config.base_model)["layers"])
    except Exception:
        layers = 0
    return {"episodes": config.episodes, "layers": layers, "models": names, "operators": ops, "action_names": names + ops,
            "base": session.names([config.base_model])[0], "dar": config.dar, "data_ratio": config.data_ratio}


def _episodes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return latest(events, "rmm.episode", "episode")


def _reward_figure(events, meta):
    eps = _episodes(events)
    if not eps:
        return plots.empty_figure("Reward per episode")
    x = [d["episode"] + 1 for d in eps]
    best = [d for d in eps if d.get("best_reward") is not None]
    series = [
        {"name": "raw reward", "x": x, "y": [d["raw_reward"] for d in eps], "mode": "markers", "color": "#94a3b8",
         "size": 6},
        {"name": "DAR reward" if meta.get("dar", True) else "reward (DAR off)", "x": x,
         "y": [d["dar_reward"] for d in eps], "mode": "lines", "color": "#2563eb"},
        {"name": "best so far", "x": [d["episode"] + 1 for d in best], "y": [d["best_reward"] for d in best],
         "mode": "lines", "color": "#16a34a", "width": 3},
    ]
    return plots.line_figure("Reward per episode (raw, DAR, best so far)", series, x_title="episode",
                             y_title="reward (100 × mean score)")


def _time_figure(events, meta):
    eps = _episodes(events)
    if not eps:
        return plots.empty_figure("Time per evaluation")
    x = [d["episode"] + 1 for d in eps]
    return plots.line_figure("Time per evaluation (0: reused, fell off, or cached)", [
        {"name": "seconds", "x": x, "y": [d.get("eval_seconds", 0.0) for d in eps], "kind": "bar", "color": "#f97316"},
    ], x_title="episode", y_title="seconds")


def _metrics_figure(events, meta):
    eps = [d for d in _episodes(events) if d.get("metrics")]
    if not eps:
        return plots.empty_figure("Task metrics per episode")
    return plots.line_figure("Task metrics per episode (on the episode's data subset)",
                             task_series(eps, lambda d: d["episode"] + 1, "metrics", size=4),
                             x_title="episode", y_title="score")


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


def best_shown(events: Sequence[dict[str, Any]]) -> tuple[Optional[list], Optional[float], str]:
    """(trajectory, reward, what the reward was measured on) the merging map shows: once the search
    is done, its result as the `rmm.done` event names it (the re-ranked best that recipe.yml and the
    summary hold); before that, the best trajectory so far on the episodes' data subsets."""
    done = next((e.get("data") or {} for e in reversed(events) if e.get("kind") == "rmm.done"), None)
    if done and done.get("best_trajectory"):
        return done["best_trajectory"], done.get("best_reward"), str(done.get("scored_on") or "")
    eps = _episodes(events)
    best = next((d for d in reversed(eps) if d.get("best_trajectory")), None)
    if best is None:
        return None, None, ""
    return best["best_trajectory"], best.get("best_reward"), "best so far, on the episodes' subsets"


def _heatmap_figure(events, meta):
    best, reward, scored_on = best_shown(events)
    names = list(meta.get("action_names") or [])
    if not best or not names:
        return plots.empty_figure("Best merging map (layers × actions)")
    n_layers = max(int(meta.get("layers") or 0), max(layer for layer, _ in best) + 1)
    z, text = merging_map(best, len(names), n_layers)
    title = "Best merging map (layers × actions)" + (f", reward {reward:.1f} ({scored_on})" if reward is not None
                                                     else "")
    return plots.heatmap_figure(title, z, [f"layer {i}" for i in range(n_layers)], names, text=text,
                                x_title="source layer (cells: position in the merged model)")


def _progress(events, meta) -> tuple[Optional[float], str]:
    eps = _episodes(events)
    total = int(meta.get("episodes") or 0) or None
    if not eps:
        return 0.0, "loading the models and the tasks ..." if has_event(events, "rmm.loading") else "starting ..."
    last, n = eps[-1], len(eps)
    best = last.get("best_reward")
    timed = [d.get("eval_seconds", 0.0) for d in eps if d.get("eval_seconds")][-20:]
    text = f"episode {n}/{total or '?'}" + (f" · best {best:.2f}" if best is not None else "")
    text += f" · {last.get('evaluations', 0)} evaluations · {sum(timed) / len(timed) if timed else 0.0:.2f} s each"
    if total and n >= total and not has_event(events, "rmm.done"):
        text += " · re-scoring the best trajectories on all the data ..."
    return fraction(n, total), text


def _summary(result: dict[str, Any], meta: dict[str, Any]) -> str:
    best = result["best"]
    names = list(meta.get("action_names") or [])
    steps = [f"#{pos + 1} = layer {layer} of **{names[action] if action < len(names) else f'action {action}'}**"
             for pos, (layer, action) in enumerate(best["emitted"])]
    metrics = scores_text(best.get("metrics"))
    found = (f"found at episode {best['episode'] + 1}" if best.get("episode") is not None else
             f"the data-free {best.get('label')}: no trajectory the search found scored higher")
    return (f"**Best merge**: reward **{best['reward']:.2f}** ({best['scored_on']}), {found}; "
            f"{len(best['emitted'])} layers: " + "; ".join(steps) + "."
            + (f"\n\nTask scores: {metrics}." if metrics else "")
            + f"\n\n{result['episodes']} episodes, {result['evaluations']} evaluations "
              f"({result['eval_seconds']:.1f} s evaluating), {result['seconds']:.1f} s in all.")


RMM = register_search(SearchSpec(
    name="rmm",
    title="RMM: reinforced model merging",
    summary=("An agent walks the layers of the merged model and picks, for each layer, one source model's layer "
             "or a merge operator applied to that layer (or skips it, or goes back); each episode's model is "
             "scored on a slice of the tasks' validation data and PPO learns from the rewards. The best "
             "trajectory becomes a replayable layer-by-layer recipe (RMM, Lu et al. 2025)."),
    fields=[
        *session_fields("the session's models (the base is not merged)",
                        "task vectors are taken against it; embeddings and heads come from it"),
        Field("operators", "Merge operators (one per line; each merges one layer of all the models)", "operators",
              default=operators_yaml(default_operators())),
        tasks_field("Tasks YAML (scored each episode)"),
        Field("data_ratio", "Data ratio per episode", "float", 0.1, minimum=0.001, maximum=1.0,
              info="fraction of each task scored per episode; the subsets rotate"),
        Field("episodes", "Episodes", "int", 40, minimum=1, maximum=100000),
        Field("dar", "Dynamic average reward (DAR)", "bool", True, info="smooth the noisy subset rewards"),
        SEED,
        Field("update_every", "PPO update every (episodes)", "int", 4, minimum=1, advanced=True,
              info="also the checkpoint interval: Stop resumes from the last update"),
        Field("rerank_top", "Re-score the top trajectories on all the data", "int", 3, minimum=1, advanced=True,
              info="the result is the best of these and of each operator on every layer, on all the data"),
        Field("max_steps", "Max steps per episode (0: twice the layers)", "int", 0, minimum=0, advanced=True),
    ],
    plots=[PlotSpec("Reward per episode", _reward_figure), PlotSpec("Time per evaluation", _time_figure),
           PlotSpec("Task metrics", _metrics_figure), PlotSpec("Best merging map", _heatmap_figure)],
    make_config=_config, meta=_meta, progress=_progress, summary_md=_summary,
))
