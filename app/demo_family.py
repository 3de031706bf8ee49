"""The built-in demo family: small models built locally (no download) that the app opens on.

A provider is one function `build(root, progress=None, cancel=None, settings=None) -> DemoFamily`;
`PROVIDERS` maps a name to it and `DEFAULT_PROVIDER` is the one `launch.py` builds on first run
(`--demo-family NAME` or `$MERGECORE_DEMO_FAMILY` picks another). The models are cached under
`root`, so a second call returns at once. `settings` overrides the provider's build settings
(the tests build a miniature of the miniature that way).

- `fmnist-vit-mini` (the default): the `fmnist-vit` family's quick preset
  (`mergecore.families.get_family("fmnist-vit", quick=True)`), trained here on first run in
  about a minute on two CPU cores: a small ViT `base` pretrained by rotation prediction and four
  experts fine-tuned from it (three Fashion-MNIST class subsets and scikit-learn's digits).
  Real predictions that differ between the experts, the base and a merge; the family's
  `tasks.yml` (test split) feeds the Compare tab's evaluation, `tasks-val.yml` the searches, and
  a few test images of each task are saved as PNGs for the Compare tab's examples.
- `synthetic-llama`: three tiny Llama checkpoints with random weights
  (`mergecore.demo.build_synthetic_llamas`), labelled synthetic everywhere they appear.

`DemoBuild` builds a family on a background thread: `launch.py` serves the page at once and the
Models tab shows the build's stage, percent and seconds until it is done (a failed default build
falls back to `synthetic-llama`, saying why in one line).

Nothing else in the app knows which provider is in use: the Models tab lists `models`, the
Compare tab runs the evaluator over `tasks` and shows `examples`, the Search tab scores on
`val_tasks` (or `tasks`).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from mergecore.events import CancelToken, Event
from mergecore.methods import DEFAULT_METHOD

ProgressFn = Callable[[Event], None]


@dataclass
class DemoFamily:
    name: str
    title: str  # shown in the UI
    description: str  # one paragraph, says what the models are (and that they are synthetic)
    models: dict[str, Path]  # short name -> checkpoint folder
    base: Optional[str]  # which of `models` is the base model
    kind: str = "causal-lm"  # 'causal-lm' | 'image-classification'
    synthetic: bool = False
    tasks: Optional[Path] = None  # a tasks YAML for mergecore.eval (None: no evaluation tasks)
    val_tasks: Optional[Path] = None  # the same tasks on validation data (what searches score on)
    # inputs for the Compare tab: prompts (causal LMs), or for image classifiers dicts
    # {"image": PNG path, "task": task name, "label": true class name}
    examples: list[Any] = field(default_factory=list)
    recipe: Optional[dict[str, Any]] = None  # a starting recipe (models referenced by short name)


def demo_root(root: Optional[Path] = None) -> Path:
    if root is not None:
        return Path(root)
    from mergecore.demo import cache_root

    return Path(os.environ.get("MERGECORE_DEMO_DIR") or cache_root() / "demo")


def _synthetic_llama(root: Path, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                     settings: Optional[dict[str, Any]] = None) -> DemoFamily:
    from mergecore.demo import build_synthetic_llamas

    start = time.time()
    if progress:
        progress(Event("demo.progress", {"stage": "synthetic tiny Llamas", "fraction": 0.0, "elapsed": 0.0}))
    models = build_synthetic_llamas(root)
    if progress:
        progress(Event("demo.progress", {"stage": "synthetic tiny Llamas", "fraction": 1.0,
                                         "elapsed": time.time() - start}))
    return DemoFamily(
        name="synthetic-llama",
        title="Synthetic tiny Llamas (random weights)",
        description=(
            "SYNTHETIC demo: three tiny Llama checkpoints (6 layers, hidden size 64, 256-token "
            "vocabulary) built locally from random weights: `base`, and `variant_a` / `variant_b` "
            "= base + seeded noise. They know no language; they show the mechanics (merging, "
            "curves, progress, comparing next-token predictions), not model quality."
        ),
        models=dict(models),
        base="base",
        kind="causal-lm",
        synthetic=True,
        examples=["1 2 3 4 5 6 7 8", "10 20 30 40", "hello world"],
        recipe={
            "merge_method": DEFAULT_METHOD,
            "base_model": "base",
            "models": [
                {"model": "variant_a", "parameters": {"weight": 0.5, "density": [0.3, 0.7]}},
                {"model": "variant_b", "parameters": {"weight": 0.5, "density": 0.5}},
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
    )


EXAMPLES_PER_TASK = 2


def _fmnist_vit_mini(root: Path, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                     settings: Optional[dict[str, Any]] = None) -> DemoFamily:
    """The fmnist-vit family's quick preset (about a minute on two cores), plus example PNGs.

    `settings` are `FmnistVitConfig` overrides. A cached build made with other settings is
    rebuilt, so the folder always holds what was asked for.
    """
    import json

    from mergecore.families import build_family, get_builder

    builder = get_builder("fmnist-vit")
    cfg = builder.make_config(True, settings)
    want = json.loads(json.dumps(cfg.as_dict()))
    fam_root = root / "families"
    done = fam_root / "fmnist-vit-quick" / "family.json"
    stale = done.is_file() and json.loads(done.read_text()).get("config") != want

    def on_progress(p) -> None:
        if progress:
            ev = p.as_event()
            ev.data["stage"] = f"{p.stage}: {p.message}" if p.message else p.stage
            progress(ev)

    fam = build_family("fmnist-vit", root=fam_root, quick=True, config=cfg, force=stale, progress=on_progress,
                       cancel=cancel)
    info = fam.info
    examples = _classifier_examples(fam.tasks_file, root / "examples", stale=stale)
    experts = info["experts"]
    acc = ", ".join(f"`{n}` {e['test_accuracy']:.2f}" for n, e in experts.items() if "test_accuracy" in e)
    c = info["config"]
    classes = "; ".join(f"`{n}`: {', '.join(e['class_names'])}" if e["dataset"] == "fashion" else f"`{n}`: digits 0-9"
                        for n, e in experts.items())
    names = list(experts)
    recipe_models = [{"model": n, "parameters": {"weight": 1.0, "density": [0.3, 0.7] if i == 0 else 0.5}}
                     for i, n in enumerate(names)]
    return DemoFamily(
        name="fmnist-vit-mini",
        title="Miniature fmnist-vit: a small ViT and four experts",
        description=(
            f"Real models trained on this machine on first run ({info.get('build_seconds', 0):.0f} s): `base` is a "
            f"small ViT ({c['num_layers']} layers, hidden size {c['hidden_size']}) pretrained by rotation prediction "
            f"(it never saw a class label); four experts were fine-tuned from it, one per task ({classes}). "
            f"Each task is scored with its own expert's classifier head on the evaluated body, so a merge combines "
            f"the bodies and keeps the heads apart. Expert test accuracy on its own task: {acc}."
        ),
        models={"base": fam.base, **fam.experts},
        base="base",
        kind="image-classification",
        synthetic=False,
        tasks=fam.tasks_file,
        val_tasks=fam.val_tasks_file,
        examples=examples,
        recipe={
            "merge_method": DEFAULT_METHOD,
            "base_model": "base",
            "models": recipe_models,
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
    )


def _classifier_examples(tasks_file: Path, out: Path, stale: bool = False,
                         per_task: int = EXAMPLES_PER_TASK) -> list[dict[str, Any]]:
    """A few test images of each image-classification task (of distinct classes) saved as PNGs;
    returns [{"image", "task", "label"}] (cached in `out/examples.json`)."""
    import json
    import shutil

    import numpy as np
    from PIL import Image

    from mergecore.eval.tasks import ClassificationTask, load_tasks

    index = out / "examples.json"
    if index.is_file() and not stale:
        rows = json.loads(index.read_text())
        if all((out / r["file"]).is_file() for r in rows):
            return [{"image": str(out / r["file"]), "task": r["task"], "label": r["label"]} for r in rows]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rows = []
    for task in load_tasks(tasks_file):
        if not isinstance(task, ClassificationTask) or not task.is_image():
            continue
        data = task.data()
        names = _label_names(task)
        seen: list[int] = []
        for i, label in enumerate(data.labels):
            if len(seen) >= per_task:
                break
            if int(label) in seen:
                continue
            seen.append(int(label))
            img = np.asarray(data.images[i])
            if img.dtype != np.uint8:
                img = np.clip(img, 0, 255).astype(np.uint8)
            label_name = names.get(int(label), str(int(label)))
            fname = f"{task.name}-{len(seen)}.png"
            Image.fromarray(img).save(out / fname)
            rows.append({"file": fname, "task": task.name, "label": label_name})
    index.write_text(json.dumps(rows, indent=1))
    return [{"image": str(out / r["file"]), "task": r["task"], "label": r["label"]} for r in rows]


def _label_names(task) -> dict[int, str]:
    """Class id -> name from the task's head checkpoint (config.json's id2label)."""
    import json

    try:
        hp = task.head_path()
        cfg = json.loads((hp / "config.json").read_text()) if hp is not None else {}
    except Exception:
        cfg = {}
    return {int(k): v for k, v in (cfg.get("id2label") or {}).items()}


_BUILD_LOCK = threading.Lock()  # two sessions asking at once build the (shared, cached) models once

PROVIDERS: dict[str, Callable[..., DemoFamily]] = {
    "fmnist-vit-mini": _fmnist_vit_mini,
    "synthetic-llama": _synthetic_llama,
}
DEFAULT_PROVIDER = "fmnist-vit-mini"


def build_demo_family(name: Optional[str] = None, root: Optional[Path] = None,
                      progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                      settings: Optional[dict[str, Any]] = None) -> DemoFamily:
    """Build (or reuse) the demo family `name` under `root`; returns what the app shows.

    `settings`: the provider's build-setting overrides (for fmnist-vit-mini, `FmnistVitConfig`
    fields such as `hidden_size` or `pretrain_steps`)."""
    from mergecore.errors import MergeError

    name = name or os.environ.get("MERGECORE_DEMO_FAMILY") or DEFAULT_PROVIDER
    if name not in PROVIDERS:
        raise MergeError(f"unknown demo family '{name}'; known: {', '.join(PROVIDERS)}")
    base = demo_root(root) / name
    base.mkdir(parents=True, exist_ok=True)
    with _BUILD_LOCK:
        return PROVIDERS[name](base, progress=progress, cancel=cancel, settings=settings)


def one_line(err: BaseException) -> str:
    """A failure as one line (a MergeError's text as it is)."""
    from mergecore.errors import MergeError

    msg = " ".join(str(err).split())
    return msg if isinstance(err, MergeError) else (f"{type(err).__name__}: {msg}" if msg else type(err).__name__)


class DemoBuild:
    """A demo family built on a background thread, watched by the page while it runs.

    `name` None is the default family (`$MERGECORE_DEMO_FAMILY` or `DEFAULT_PROVIDER`); with
    `fallback`, a failed build opens on `synthetic-llama` instead (what `launch.py` does when no
    family was asked for), and `note` says why. `start(on_done)` calls `on_done(family)` on the
    build's thread when a family is ready; `snapshot()` is what the page shows."""

    def __init__(self, name: Optional[str] = None, root: Optional[Path] = None, *, fallback: bool = False,
                 on_progress: Optional[ProgressFn] = None, settings: Optional[dict[str, Any]] = None):
        self.name, self.root, self.fallback, self.settings = name, root, fallback, settings
        self.on_progress = on_progress
        self.cancel = CancelToken()
        self.stage, self.fraction = "starting", 0.0
        self.started: Optional[float] = None
        self.finished: Optional[float] = None
        self.family: Optional[DemoFamily] = None
        self.error: Optional[str] = None  # the build failed (and so did the fallback): one line
        self.note: Optional[str] = None  # the default build failed and the synthetic demo is built instead
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self, on_done: Optional[Callable[[DemoFamily], None]] = None) -> "DemoBuild":
        self.started = time.time()
        self._thread = threading.Thread(target=self._run, args=(on_done,), name="mergecore-demo-build", daemon=True)
        self._thread.start()
        return self

    def _progress(self, ev: Event) -> None:
        with self._lock:
            self.stage = str(ev.data.get("stage") or self.stage)
            self.fraction = float(ev.data.get("fraction") or 0.0)
        if self.on_progress is not None:
            self.on_progress(ev)

    def _build(self, name: Optional[str]) -> DemoFamily:
        return build_demo_family(name, self.root, progress=self._progress, cancel=self.cancel,
                                 settings=self.settings if name == self.name else None)

    def _run(self, on_done: Optional[Callable[[DemoFamily], None]]) -> None:
        from mergecore.errors import Cancelled

        try:
            try:
                family = self._build(self.name)
            except Cancelled:
                raise
            except Exception as err:  # noqa: BLE001 (any failure is shown as one line in the page)
                if not self.fallback:
                    raise
                with self._lock:
                    self.note = f"the default demo could not be built ({one_line(err)}); opening on the synthetic demo"
                    self.stage, self.fraction = "synthetic tiny Llamas", 0.0
                family = self._build("synthetic-llama")
            self.family = family
            if on_done is not None:
                on_done(family)
        except Exception as err:  # noqa: BLE001
            self.error = one_line(err)
        finally:
            self.finished = time.time()

    @property
    def done(self) -> bool:
        return self.finished is not None

    @property
    def elapsed(self) -> float:
        return ((self.finished or time.time()) - self.started) if self.started is not None else 0.0

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the build ended (scripts and tests; the page polls `snapshot`)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"stage": self.stage, "fraction": 1.0 if self.family is not None else self.fraction,
                    "elapsed": self.elapsed, "done": self.done, "error": self.error, "note": self.note,
                    "title": self.family.title if self.family is not None else None}
