"""The built-in demo family: small models built locally (no download) that the app opens on.

A provider is one function `build(root, progress, cancel) -> DemoFamily`; `PROVIDERS` maps a
name to it and `DEFAULT_PROVIDER` is the one `launch.py` builds on first run. The models are
cached under `root`, so a second call returns at once.

Today the only provider is `synthetic-llama`: three tiny Llama checkpoints with random weights
(`mergecore.demo.build_synthetic_llamas`). It is labelled synthetic everywhere it appears.

To make the miniature `fmnist-vit` family the demo, add a provider that calls
`mergecore.families.get_family("fmnist-vit", quick=..., progress=..., cancel=...)` and returns
`DemoFamily(models={"base": fam.base, **fam.experts}, base="base", tasks=fam.tasks_file,
kind="image-classification", ...)`, register it in `PROVIDERS` and point `DEFAULT_PROVIDER`
at it. Nothing else in the app changes: the Models tab lists `models`, the Compare tab runs the
evaluator over `tasks` and picks classifier inputs from `examples`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from mergecore.events import CancelToken, Event

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
    examples: list[Any] = field(default_factory=list)  # inputs for the Compare tab
    recipe: Optional[dict[str, Any]] = None  # a starting recipe (models referenced by short name)


def demo_root(root: Optional[Path] = None) -> Path:
    if root is not None:
        return Path(root)
    from mergecore.demo import cache_root

    return Path(os.environ.get("MERGECORE_DEMO_DIR") or cache_root() / "demo")


def _synthetic_llama(root: Path, progress: Optional[ProgressFn] = None,
                     cancel: Optional[CancelToken] = None) -> DemoFamily:
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
            "merge_method": "ties",
            "base_model": "base",
            "models": [
                {"model": "variant_a", "parameters": {"weight": 0.5, "density": [0.3, 0.7]}},
                {"model": "variant_b", "parameters": {"weight": 0.5, "density": 0.5}},
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
    )


_BUILD_LOCK = threading.Lock()  # two sessions asking at once build the (shared, cached) models once

PROVIDERS: dict[str, Callable[..., DemoFamily]] = {
    "synthetic-llama": _synthetic_llama,
}
DEFAULT_PROVIDER = "synthetic-llama"


def provider_names() -> list[str]:
    return list(PROVIDERS)


def build_demo_family(name: Optional[str] = None, root: Optional[Path] = None,
                      progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> DemoFamily:
    """Build (or reuse) the demo family `name` under `root`; returns what the app shows."""
    from mergecore.errors import MergeError

    name = name or os.environ.get("MERGECORE_DEMO_FAMILY") or DEFAULT_PROVIDER
    if name not in PROVIDERS:
        raise MergeError(f"unknown demo family '{name}'; known: {', '.join(PROVIDERS)}")
    base = demo_root(root) / name
    base.mkdir(parents=True, exist_ok=True)
    with _BUILD_LOCK:
        return PROVIDERS[name](base, progress=progress, cancel=cancel)
