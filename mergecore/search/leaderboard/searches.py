"""Phase 2 of a leaderboard: the searches, each in OUT/searches/<kind>/, in the time left.

A search counts episodes / evaluations, not seconds, so its budget is derived from the time it
is given and what phase 1 measured per candidate (merge seconds, full-validation seconds):

* evo: per evaluation a merge and `data_ratio` of the validation data, plus the final re-scoring
  of its `rerank_top` best and of its template on all of it; the template is the best phase-1
  method that has something to search (its grid's range, starting at the phase-1 winner's
  values, on `layer_groups` curve anchors);
* rmm: the top phase-1 methods (up to three) as its layer operators; per episode about one
  subset evaluation; then its best and every operator on all the validation data;
* dam: skipped (it trains on each model's own data, which the leaderboard is not given:
  run `mergecore search dam`).

Searches choose on a whole tasks file, so they run only with a separate validation file
(`val_tasks`); with one file split in two they are skipped with that reason. A search is only
started when its smallest useful budget fits. Its plan (the config it was started with) is kept
in OUT/searches/<kind>-plan.json, so a resumed leaderboard resumes the same search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mergecore.methods import get_method

EVO_DATA_RATIO = 0.1
RMM_DATA_RATIO = 0.1
RERANK_TOP = 3
MIN_RMM_EPISODES = 16
SLOT_USE = 0.8  # a search is planned for this share of its time: its costs are estimates, the budget is not
EVAL_OVERHEAD = 0.05  # seconds a search spends per evaluation besides merging and scoring (its bookkeeping)


@dataclass
class Costs:
    """What phase 1 measured: mean seconds of one merge and of one full validation pass."""

    merge: float
    evaluate: float
    merges: dict[str, float] = field(default_factory=dict)  # per method (an SVD-based merge costs more)

    @property
    def candidate(self) -> float:
        return self.merge + self.evaluate

    def merge_of(self, method: str) -> float:
        return self.merges.get(method, self.merge)


def layer_count(ref: str) -> int:
    """Layers of the main stack of model `ref` (0 when there is none), from its headers."""
    from mergecore.arch import main_stack
    from mergecore.io.source import ModelSource, resolve_model_path

    src = ModelSource(ref, path=resolve_model_path(ref))
    try:
        found = main_stack(src.tensors)
    finally:
        src.close()
    return found[1] if found else 0


def evo_template(rows: list[dict[str, Any]]) -> Optional[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(method, searched parameters with bounds and start, fixed parameters) from the best ranked
    data-free row whose method can be a template with something to search; None when none can."""
    from mergecore.search.evo.genome import default_bounds, template_methods

    usable = set(template_methods())
    for row in rows:
        if row["phase"] != "data-free" or row["method"] not in usable:
            continue
        m = get_method(row["method"])
        values = _values(row["recipe"])
        bounds: dict[str, dict[str, float]] = {}
        for name, grid in m.grid:
            if m.param(name).type is float and len(grid) > 1:
                lo, hi = float(min(grid)), float(max(grid))
                bounds[name] = {"min": lo, "max": hi, "init": min(max(float(values.get(name, lo)), lo), hi)}
        if not bounds:
            for name, b in default_bounds(m.name).items():
                start = values.get(name)
                bounds[name] = {**b, **({"init": min(max(float(start), b["min"]), b["max"])}
                                        if isinstance(start, (int, float)) else {})}
        if bounds:
            return m.name, bounds, {k: v for k, v in values.items() if k not in bounds}
    return None


def _values(recipe: dict[str, Any]) -> dict[str, Any]:
    """A candidate recipe's parameter values (per-model ones are shared by every model)."""
    out = dict(recipe.get("parameters") or {})
    models = recipe.get("models") or []
    if models:
        out.update(models[0].get("parameters") or {})
    return out


def plan_evo(rows: list[dict[str, Any]], config, seconds: float, costs: Costs) -> tuple[Optional[dict], str]:
    """The evo config for `seconds`, or None and why not."""
    seconds *= SLOT_USE
    from mergecore.search.evo.search import default_popsize

    template = evo_template(rows)
    if template is None:
        return None, "no phase-1 method has a parameter to search"
    method, bounds, fixed = template
    groups = min(2, max(1, layer_count(config.base or config.models[0])))
    genes = groups * sum(len(config.models) if get_method(method).param(n).per_model else 1 for n in bounds)
    filters = [] if genes > 1 else ["attention"]  # CMA-ES needs two genes: attention and the rest apart
    genes *= len(filters) + 1
    per_eval = costs.merge_of(method) + costs.evaluate * EVO_DATA_RATIO + EVAL_OVERHEAD
    fixed_cost = (RERANK_TOP + 2) * (costs.merge_of(method) + costs.evaluate)
    evals = int((seconds - fixed_cost) / max(per_eval, 1e-6))
    pop = default_popsize(genes)
    if evals < pop:
        return None, (f"{seconds:.0f} s planned for it fit {max(evals, 0)} evaluations, fewer than one "
                      f"generation ({pop}); each takes about {per_eval:.1f} s")
    return {
        "method": method, "base_model": config.base, "models": list(config.models), "parameters": bounds,
        "fixed": fixed, "layer_groups": groups, "filters": filters, "dtype": config.dtype, "tasks": config.val_tasks,
        "data_ratio": EVO_DATA_RATIO, "max_evals": evals, "rerank_top": RERANK_TOP, "seed": config.seed,
        "batch_size": config.batch_size, "backend": config.backend, "workers": config.workers,
        "ray_address": config.ray_address, "cpus_per_worker": config.cpus_per_worker,
    }, ""


def plan_rmm(rows: list[dict[str, Any]], config, seconds: float, costs: Costs) -> tuple[Optional[dict], str]:
    """The rmm config for `seconds`, or None and why not."""
    seconds *= SLOT_USE
    if not config.base:
        return None, "needs a base model (--base)"
    ops, seen = [], set()
    for row in rows:
        m = get_method(row["method"]) if row["phase"] == "data-free" else None
        if m is None or m.name in seen or not m.operator or m.base != "required":
            continue
        seen.add(m.name)
        ops.append({"name": row["label"], "method": m.name, "parameters": _values(row["recipe"])})
        if len(ops) == 3:
            break
    if not ops:
        return None, "no phase-1 method that merges task vectors onto the base can be a layer operator"
    merge = max(costs.merge_of(o["method"]) for o in ops)
    per_episode = costs.evaluate * RMM_DATA_RATIO + merge / max(1, layer_count(config.base)) + EVAL_OVERHEAD
    fixed_cost = (RERANK_TOP + len(ops) + 1) * (merge + costs.evaluate) + len(ops) * merge
    episodes = int((seconds - fixed_cost) / max(per_episode, 1e-6))
    if episodes < MIN_RMM_EPISODES:
        return None, (f"{seconds:.0f} s planned for it fit {max(episodes, 0)} episodes, fewer than {MIN_RMM_EPISODES}; "
                      f"each takes about {per_episode:.1f} s")
    return {
        "base_model": config.base, "models": list(config.models), "operators": ops, "tasks": config.val_tasks,
        "data_ratio": RMM_DATA_RATIO, "episodes": episodes, "rerank_top": RERANK_TOP, "seed": config.seed,
        "batch_size": config.batch_size, "backend": config.backend, "workers": config.workers,
        "ray_address": config.ray_address, "cpus_per_worker": config.cpus_per_worker,
    }, ""


PLANNERS = {"evo": plan_evo, "rmm": plan_rmm}
NOT_RUN = {"dam": "trains on each model's own data, which a leaderboard is not given; run `mergecore search dam`"}


def plan_file(out: Path, kind: str) -> Path:
    return out / "searches" / f"{kind}-plan.json"


def search_row(kind: str, folder: Path, seconds: float) -> dict[str, Any]:
    """A leaderboard row from a finished search's result.json and recipe.yml (its result was
    chosen on the full validation split by `mergecore.search.validation`)."""
    import yaml

    from mergecore.search.base import RECIPE_FILE, RESULT_FILE
    from mergecore.search.leaderboard.candidates import SEARCH, recipe_key

    summary = json.loads((folder / RESULT_FILE).read_text())
    val = summary["validation"]
    chosen = next((c for c in val.get("candidates", []) if c["label"] == val["chosen"]), None)
    recipe = yaml.safe_load((folder / RECIPE_FILE).read_text())
    detail = {"chosen": val["chosen"], "source": val["source"]}
    for key in ("evaluations", "episodes", "generations"):
        if key in summary:
            detail[key] = summary[key]
    method = f"{kind}:{recipe.get('merge_method') or 'slices'}"  # rmm's layers are passthrough slices
    return {"key": f"{kind}-{recipe_key(recipe)}", "label": f"{kind}: {val['chosen']}", "method": method,
            "params": detail, "phase": SEARCH, "search": kind, "val_mean": float(val["mean"]),
            "val_scores": dict(chosen["scores"]) if chosen else {}, "seconds": round(seconds, 3),
            "merge_seconds": None, "eval_seconds": None, "recipe": recipe, "folder": kind == "rmm"}


def budget_for(kind: str, plan: dict[str, Any]) -> str:
    """What a search was given, in words: `96 evaluations`, `120 episodes`."""
    return f"{plan['max_evals']} evaluations" if kind == "evo" else f"{plan['episodes']} episodes"

