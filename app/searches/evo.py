"""The evolutionary search (`mergecore.search.evo`: CMA-ES over a recipe template's parameters),
as a Search tab entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from mergecore.errors import MergeError, short
from mergecore.search.evo.genome import default_bounds, template_methods

from app import plots
from app.searches.base import (
    SEED, Field, PlotSpec, SearchSession, SearchSpec, checked_inputs, fraction, has_event, latest, mean_series, number,
    needs_stats, register_search, scores_text, session_fields, wall_time, starting_method, task_series, tasks_field,
    validated, yaml_mapping,
)


def evo_methods() -> list[str]:
    """The methods a template can use (the engine's), but those that need statistics collected over
    data: the search has none to give them."""
    from mergecore.methods import get_method

    return [name for name in template_methods() if not needs_stats(get_method(name))]


def parse_bounds(text: str, method_name: str) -> dict[str, dict[str, Any]]:
    """The searched parameters: `name: {min, max[, init]}` or `name: [min, max]`; empty: the
    method's required real parameters."""
    data = yaml_mapping(text, "searched parameters")
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


def _config(values: dict[str, Any], session: SearchSession):
    from mergecore.search.evo.run import EvoConfig, check_config

    base, names, tasks = checked_inputs(values, session)
    method = values.get("method") or starting_method()
    from mergecore.methods import get_method

    if needs_stats(get_method(str(method))):
        raise MergeError(f"method: {method} needs statistics collected over data, which the search cannot give it")
    filters = [f.strip() for f in str(values.get("filters") or "").split(",") if f.strip()]
    popsize = number(values, "popsize", int, 0)
    config = validated(EvoConfig, {
        "method": method, "base_model": session.path(base), "models": [session.path(n) for n in names],
        "parameters": parse_bounds(values.get("parameters") or "", method),
        "fixed": yaml_mapping(values.get("fixed") or "", "fixed parameters"),
        "layer_groups": number(values, "layer_groups", int, 1), "filters": filters, "tasks": tasks,
        "data_ratio": number(values, "data_ratio", float, 0.25), "max_evals": number(values, "max_evals", int),
        "sigma0": number(values, "sigma0", float, 1 / 6), "popsize": popsize if popsize > 0 else None,
        "seed": number(values, "seed", int), "backend": "local",
    })
    check_config(config, Path(tasks).parent)  # the template against the models' headers: errors now, not later
    return config


def _popsize(config, genes: int) -> int:
    from mergecore.search.evo.search import default_popsize

    return int(config.popsize) if config.popsize else default_popsize(genes)


def _meta(config, session: SearchSession) -> dict[str, Any]:
    genome = config.genome(Path(config.tasks).parent)
    pop = _popsize(config, genome.dim)
    return {"max_evals": config.max_evals, "popsize": pop, "expected_evals": max(1, config.max_evals // pop) * pop,
            "genes": genome.dim, "labels": genome.labels(), "method": config.method,
            "models": session.names(config.models),
            "base": session.names([config.base_model])[0] if config.base_model else None}


def _generations(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return latest(events, "evo.generation", "generation")


def _candidates(gens: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(evaluation number from 1, score) of every candidate, in the order they were scored."""
    out = []
    for g in gens:
        scores = list(g.get("scores") or [])
        first = int(g["evaluations"]) - len(scores)
        out += [(first + i + 1, float(s)) for i, s in enumerate(scores)]
    return out


def _score_figure(events, meta):
    cands = _candidates(_generations(events))
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


def _metrics_figure(events, meta):
    gens = [g for g in _generations(events) if g.get("best_scores")]
    title = "Task metrics of the best so far"
    if not gens:
        return plots.empty_figure(title)
    series = task_series(gens, lambda g: g["evaluations"], "best_scores")
    series.append(mean_series("mean (the score)", [g["evaluations"] for g in gens], [g["best"] for g in gens]))
    return plots.line_figure(title + " (after each generation)", series, x_title="evaluation", y_title="score")


def _generation_figure(events, meta):
    gens = _generations(events)
    title = "Population per generation"
    if not gens:
        return plots.empty_figure(title)
    x = [g["generation"] + 1 for g in gens]
    return plots.line_figure(title + " (min, mean, max score)", [
        {"name": k, "x": x, "y": [g[k] for g in gens], "mode": "lines+markers", "color": color}
        for k, color in (("max", "#16a34a"), ("mean", "#2563eb"), ("min", "#f97316"))
    ], x_title="generation", y_title="score")


def _values_figure(events, meta):
    best = next((e["data"] for e in reversed(events) if e.get("kind") == "evo.best"), None)
    title = "Parameters of the best candidate"
    if not best or not best.get("values"):
        return plots.empty_figure(title)
    labels = list(best["values"])
    return plots.line_figure(f"{title} (score {best['score']:.4f}, evaluation {best['evaluation'] + 1})", [
        {"name": "value", "x": labels, "y": [best["values"][k] for k in labels], "kind": "bar", "color": "#2563eb"},
    ], x_title="gene (parameter.model[.filter].layer group)", y_title="value")


def _progress(events, meta) -> tuple[Optional[float], str]:
    gens = _generations(events)
    total = int(meta.get("expected_evals") or meta.get("max_evals") or 0) or None
    if not gens:
        if has_event(events, "evo.loading"):
            return 0.0, "scoring the first generation (and loading the models and the tasks) ..."
        return 0.0, "checking the template against the models ..."
    last = gens[-1]
    n = int(last["evaluations"])
    text = (f"generation {last['generation'] + 1} · {n}/{total or '?'} evaluations · best {last['best']:.4f} · "
            f"sigma {last['sigma']:.3f} · {last.get('eval_seconds') or 0:.2f} s each")
    if total and n >= total and not has_event(events, "evo.done"):
        text += " · scoring the best candidates on all the validation data ..."
    return fraction(n, total), text


def _summary(result: dict[str, Any], meta: dict[str, Any]) -> str:
    best = result["best"]
    scores = scores_text(best.get("scores"))
    genes = best.get("genes") or {}
    shown = ", ".join(f"{k} = {v:g}" for k, v in list(genes.items())[:12]) + (" ..." if len(genes) > 12 else "")
    found = (f"evaluation {best['evaluation'] + 1} (generation {best['generation'] + 1}) of {result['evaluations']}"
             if best.get("evaluation") is not None else
             f"the data-free {best.get('label')}: none of the {result['evaluations']} candidates scored higher")
    out = f"**Best candidate**: score **{best['score']:.4f}** ({best['scored_on']}), {found}."
    if scores:
        out += f"\n\nTask scores: {scores}."
    if shown:
        out += f"\n\nParameters ({meta.get('method', 'the template')}): {shown}."
    if result.get("final"):
        out += f"\n\nOn {result['final']['tasks']}: mean {result['final']['mean']:.4f}."
    out += (f"\n\nThe recipe (`recipe.yml`) is a plain `{meta.get('method', '')}` recipe with these values. "
            f"{result['generations']} generations of {result['popsize']} ({result['genes']} genes; stopped: "
            f"{result['stop'] or 'done'}), {result['eval_seconds']:.1f} s evaluating, "
            f"{wall_time(result)}.")
    return out


EVO = register_search(SearchSpec(
    name="evo",
    title="Evolutionary search (CMA-ES)",
    summary=("CMA-ES searches the free parameters of a recipe template: the method, the parameters to search with "
             "their bounds (one value per model, per tensor filter and per layer group), and fixed ones. Every "
             "candidate is merged in memory and scored on a fixed part of the tasks; the best becomes a plain, "
             "replayable recipe (as mergekit-evolve, Akiba et al. 2024). Runs in this process."),
    fields=[
        *session_fields("the session's models (the base is not merged)", "task vectors are taken against it"),
        Field("method", "Method (the template)", "choice", starting_method(), choices=evo_methods()),
        Field("parameters", "Searched parameters and their bounds (YAML; empty: the method's required ones in "
              "[0, 1])", "yaml", "weight: {min: 0.0, max: 1.0, init: 0.3}\n"),
        tasks_field("Tasks YAML (each candidate is scored on it)"),
        Field("max_evals", "Budget (evaluations)", "int", 24, minimum=1, maximum=1000000,
              info="whole generations while they fit"),
        Field("data_ratio", "Data ratio per candidate", "float", 0.25, minimum=0.001, maximum=1.0,
              info="the same part of each task for every candidate"),
        Field("sigma0", "Initial step size σ0 (genes in [0, 1])", "float", round(1 / 6, 4), minimum=0.001,
              maximum=1.0),
        Field("popsize", "Population (0: CMA-ES's default 4 + 3 ln genes)", "int", 0, minimum=0),
        SEED,
        Field("layer_groups", "Layer groups (values per parameter along the layers)", "int", 1, minimum=1,
              advanced=True),
        Field("filters", "Tensor filters (comma-separated; each gets its own genes)", "text", "", advanced=True,
              info="e.g. attention, mlp"),
        Field("fixed", "Fixed parameters (YAML)", "yaml", "", advanced=True),
    ],
    plots=[PlotSpec("Score per evaluation", _score_figure), PlotSpec("Task metrics", _metrics_figure),
           PlotSpec("Population per generation", _generation_figure),
           PlotSpec("Best parameters", _values_figure)],
    make_config=_config, meta=_meta, progress=_progress, summary_md=_summary,
))
