"""DAM (`mergecore.search.dam`): trained merge coefficients (and layer-wise AdaMerging), as a
Search tab entry."""

from __future__ import annotations

from typing import Any, Optional

from mergecore.errors import MergeError
from mergecore.search.dam.run import pair_models_with_tasks

from app import plots
from app.searches.base import (
    SEED, Field, PlotSpec, SearchSession, SearchSpec, checked_inputs, fraction, has_event, latest, mean_series, number,
    register_search, scores_text, session_fields, wall_time, task_series, tasks_field, validated,
)

REGULARISERS = ("cos", "l1", "l2")


def _config(values: dict[str, Any], session: SearchSession):
    from mergecore.search.dam.run import DAMConfig

    base, names, tasks = checked_inputs(values, session)
    paths = [session.path(n) for n in names]
    ratio = number(values, "eval_subset", float, 1.0)
    if not 0 < ratio <= 1:
        raise MergeError("eval_subset: the part of the tasks scored by the periodic evaluations must be in (0, 1]")
    eval_every = number(values, "eval_every", int, 0)
    return validated(DAMConfig, {
        "base_model": session.path(base), "models": pair_models_with_tasks(names, paths, tasks),
        "train_tasks": tasks, "eval_tasks": tasks, "eval_subset": None if ratio >= 1 else ratio,
        "granularity": values.get("granularity") or "column",
        "loss": {"kind": values.get("loss") or "kl", "temperature": number(values, "temperature", float, 2.0),
                 "lambda_cos": number(values, "lambda_cos"), "lambda_l1": number(values, "lambda_l1"),
                 "lambda_l2": number(values, "lambda_l2")},
        "optimizer": {"lr": number(values, "lr", float, 0.01), "weight_decay": number(values, "weight_decay")},
        "steps": number(values, "steps", int), "batch_size": number(values, "batch_size", int),
        "examples_per_task": number(values, "examples_per_task", int),
        "eval_every": eval_every, "checkpoint_every": eval_every if eval_every > 0 else 10,
        "seed": number(values, "seed", int),
    })


def _meta(config, session: SearchSession) -> dict[str, Any]:
    tasks = [m.task if not isinstance(m, str) and m.task else None for m in config.models]
    return {"steps": config.steps, "models": session.names(config.model_refs()), "tasks": tasks,
            "base": session.names([config.base_model])[0], "granularity": config.granularity,
            "loss": config.loss.kind, "lambdas": {"cos": config.loss.lambda_cos, "l1": config.loss.lambda_l1,
                                                   "l2": config.loss.lambda_l2},
            "eval_every": config.eval_every, "eval_subset": config.eval_subset}


def _steps(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return latest(events, "dam.step", "step")


def _evals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return latest(events, "dam.eval", "step", "final")


def _steps_figure(events, title: str, y_title: str, series):
    """A line figure of `series(steps, their numbers)`, or the titled placeholder before the first step."""
    steps = _steps(events)
    if not steps:
        return plots.empty_figure(title)
    return plots.line_figure(title, series(steps, [d["step"] for d in steps]), x_title="step", y_title=y_title)


def _loss_figure(events, meta):
    def series(steps, x):
        terms = [k for k in steps[-1]["terms"] if k not in REGULARISERS]
        terms = [k for k in terms if "/" not in k] + [k for k in terms if "/" in k]  # the sum first, then each task
        return [{"name": "total", "x": x, "y": [d["loss"] for d in steps], "color": "#111827", "width": 3}] + [
            {"name": k if "/" in k else f"{k} (sum over tasks)", "x": x, "y": [d["terms"].get(k) for d in steps],
             "color": plots.PALETTE[i % len(plots.PALETTE)], "width": 2 if "/" not in k else 1.5,
             "dash": "dash" if "/" not in k else "solid"} for i, k in enumerate(terms)]

    return _steps_figure(events, "Loss per step (total, and each task's term)", f"{meta.get('loss', 'loss')} loss",
                         series)


def _regulariser_figure(events, meta):
    lambdas = meta.get("lambdas") or {}
    names = {"cos": "cos: Σ cos(c_i, c_j)", "l1": "l1: Σ |c|", "l2": "l2: Σ c²"}
    return _steps_figure(events, "Regularisers per step (raw; the loss adds λ × each)", "value", lambda steps, x: [
        {"name": f"{names[k]} (λ {lambdas.get(k, 0):g})", "x": x, "y": [d["terms"].get(k) for d in steps],
         "dash": "solid" if lambdas.get(k) else "dot"} for k in REGULARISERS])


def _metrics_figure(events, meta):
    evals = _evals(events)
    title = "Task metrics per evaluation"
    if not evals:
        return plots.empty_figure(title)
    series = task_series(evals, lambda d: d["step"], "scores")
    series.append(mean_series("mean", [d["step"] for d in evals], [d["mean"] for d in evals]))
    sub = meta.get("eval_subset")
    note = f" (on {sub:g} of the data; the final one on all)" if sub else ""
    return plots.line_figure(title + note, series, x_title="step", y_title="score")


def _grad_figure(events, meta):
    steps = [d for d in _steps(events) if d.get("grad_norm") is not None]
    title = "Gradient norm of the coefficients per step"
    if not steps:
        return plots.empty_figure(title)
    return plots.line_figure(title + " (before clipping)", [
        {"name": "gradient norm", "x": [d["step"] for d in steps], "y": [d["grad_norm"] for d in steps],
         "color": "#9333ea"},
    ], x_title="step", y_title="‖∇c‖")


_STAGES = (("dam.start", "evaluating the starting point ..."), ("dam.teachers", "setting up the training ..."),
           ("dam.data", "computing the source models' outputs (teachers) ..."),
           ("dam.loading", "loading the models and each task's data ..."))


def _progress(events, meta) -> tuple[Optional[float], str]:
    steps = _steps(events)
    total = int(meta.get("steps") or 0) or None
    if not steps:
        return 0.0, next((text for kind, text in _STAGES if has_event(events, kind)), "starting ...")
    last = steps[-1]
    n = int(last["step"])
    per = [d["seconds"] for d in steps[-20:] if d.get("seconds")]
    text = f"step {n}/{total or '?'} · loss {last['loss']:.4g}"
    evals = _evals(events)
    if evals:
        text += f" · mean score {evals[-1]['mean']:.3f} (step {evals[-1]['step']})"
    if per:
        text += f" · {sum(per) / len(per):.2f} s/step"
    if total and n >= total and not has_event(events, "dam.done"):
        text += " · final evaluation on all the data ..."
    return fraction(n, total), text


def _summary(result: dict[str, Any], meta: dict[str, Any]) -> str:
    ev = result.get("eval") or {}
    scores = scores_text(ev.get("scores"))
    kind = "per-column (DAM)" if meta.get("granularity") == "column" else "layer-wise (AdaMerging)"
    out = (f"**Trained** {result['coefficients']} {kind} coefficients on {len(result.get('tensors') or [])} tensors "
           f"in {result['steps']} steps ({meta.get('loss', 'kl')} loss, {result.get('examples_seen', 0)} examples).")
    if ev:
        what = f"step {ev['step']}" if ev.get("step") is not None else f"the data-free {ev.get('label')}"
        out += f"\n\nResult ({what}, chosen on all the validation data): mean **{ev['mean']:.3f}**" + (
            f"; {scores}." if scores else ".")
    out += ("\n\nThe recipe (`recipe.yml`) reads the coefficients from `dam_coefficients.safetensors` "
            "next to it; `mergecore merge` replays it."
            f"\n\n{result.get('train_seconds', 0):.1f} s training, {result.get('eval_seconds', 0):.1f} s evaluating, "
            f"{result.get('teacher_seconds', 0):.1f} s for the teachers, {wall_time(result)}.")
    return out


DAM = register_search(SearchSpec(
    name="dam",
    stops_after="the current training step or evaluation",
    log_every=10,
    title="DAM: trained merge coefficients",
    summary=("Differentiable Adaptive Merging trains merge coefficients by gradient descent: the merged model runs "
             "on each source model's task inputs (labels are never used) and is pulled towards that model's outputs "
             "(KL or MSE) or made confident (entropy), with optional regularisers. *column*: one coefficient per "
             "model and input column of every tensor (DAM, Gauthier-Caron et al. 2024); *layer*: one per model and "
             "tensor (layer-wise AdaMerging, Yang et al. 2024). The trained coefficients become a replayable "
             "recipe."),
    fields=[
        *session_fields("each is paired with its task (by name or head_from)",
                        "embeddings, norms and heads come from it"),
        tasks_field("Tasks YAML (each model's training inputs; scored at every evaluation)",
                    "one task per model; the demo's validation tasks keep the test split for the final comparison"),
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
        SEED,
        Field("lambda_cos", "λ_cos (coefficients of different models apart)", "float", 0.0, minimum=0.0,
              advanced=True),
        Field("lambda_l1", "λ1 (L1 of the coefficients)", "float", 0.0, minimum=0.0, advanced=True),
        Field("lambda_l2", "λ2 (L2 of the coefficients)", "float", 0.0, minimum=0.0, advanced=True),
        Field("eval_every", "Evaluate every (steps; 0: only at the end)", "int", 5, minimum=0, advanced=True,
              info="also the checkpoint interval (Stop saves at the current step)"),
        Field("eval_subset", "Part of the tasks the periodic evaluations score", "float", 0.25, minimum=0.001,
              maximum=1.0, advanced=True, info="the final evaluation scores all of it"),
    ],
    plots=[PlotSpec("Loss per step", _loss_figure), PlotSpec("Task metrics", _metrics_figure),
           PlotSpec("Regularisers", _regulariser_figure), PlotSpec("Gradient norm", _grad_figure)],
    make_config=_config, meta=_meta, progress=_progress, summary_md=_summary,
))
