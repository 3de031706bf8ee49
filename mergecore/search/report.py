"""Search events and results as text: one line per event for the CLI and the app's log, one line
per finished search.

    from mergecore.search.report import event_line
    line = event_line(event)            # None: nothing to show (e.g. a replayed history event)

`every` thins out DAM's step lines (every N-th step, the first and the last).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from mergecore.events import Event


def _rmm_episode(d: dict[str, Any]) -> str:
    best = d["best_reward"]
    return (f"episode {d['episode'] + 1:>4}  reward {d['raw_reward']:8.3f}  dar {d['dar_reward']:8.3f}  "
            f"best {best if best is None else f'{best:8.3f}'}  depth {d['depth']:>3}  "
            f"eval {d['eval_seconds']:.2f}s  evals {d['evaluations']}")


def _evo_generation(d: dict[str, Any]) -> str:
    return (f"generation {d['generation'] + 1:>3}  best {d['best']:.4f}  mean {d['mean']:.4f}  "
            f"sigma {d['sigma']:.4f}  {d['eval_seconds']:.2f} s/eval  {d['evals_per_minute'] or 0:.1f} evals/min  "
            f"evals {d['evaluations']}")


def _evo_loading(d: dict[str, Any]) -> str:
    where = f"{d['workers']} Ray workers" if d["backend"] == "ray" else "this process"
    return f"{d['genes']} genes; loading {len(d['models'])} models in {where} ..."


def _dam_step(d: dict[str, Any]) -> str:
    terms = "  ".join(f"{k} {v:.4g}" for k, v in d["terms"].items() if "/" not in k)
    return (f"step {d['step']:>5}/{d['steps']}  loss {d['loss']:.5g}  {terms}  lr {d['lr']:.3g}  "
            f"examples {d['examples_seen']}" + (f"  tokens {d['tokens_seen']}" if d["tokens_seen"] else "")
            + f"  {d['seconds']:.2f}s")


def _dam_eval(d: dict[str, Any]) -> str:
    scores = "  ".join(f"{k} {v:.4f}" for k, v in d["scores"].items())
    label = "final eval" if d["final"] else "eval"
    return f"{label} @ step {d['step']}: mean {d['mean']:.4f}  {scores}  ({d['seconds']:.1f}s)"


def _dam_teachers(d: dict[str, Any]) -> str:
    extra = f", {d['bytes'] / 2**20:.1f} MiB cached" if d["mode"] == "cache" else ""
    return f"teachers: {d['mode']}{extra} ({d['seconds']:.1f}s)"


def _validation(d: dict[str, Any]) -> str:
    subset = f"  (subset {d['subset']:.4f})" if d.get("subset") is not None else ""
    return f"validation  {d['source']:<9}  {d['label']}: {d['mean']:.4f}{subset}"


def _selected(d: dict[str, Any]) -> str:
    own, free = d.get("search_best"), d.get("data_free_best")
    if d["data_free"]:
        beaten = f"the search's best ({own['label']}, {own['mean']:.4f})" if own else "the search"
        return (f"{beaten} scores below the data-free {d['chosen']} ({d['mean']:.4f}) on the full validation "
                f"split: returning the data-free merge")
    best_free = f"; best data-free: {free['label']} ({free['mean']:.4f})" if free else ""
    return f"chose {d['chosen']}: {d['mean']:.4f} on the full validation split{best_free}"


def format_seconds(seconds: float) -> str:
    """4m12s, 30m, 1h05m, 12s: how progress lines show elapsed time and the budget."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m" + (f"{s % 60:02d}s" if s % 60 else "")
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


_clock = format_seconds


def _lb_start(d: dict[str, Any]) -> str:
    skipped = f"; skipped: {', '.join(s['method'] for s in d['skipped'])}" if d["skipped"] else ""
    resumed = f", {d['done']} already scored" if d["done"] else ""
    return (f"{d['candidates']} data-free candidates from {len(d['methods'])} methods{resumed}{skipped}; "
            f"validation: {d['validation']}; test: {d['test']}; budget {_clock(d['budget'])}")


def _lb_candidate(d: dict[str, Any]) -> str:
    return (f"[{d['index'] + 1}/{d['total']}] {d['label']}: val {d['val_mean']:.4f} "
            f"({d['seconds']:.1f} s; {_clock(d['elapsed'])} of {_clock(d['budget'])})")


def _lb_search(d: dict[str, Any]) -> str:
    if d["status"] == "skipped":
        return f"{d['search']}: skipped ({d['reason']})"
    if d["status"] == "started":
        return f"{d['search']}: searching with {d['budget']} ..."
    return f"{d['label']}: val {d['val_mean']:.4f} ({d['seconds']:.1f} s)"


def _lb_progress(d: dict[str, Any]) -> Optional[str]:
    if d["kind"] not in ("evo.generation", "rmm.episode", "search.selected"):
        return None
    line = _LINES[d["kind"]](d["data"])
    return f"  {d['search']}: {line}"


def _lb_test(d: dict[str, Any]) -> str:
    return f"test #{d['rank']} {d['label']}: val {d['val_mean']:.4f}, test {d['test_mean']:.4f}"


_LINES: dict[str, Callable[[dict[str, Any]], Optional[str]]] = {
    "rmm.loading": lambda d: f"loading {len(d['models'])} models ...",
    "rmm.resumed": lambda d: f"resumed at episode {d['episode']}",
    "rmm.episode": _rmm_episode,
    "dam.loading": lambda d: f"loading {len(d['models'])} models ...",
    "dam.teachers": _dam_teachers,
    "dam.start": lambda d: f"training {d['coefficients']} coefficients on {d['tensors']} tensors, "
                           f"steps {d['step']}..{d['steps']}",
    "dam.resumed": lambda d: f"resumed at step {d['step']}",
    "dam.step": _dam_step,
    "dam.eval": _dam_eval,
    "dam.init": lambda d: f"starting from {d['start']} ({d['mean']:.4f} on the full validation split)",
    "dam.stopped": lambda d: f"stopped early at step {d['step']}: {d['patience']} evaluations without a better "
                             f"score than step {d['best_step']}'s {d['best_mean']:.4f}",
    "evo.loading": _evo_loading,
    "evo.resumed": lambda d: f"resumed after generation {d['generation']} ({d['evaluations']} evaluations)",
    "evo.generation": _evo_generation,
    "search.validation": _validation,
    "search.selected": _selected,
    "search.replayed": lambda d: d["summary"],
    "leaderboard.start": _lb_start,
    "leaderboard.candidate": _lb_candidate,
    "leaderboard.stopped": lambda d: (f"stopped after {d['done']} of {d['total']} candidates: {d['reason']} "
                                      f"({_clock(d['elapsed'])} of {_clock(d['budget'])})"),
    "leaderboard.search": _lb_search,
    "leaderboard.search_progress": _lb_progress,
    "leaderboard.test": _lb_test,
    "search.mismatch": lambda d: f"warning: the replayed checkpoint scores {d['measured']:.6g} on {d['tasks']}, "
                                 f"the search reported {d['reported']:.6g}",
}


def event_line(event: Event, every: int = 1) -> Optional[str]:
    """The text line for `event`, or None when it has none (or is a replayed history event).
    DAM steps are shown every `every` steps (and the first and last)."""
    d = event.data
    if d.get("replayed") or event.kind not in _LINES:
        return None
    if event.kind == "dam.step" and d["step"] % every and d["step"] != d["steps"] and d["step"] != 1:
        return None
    return _LINES[event.kind](d)


def summary_line(kind: str, summary: dict[str, Any], recipe: str) -> str:
    """One line on a finished search of `kind` (result.json's content); `recipe`: where its recipe is."""
    final = f"; {summary['final']['tasks']}: {summary['final']['mean']:.4f}" if "final" in summary else ""
    if kind == "rmm":
        best = summary["best"]
        return (f"best reward {best['reward']:.3f} ({best['scored_on']}), {len(best['emitted'])} layers{final}; "
                f"recipe: {recipe}")
    if kind == "leaderboard":
        w = summary["winner"]
        return (f"winner {w['label']}: val {w['val_mean']:.4f}, test {w['test_mean']:.4f} "
                f"({len(summary['ranking'])} merges ranked in {_clock(summary['elapsed_seconds'])}){final}; "
                f"recipe: {recipe}")
    if kind == "evo":
        return (f"best score {summary['best']['score']:.4f} after {summary['evaluations']} evaluations "
                f"({summary['stop']}){final}; recipe: {recipe}")
    ev = summary.get("eval")
    return ((f"final eval mean {ev['mean']:.4f}; " if ev else "")
            + f"{summary['steps']} steps in {summary['train_seconds']:.1f}s{final}; recipe: {recipe}")
