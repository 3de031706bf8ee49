"""The one program every search (RMM, DAM, evo) runs through, and the protocol a search implements.

    config -> claim OUT -> run (events, cancel, checkpoint / resume) -> recipe.yml
           -> replay through `mergecore.merge` into OUT/model -> score the replayed checkpoint
           -> result.json

A search (`Search`) resolves and checks the paths of its config when it is built, so a typo
fails before anything is written; `run_search` then claims the output folder (a new folder, or
one a search of the same kind marked: it resumes there), records every event in
OUT/events.jsonl (`read_events` reads them back), calls `search.run`, and writes what it found.

The replay (asked for with `replay=True`, the CLI's `--merge`, and always done when the config
names `final_tasks`) merges the recipe with the same `mergecore.merge` the CLI and the app use.
The final scores in result.json are measured on that checkpoint, never on an in-memory model:
`final` on the final tasks, and `replay` on the tasks the search scored its result on, which
must give the score the search reported (a `search.mismatch` event says when it does not).

Adding a search: a class with `kind`, `config_class`, `final`, `sources()` and `run(SearchRun)`
returning `Found`, and one entry in `SEARCHES`.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Protocol, Sequence, Union

from mergecore.errors import MergeError
from mergecore.events import CancelToken, Event, EventCallback
from mergecore.models import ModelPool
from mergecore.recipe import Recipe

EVENTS_FILE = "events.jsonl"
RESULT_FILE = "result.json"
RECIPE_FILE = "recipe.yml"
MODEL_DIR = "model"

# kind -> the module that defines it (its `SEARCH` class); loaded by name, so this module imports none
SEARCHES: dict[str, str] = {"rmm": "mergecore.search.rmm.run", "dam": "mergecore.search.dam.run",
                            "evo": "mergecore.search.evo.run", "leaderboard": "mergecore.search.leaderboard.run"}


@dataclass(frozen=True)
class EvalSpec:
    """How a search scores: which tasks (a tasks file, or Task objects), which part of each
    (`subset` and `subset_index`, as `Evaluator` takes them), batch size, and the folder whose
    tokenizer / image preprocessing in-memory models use. Picklable with a tasks file, so Ray
    workers build the same evaluator."""

    tasks: Union[str, Sequence[Any]]
    subset: Union[None, int, float] = None
    subset_index: int = 0
    seed: int = 0
    batch_size: int = 128
    processor_from: Optional[str] = None
    label: str = ""  # what result.json calls the tasks (default: the tasks file)

    def evaluator(self, pool: Optional[ModelPool] = None):
        from mergecore.eval.evaluator import Evaluator

        return Evaluator(self.tasks if isinstance(self.tasks, str) else list(self.tasks), subset=self.subset,
                         seed=self.seed, batch_size=self.batch_size, processor_from=self.processor_from, pool=pool)

    @property
    def name(self) -> str:
        return self.label or (str(self.tasks) if isinstance(self.tasks, str) else "inline")


@dataclass
class Found:
    """What a search found: the recipe, result.json's content, the `<kind>.done` event's data,
    and how the search scored its result (`scored`, giving `reported` as the mean), so the
    replayed checkpoint is scored the same way."""

    recipe: Recipe
    summary: dict[str, Any]
    done: dict[str, Any] = field(default_factory=dict)
    scored: Optional[EvalSpec] = None
    reported: Optional[float] = None


@dataclass
class SearchRun:
    """What `run_search` hands a search: its output folder, the event sink (recorded in
    events.jsonl), the cancel token, whether to resume from a checkpoint there (and to replay
    the checkpointed history as `replayed` events, for a UI that plots from the start), and the
    model pool of the run."""

    out: Path
    emit: EventCallback
    cancel: CancelToken
    resume: bool = True
    replay_history: bool = False
    pool: ModelPool = field(default_factory=ModelPool)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self.emit(Event(kind, data))


class Search(Protocol):
    """A search built from its config as `cls(config, root)` (paths resolved against `root`, the
    config's folder, and checked; nothing loaded or written)."""

    kind: ClassVar[str]  # rmm | dam | evo: the output folder's marker, the event prefix, the checkpoint kind
    config_class: ClassVar[type]  # the pydantic model of its YAML config
    final: Optional[EvalSpec]  # tasks scored once on the replayed result (never used to choose it)

    def sources(self) -> list[str]:
        """The model folders the search reads (the output may not be one of them)."""

    def run(self, run: SearchRun) -> Found:
        """Search (resuming from a checkpoint in `run.out` when `run.resume`) and say what was found."""


class EventLog:
    """Every event of a search, one JSON line each, in OUT/events.jsonl; a resumed run appends."""

    def __init__(self, out: Path, forward: Optional[EventCallback], *, append: bool):
        self.forward = forward
        self._file = open(out / EVENTS_FILE, "a" if append else "w", encoding="utf-8")

    def emit(self, event: Event) -> None:
        if not self._file.closed:
            self._file.write(json.dumps(event.as_dict(), default=str) + "\n")
            self._file.flush()
        if self.forward is not None:
            self.forward(event)

    def close(self) -> None:
        self._file.close()


def read_events(out_dir: Union[str, Path]) -> list[Event]:
    """The events recorded in a search's output folder, oldest first (every run of it: a resumed
    run repeats the episodes / steps / generations after its checkpoint; the latest wins)."""
    path = Path(out_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            d = json.loads(line)
            out.append(Event(str(d["kind"]), dict(d.get("data") or {}), float(d.get("time", 0.0))))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line cut short by a crash
    return out


def search_class(kind: str) -> Any:
    """The class implementing search `kind` (its module's `SEARCH`)."""
    if kind not in SEARCHES:
        raise MergeError(f"unknown search '{kind}'; known: {', '.join(SEARCHES)}")
    return importlib.import_module(SEARCHES[kind]).SEARCH


class Program:
    """One run of `search` in its output folder: built, it has claimed the folder and opened the
    event log (`run` is what the search is handed); `finish(found)` writes what was found."""

    def __init__(self, search: Search, out_dir: Union[str, Path], *, on_event: Optional[EventCallback] = None,
                 cancel: Optional[CancelToken] = None, resume: bool = True, replay: bool = False,
                 replay_history: bool = False, pool: Optional[ModelPool] = None):
        from mergecore.io.outdir import claim_output_dir, existing_dirs

        self.search, self.replay = search, replay
        # a new or empty folder, or one a search of this kind marked (resumed); never a foreign or model folder
        out = claim_output_dir(Path(out_dir), kind=search.kind, sources=existing_dirs(search.sources()))
        self.log = EventLog(out, on_event, append=resume)
        self.run = SearchRun(out, self.log.emit, cancel or CancelToken(), resume, replay_history, pool or ModelPool())

    def finish(self, found: Found) -> dict[str, Any]:
        """recipe.yml, the replay and its scores, result.json, the `<kind>.done` event; returns the summary."""
        from mergecore.search.checkpoint import write_text_atomic

        out = self.run.out
        try:  # each file whole or not at all, even on Ctrl-C
            write_text_atomic(out / RECIPE_FILE, found.recipe.to_yaml())
            summary = dict(found.summary)
            if self.replay or self.search.final is not None:
                summary.update(_replay(self.search, found, self.run))
            write_text_atomic(out / RESULT_FILE, json.dumps(summary, indent=2, default=str))
            self.run.event(f"{self.search.kind}.done", found.done)
        finally:
            self.close()
        return summary

    def close(self) -> None:
        self.log.close()


def run_search(search: Search, out_dir: Union[str, Path], *, on_event: Optional[EventCallback] = None,
               cancel: Optional[CancelToken] = None, resume: bool = True, replay: bool = False,
               replay_history: bool = False, pool: Optional[ModelPool] = None) -> dict[str, Any]:
    """Run (or resume) `search` into `out_dir`: recipe.yml, result.json, events.jsonl, and with
    `replay` (or final tasks) the merged checkpoint in OUT/model. Returns result.json's content."""
    program = Program(search, out_dir, on_event=on_event, cancel=cancel, resume=resume, replay=replay,
                      replay_history=replay_history, pool=pool)
    try:
        found = search.run(program.run)
    except BaseException:
        program.close()
        raise
    return program.finish(found)


def _replay(search: Search, found: Found, run: SearchRun) -> dict[str, Any]:
    """Merge the recipe into OUT/model and score that checkpoint."""
    from mergecore.merging import merge

    model = run.out / MODEL_DIR
    t0 = time.time()
    # the search owns OUT: a model it merged there before is replaced; artifacts resolve next to the recipe
    res = merge(run.out / RECIPE_FILE, model, overwrite=True, cancel=run.cancel)
    info: dict[str, Any] = {"model": str(model), "merge": res.summary(), "merge_seconds": round(time.time() - t0, 3)}
    run.event("search.replayed", {"model": str(model), "summary": info["merge"]})
    out: dict[str, Any] = {"replay": info}
    if found.scored is not None:
        r = found.scored.evaluator(run.pool).evaluate(model, subset_index=found.scored.subset_index, cancel=run.cancel)
        info.update(tasks=found.scored.name, mean=r.mean, scores=r.scores)
        if found.reported is not None:
            info["matches"] = math.isclose(r.mean, found.reported, rel_tol=1e-6, abs_tol=1e-9)
            if not info["matches"]:
                run.event("search.mismatch", {"reported": found.reported, "measured": r.mean, "tasks": info["tasks"]})
    if search.final is not None:
        r = search.final.evaluator(run.pool).evaluate(model, cancel=run.cancel)
        out["final"] = {"tasks": search.final.name, "mean": r.mean, "scores": r.scores}
    return out
