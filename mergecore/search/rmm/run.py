"""RMM as a search of the one program (`mergecore.search.base`): config, models, scorer, result.

Search YAML (paths relative to the YAML file)::

    base_model: families/fmnist-vit/base
    models: [families/fmnist-vit/expert_a, families/fmnist-vit/expert_b]
    operators:                      # merge actions; each applies one method to layer k
      - {name: ties, method: ties, parameters: {density: 0.3, weight: 1.0}}
      - {name: dare_ties, method: dare_ties, parameters: {density: 0.66, weight: 1.0}}
    tasks: families/fmnist-vit/tasks-val.yml
    final_tasks: families/fmnist-vit/tasks.yml   # optional: scored once on the replayed result
    data_ratio: 0.1                 # each episode scores this fraction of each task
    rerank_top: 5                   # the best trajectories (by episode reward) re-scored on all of `tasks`
    episodes: 700
    dar: true                       # Dynamic Average Reward (false: the ablation)
    prefix_cache_size: 1GiB         # memory for cached layer outputs of shared prefixes
    backend: local                  # or ray: the episodes of each PPO update are scored in parallel
    workers: 2                      # Ray actors (each loads the models once); ray_address: a cluster

The result is chosen on the full validation split (`tasks`, all of it), never on episode rewards:
the `rerank_top` best trajectories by episode reward and every operator applied to all layers
(the data-free merges the search can express) are scored there, and the search's best is returned
unless a data-free one scores higher (`mergecore.search.validation`).

Outputs in OUT_DIR: `recipe.yml` (the chosen trajectory as a replayable recipe), `result.json`
(the chosen trajectory, its scores, every candidate's validation score, the kept top trajectories,
timings; with a replay, the scores of OUT_DIR/model), `events.jsonl`, `rmm_log.jsonl` (one line per episode) and
`rmm_checkpoint.safetensors` (resume state: tensors and JSON, no pickle;
`mergecore.search.checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergecore.methods import DEFAULT_METHOD
from mergecore.search.backend import BackendSpec
from mergecore.search.base import EvalSpec, Found, SearchRun, run_search
from mergecore.search.config import ModelList, Positive, Ratio, config_file, model_ref
from mergecore.search.rmm.layers import Operator
from mergecore.search.rmm.ppo import PPOConfig
from mergecore.search.rmm.search import RMMSearch, RMMSettings, trajectory_recipe
from mergecore.search.validation import DATA_FREE, OWN, Candidate, Emit, choose, validated


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

    def settings(self) -> PPOConfig:
        return PPOConfig(**{**self.model_dump(), "hidden": tuple(self.hidden)})


class RMMConfig(BackendSpec):
    """An RMM search, as written in YAML."""

    model_config = ConfigDict(extra="forbid")
    base_model: str
    models: ModelList
    operators: list[OperatorSpec] = Field(default_factory=lambda: [
        OperatorSpec(name=DEFAULT_METHOD, method=DEFAULT_METHOD, parameters={"density": 0.3, "weight": 1.0}),
    ])
    tasks: str
    final_tasks: Optional[str] = None  # scored once on the result (e.g. the test split); never used to choose
    artifacts: dict[str, str] = Field(default_factory=dict)  # files data-informed operators read (statistics)
    data_ratio: Ratio = 0.1
    episodes: Positive = 700
    max_steps: Optional[int] = None
    update_every: Positive = 4
    dar: bool = True
    dar_lambda: float = 0.8
    back_penalty: float = -10.0
    seed: int = 0
    batch_size: Positive = 128
    memoize: bool = True
    prefix_cache: bool = True
    prefix_cache_size: Union[str, int] = "1GiB"  # bound on cached layer outputs ('4GiB', '500MB', bytes)
    # the result is chosen on the full validation split (`tasks`) among this many best trajectories by
    # subset reward and every operator applied to all layers (the data-free merges)
    rerank_top: Positive = 5
    reward_scale: float = Field(default=100.0, gt=0)  # reward = scale x mean task score (the paper uses accuracy in %)
    ppo: PPOSpec = Field(default_factory=PPOSpec)

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

    def settings(self) -> RMMSettings:
        return RMMSettings(
            episodes=self.episodes, max_steps=self.max_steps, update_every=self.update_every, dar=self.dar,
            dar_lambda=self.dar_lambda, back_penalty=self.back_penalty, seed=self.seed, memoize=self.memoize,
            prefix_cache=self.prefix_cache, cache_bytes=self.cache_bytes(), keep_top=self.rerank_top,
            ppo=self.ppo.settings(),
        )

    def cache_bytes(self) -> int:
        from mergecore.io.writer import parse_size

        return parse_size(self.prefix_cache_size)

    def operator_list(self) -> list[Operator]:
        return [Operator(o.name or o.method, o.method, dict(o.parameters)) for o in self.operators]


class RMM:
    """An RMM search from its config: paths resolved against `root` and checked; nothing loaded."""

    kind: ClassVar[str] = "rmm"
    config_class: ClassVar[type[RMMConfig]] = RMMConfig

    def __init__(self, config: RMMConfig, root: Path):
        self.config = config
        self.base = model_ref(config.base_model, root)
        self.models = [model_ref(m, root) for m in config.models]
        self.tasks = str(config_file(config.tasks, root))
        self.artifacts = {k: str(config_file(v, root, f"artifact '{k}'")) for k, v in config.artifacts.items()}
        self.final = None if config.final_tasks is None else EvalSpec(
            str(config_file(config.final_tasks, root, "final_tasks file")), seed=config.seed,
            batch_size=config.batch_size, label=str(config.final_tasks))

    def sources(self) -> list[str]:
        return [self.base, *self.models]

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed: everything that shapes the agent or its
        rewards (`episodes` may grow: resuming with more episodes continues the run)."""
        c = self.config
        return {"base": self.base, "models": self.models, "operators": [o.model_dump() for o in c.operators],
                "tasks": self.tasks, "data_ratio": c.data_ratio, "max_steps": c.max_steps,
                "update_every": c.update_every, "dar": c.dar, "dar_lambda": c.dar_lambda,
                "back_penalty": c.back_penalty, "seed": c.seed, "reward_scale": c.reward_scale,
                "ppo": c.ppo.model_dump(), **({"artifacts": self.artifacts} if self.artifacts else {})}

    def scoring(self, subset: Union[None, int, float], subset_index: int = 0) -> EvalSpec:
        from mergecore.io.source import resolve_model_path

        return EvalSpec(self.tasks, subset=subset, subset_index=subset_index, seed=self.config.seed,
                        batch_size=self.config.batch_size, processor_from=str(resolve_model_path(self.base)))

    def run(self, run: SearchRun) -> Found:
        from mergecore.io.source import resolve_model_path

        config = self.config
        run.event("rmm.loading", {"models": self.models})
        base = run.pool.model(resolve_model_path(self.base))
        models = [run.pool.model(resolve_model_path(r)) for r in self.models]
        sampled = self.scoring(config.data_ratio if config.data_ratio < 1 else None)
        evaluator = sampled.evaluator(run.pool)
        scale = config.reward_scale

        class _Scorer:
            n_subsets = evaluator.num_subsets()

            def __call__(self, model, subset):
                res = evaluator.evaluate(model, subset_index=subset, cancel=run.cancel)
                return scale * res.mean, res.scores

        backend = None
        if config.backend == "ray":  # episodes of one PPO update are scored in parallel on Ray actors
            from mergecore.search.backend import WorkerFactory, make_backend
            from mergecore.search.rmm.remote import RMMWorker, RMMWorkerSpec

            ops = tuple((o.name, o.method, tuple(o.parameters.items())) for o in config.operator_list())
            paths = tuple(str(resolve_model_path(r)) for r in self.models)
            spec = RMMWorkerSpec(str(resolve_model_path(self.base)), paths, ops, sampled, seed=config.seed,
                                 prefix_cache=config.prefix_cache, cache_bytes=config.cache_bytes(), reward_scale=scale,
                                 artifacts=tuple(self.artifacts.items()))
            backend = make_backend(config, WorkerFactory(RMMWorker, (spec,)))
        search = RMMSearch(base, models, config.operator_list(), _Scorer(), config.settings(), out_dir=run.out,
                           on_event=run.emit, cancel=run.cancel, model_names=self.models, pool=backend,
                           identity=self.identity(), replay_history=run.replay_history, artifacts=self.artifacts)
        if run.resume:
            search.try_resume()
        try:
            result = search.run()
        finally:
            if backend is not None:
                backend.close()
        chosen, validation, scored = self.choose(search, run)
        best = chosen.ref
        summary = {
            "best": {"emitted": [list(x) for x in best], "reward": scale * chosen.mean, "metrics": chosen.scores,
                     "episode": chosen.info.get("episode"), "scored_on": "all data", "source": chosen.source,
                     "label": chosen.label,
                     "subset_reward": None if chosen.subset is None else scale * chosen.subset},
            "validation": validation,
            "top": [{"emitted": [list(x) for x in t.emitted], "subset_reward": t.reward, "episode": t.episode}
                    for t in result.top],
            "episodes": result.episodes,
            "evaluations": result.evaluations,
            "eval_seconds": search.eval_seconds,  # the whole run's, also when it was resumed
            "seconds": search.elapsed(),
            "cache": {"hits": search.cache.hits, "misses": search.cache.misses} if search.cache else None,
            "config": config.model_dump(),
        }
        recipe = trajectory_recipe(best, self.base, self.models, config.operator_list(), seed=config.seed,
                                   artifacts=self.artifacts)
        # the rmm.done event names the result (chosen on the full validation split, which may be another
        # trajectory than the episodes' subset-best), so a UI draws the same trajectory the recipe holds
        done = {"best_reward": summary["best"]["reward"], "best_trajectory": summary["best"]["emitted"],
                "scored_on": "all data", "episode": chosen.info.get("episode"), "source": chosen.source,
                "recipe": str(run.out / "recipe.yml")}
        return Found(recipe, summary, done, scored, chosen.mean)

    def choose(self, search: RMMSearch, run: SearchRun) -> tuple[Candidate, dict[str, Any], EvalSpec]:
        """The result, chosen on the full validation split (`choose_trajectory`), and how it was scored."""
        scored = self.scoring(None)
        full = scored.evaluator(run.pool)

        def full_scorer(model):
            res = full.evaluate(model, cancel=run.cancel)
            return res.mean, res.scores

        chosen, block = choose_trajectory(search, lambda emitted: search.full_score(emitted, full_scorer), run.event,
                                          str(self.config.tasks), self.config.rerank_top, self.config.reward_scale)
        return chosen, block, scored


def choose_trajectory(search: RMMSearch, score: Callable[[list[tuple[int, int]]], tuple[float, dict[str, float]]],
                      emit: Emit, tasks: str, top: int, reward_scale: float = 1.0) -> tuple[Candidate, dict[str, Any]]:
    """The `top` best trajectories by episode reward and each operator on every layer (the data-free
    merges), each scored by `score` (mean and per-task scores on the full validation split); the
    result by `mergecore.search.validation.choose`. Returns it and result.json's `validation` block."""
    candidates = []
    for t in search.top[:top]:
        mean, scores = score(t.emitted)
        candidates.append(validated(emit, Candidate(
            f"episode {t.episode + 1}", OWN, mean, scores, subset=t.reward / reward_scale, ref=t.emitted,
            info={"episode": t.episode, "emitted": [list(x) for x in t.emitted]}), tasks))
    for i, op in enumerate(search.operators):
        emitted = search.uniform(i)
        mean, scores = score(emitted)
        candidates.append(validated(emit, Candidate(
            f"{op.name} on every layer", DATA_FREE, mean, scores, ref=emitted,
            info={"operator": op.name, "emitted": [list(x) for x in emitted]}), tasks))
    return choose(candidates, emit, tasks)


SEARCH = RMM


def run_rmm(config: RMMConfig, root: Path, out_dir: str | Path, **options: Any) -> dict[str, Any]:
    """Run (or resume) the search into `out_dir`; `options` as `mergecore.search.base.run_search`'s."""
    return run_search(RMM(config, root), out_dir, **options)
