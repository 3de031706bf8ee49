"""Run an RMM search from a YAML config: load models, build the scorer, search, write results.

Search YAML (paths relative to the YAML file)::

    base_model: families/fmnist-vit/base
    models: [families/fmnist-vit/expert_a, families/fmnist-vit/expert_b]
    operators:                      # merge actions; each applies one method to layer k
      - {name: ties, method: ties, parameters: {density: 0.3, weight: 1.0}}
      - {name: dare_ties, method: dare_ties, parameters: {density: 0.66, weight: 1.0}}
    tasks: families/fmnist-vit/tasks.yml
    data_ratio: 0.1                 # each episode scores this fraction of each task
    episodes: 700
    dar: true                       # Dynamic Average Reward (false: the ablation)
    prefix_cache_size: 1GiB         # memory for cached layer outputs of shared prefixes
    backend: local                  # or ray: the episodes of each PPO update are scored in parallel
    workers: 2                      # Ray actors (each loads the models once); ray_address: a cluster

Outputs in OUT_DIR: `recipe.yml` (the best trajectory as a replayable recipe), `result.json`
(best trajectory, its rewards and metrics, the kept top trajectories, timings),
`rmm_log.jsonl` (one line per episode) and `rmm_checkpoint.safetensors` (resume state: tensors and
JSON, no pickle; `mergecore.search.checkpoint`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergecore.events import CancelToken, Event, EventCallback
from mergecore.search.backend import BackendSpec
from mergecore.search.config import resolve_path
from mergecore.search.rmm.layers import Operator
from mergecore.search.rmm.ppo import PPOConfig
from mergecore.search.rmm.search import RMMSearch, RMMSettings, rerank_on_full, trajectory_recipe


class OperatorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = None
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class PPOSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: list[int] = [64, 64]
    lr_actor: float = 3e-4
    lr_critic: float = 1e-3
    gamma: float = 0.99
    clip: float = 0.2
    epochs: int = 40
    entropy_coef: float = 0.0001


class RMMConfig(BackendSpec):
    """An RMM search, as written in YAML."""

    model_config = ConfigDict(extra="forbid")
    base_model: str
    models: list[str]
    operators: list[OperatorSpec] = Field(default_factory=lambda: [
        OperatorSpec(name="ties", method="ties", parameters={"density": 0.3, "weight": 1.0}),
    ])
    tasks: str
    final_tasks: Optional[str] = None  # scored once on the result (e.g. the test split); never used to choose
    data_ratio: float = 0.1
    episodes: int = 700
    max_steps: Optional[int] = None
    update_every: int = 4
    dar: bool = True
    dar_lambda: float = 0.8
    back_penalty: float = -10.0
    seed: int = 0
    batch_size: int = 128
    memoize: bool = True
    prefix_cache: bool = True
    prefix_cache_size: Union[str, int] = "1GiB"  # bound on cached layer outputs ('4GiB', '500MB', bytes)
    rerank_top: int = 5  # re-score this many best trajectories on all the data at the end (0: off)
    reward_scale: float = 100.0  # reward = scale x mean task score (the paper uses accuracy in %)
    ppo: PPOSpec = Field(default_factory=PPOSpec)

    @field_validator("data_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError("data_ratio must be in (0, 1]")
        return v

    @field_validator("prefix_cache_size")
    @classmethod
    def _cache_size(cls, v: Union[str, int]) -> Union[str, int]:
        from mergecore.errors import MergeError
        from mergecore.io.writer import parse_size

        try:
            parse_size(v)
        except MergeError as err:
            raise ValueError(str(err)) from None
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("models must list at least one model")
        return v

    @field_validator("episodes", "update_every", "batch_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    def settings(self) -> RMMSettings:
        return RMMSettings(
            episodes=self.episodes, max_steps=self.max_steps, update_every=self.update_every, dar=self.dar,
            dar_lambda=self.dar_lambda, back_penalty=self.back_penalty, seed=self.seed, memoize=self.memoize,
            prefix_cache=self.prefix_cache, cache_bytes=self.cache_bytes(), keep_top=max(self.rerank_top, 1),
            ppo=PPOConfig(hidden=tuple(self.ppo.hidden), lr_actor=self.ppo.lr_actor, lr_critic=self.ppo.lr_critic,
                          gamma=self.ppo.gamma, clip=self.ppo.clip, epochs=self.ppo.epochs,
                          entropy_coef=self.ppo.entropy_coef),
        )

    def cache_bytes(self) -> int:
        from mergecore.io.writer import parse_size

        return parse_size(self.prefix_cache_size)

    def operator_list(self) -> list[Operator]:
        return [Operator(o.name or o.method, o.method, dict(o.parameters)) for o in self.operators]


def _identity(config: RMMConfig, base: str, refs: list[str], tasks: str) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: everything that shapes the agent or its
    rewards (`episodes` may grow: resuming with more episodes continues the run)."""
    return {"base": base, "models": refs, "operators": [o.model_dump() for o in config.operators], "tasks": tasks,
            "data_ratio": config.data_ratio, "max_steps": config.max_steps, "update_every": config.update_every,
            "dar": config.dar, "dar_lambda": config.dar_lambda, "back_penalty": config.back_penalty,
            "seed": config.seed, "reward_scale": config.reward_scale, "ppo": config.ppo.model_dump()}


def run_rmm(config: RMMConfig, root: Path, out_dir: str | Path, *, on_event: Optional[EventCallback] = None,
            cancel: Optional[CancelToken] = None, resume: bool = True) -> dict[str, Any]:
    """Run (or resume) the search and write recipe.yml and result.json into `out_dir`."""
    from mergecore.eval.evaluator import Evaluator, load_model
    from mergecore.io.outdir import claim_output_dir, existing_dirs
    from mergecore.io.source import resolve_model_path

    out = Path(out_dir)
    base_ref = resolve_path(config.base_model, root)
    refs = [resolve_path(m, root) for m in config.models]
    # a new or empty folder, or one an RMM search marked (resumed); never a foreign or model folder
    claim_output_dir(out, kind="rmm", sources=existing_dirs([base_ref, *refs]))
    tasks = resolve_path(config.tasks, root)
    emit = on_event or (lambda e: None)
    emit(Event("rmm.loading", {"models": refs}))
    base = load_model(resolve_model_path(base_ref))
    models = [load_model(resolve_model_path(r)) for r in refs]
    evaluator = Evaluator(tasks, subset=config.data_ratio if config.data_ratio < 1 else None, seed=config.seed,
                          batch_size=config.batch_size, processor_from=resolve_model_path(base_ref))
    scale = config.reward_scale

    class _Scorer:
        n_subsets = evaluator.num_subsets()

        def __call__(self, model, subset):
            res = evaluator.evaluate(model, subset_index=subset, cancel=cancel)
            return scale * res.mean, res.scores

    pool = None
    if config.backend == "ray":  # episodes of one PPO update are scored in parallel on Ray actors
        from mergecore.search.backend import WorkerFactory, make_backend
        from mergecore.search.rmm.remote import RMMWorker, RMMWorkerSpec

        spec = RMMWorkerSpec(str(resolve_model_path(base_ref)), tuple(str(resolve_model_path(r)) for r in refs),
                             tuple((o.name, o.method, tuple(o.parameters.items())) for o in config.operator_list()),
                             str(Path(tasks).expanduser().resolve()),
                             config.data_ratio if config.data_ratio < 1 else None, seed=config.seed,
                             batch_size=config.batch_size, prefix_cache=config.prefix_cache,
                             cache_bytes=config.cache_bytes(),
                             reward_scale=config.reward_scale)
        pool = make_backend(config, WorkerFactory(RMMWorker, (spec,)))
    search = RMMSearch(base, models, config.operator_list(), _Scorer(), config.settings(), out_dir=out,
                       on_event=on_event, cancel=cancel, model_names=refs, pool=pool,
                       identity=_identity(config, base_ref, refs, tasks))
    if resume:
        search.try_resume()
    t0 = time.time()
    try:
        result = search.run()
    finally:
        if pool is not None:
            pool.close()
    best = result.best
    reranked = None
    if config.rerank_top > 0:
        full = Evaluator(tasks, subset=None, seed=config.seed, batch_size=config.batch_size,
                         processor_from=resolve_model_path(base_ref))

        def full_scorer(model):
            res = full.evaluate(model, cancel=cancel)
            return scale * res.mean, res.scores

        reranked = rerank_on_full(search, full_scorer)
        best = reranked
    recipe = trajectory_recipe(best.emitted, base_ref, refs, config.operator_list(), seed=config.seed)
    recipe.save(out / "recipe.yml")
    summary = {
        "best": {"emitted": [list(x) for x in best.emitted], "reward": best.reward, "metrics": best.metrics,
                 "episode": best.episode, "scored_on": "all data" if reranked else f"subset (ratio {config.data_ratio})"},
        "top": [{"emitted": [list(x) for x in t.emitted], "subset_reward": t.reward, "episode": t.episode}
                for t in result.top],
        "episodes": result.episodes,
        "evaluations": result.evaluations,
        "eval_seconds": search.eval_seconds,
        "seconds": time.time() - t0,
        "cache": {"hits": search.cache.hits, "misses": search.cache.misses} if search.cache else None,
        "config": config.model_dump(),
    }
    if config.final_tasks:
        final = Evaluator(resolve_path(config.final_tasks, root), subset=None, seed=config.seed,
                          batch_size=config.batch_size, processor_from=resolve_model_path(base_ref))
        res = final.evaluate(search.assembler.build(best.emitted), cancel=cancel)
        summary["final"] = {"tasks": str(config.final_tasks), "mean": res.mean, "scores": res.scores}
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    emit(Event("rmm.done", {"best_reward": best.reward, "recipe": str(out / "recipe.yml")}))
    return summary
