"""The RMM search loop: episodes, rewards, DAR, PPO updates, checkpoints, events, recipe.

The loop is independent of how a candidate is scored: it takes a `Scorer`, which maps
(candidate model, data-subset index) to a reward and its metrics. `run_rmm` wires the real one
(the evaluator over a task list) from a search config.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from mergecore.errors import MergeError
from mergecore.events import CancelToken, Event, EventCallback
from mergecore.methods import get_method
from mergecore.recipe import Recipe, recipe_from_dict
from mergecore.search.checkpoint import SearchCheckpoint, WallClock, need, pack_tree, restoring, unpack_tree
from mergecore.search.rmm.dar import DynamicAverageReward
from mergecore.search.rmm.env import LayerWalk
from mergecore.search.rmm.layers import Assembler, LayerBank, Operator, PrefixCache
from mergecore.search.rmm.ppo import PPOAgent, PPOConfig


LEGACY_CHECKPOINT = "rmm_checkpoint.pt"  # the old pickle format: refused, never loaded


def _emitted(value: Any) -> list[tuple[int, int]]:
    """A trajectory from JSON ([[layer, action], ...]) as the search keeps it (a list of tuples)."""
    if not isinstance(value, list) or not all(
            isinstance(x, list) and len(x) == 2 and all(type(v) is int for v in x) for x in value):
        raise TypeError("a trajectory is not a list of [layer, action] pairs")
    return [(x[0], x[1]) for x in value]


Scored = tuple[float, dict[str, float]]  # a score and its per-task metrics


class Scorer(Protocol):
    n_subsets: int

    def __call__(self, model: nn.Module, subset: int) -> tuple[float, dict[str, float]]:
        """Reward (higher is better) and per-task metrics of `model` on data subset `subset`."""


@dataclass
class RMMSettings:
    episodes: int = 700
    max_steps: Optional[int] = None  # default 2L
    update_every: int = 4
    dar: bool = True
    dar_lambda: float = 0.8
    back_penalty: float = -10.0
    seed: int = 0
    memoize: bool = True  # reuse the reward of an identical (trajectory, subset)
    prefix_cache: bool = True
    cache_bytes: int = 1 << 30
    keep_top: int = 5
    ppo: PPOConfig = field(default_factory=PPOConfig)


@dataclass
class Trajectory:
    emitted: list[tuple[int, int]]
    actions: list[int]
    reward: float
    metrics: dict[str, float]
    episode: int


@dataclass
class RMMResult:
    best: Trajectory
    top: list[Trajectory]
    episodes: int
    evaluations: int
    seconds: float


def trajectory_recipe(emitted: list[tuple[int, int]], base: str, models: list[str], operators: list[Operator],
                      seed: int = 0, name: str = "rmm", artifacts: Optional[dict[str, str]] = None) -> Recipe:
    """Replayable recipe: one slice per emitted layer; consecutive layers of one model are joined.
    Embeddings, final norm and heads come from the base (`non_layer_from`); `artifacts` are the
    files data-informed operators read."""
    slices: list[dict[str, Any]] = []
    n = len(models)
    for layer, action in emitted:
        if action < n:
            last = slices[-1] if slices else None
            if (last and "merge_method" not in last and last["sources"][0]["model"] == models[action]
                    and last["sources"][0]["layer_range"][1] == layer):
                last["sources"][0]["layer_range"][1] = layer + 1
            else:
                slices.append({"sources": [{"model": models[action], "layer_range": [layer, layer + 1]}]})
        else:
            op = operators[action - n]
            takes_base = get_method(op.method).base != "ignored"
            srcs = [{"model": base, "layer_range": [layer, layer + 1]}] if takes_base else []
            srcs += [{"model": m, "layer_range": [layer, layer + 1]} for m in models]
            block: dict[str, Any] = {"merge_method": op.method, "sources": srcs}
            if op.parameters:
                block["parameters"] = dict(op.parameters)
            slices.append(block)
    if not slices:
        raise MergeError("the trajectory emitted no layer; nothing to replay")
    data: dict[str, Any] = {
        "merge_method": "passthrough",
        "base_model": base,
        "non_layer_from": base,
        "slices": slices,
        "seed": seed,
        "name": name,
    }
    if artifacts:
        data["artifacts"] = dict(artifacts)
    return recipe_from_dict(data)


class RMMSearch:
    """One RMM run over in-memory models; resumable from `out_dir`."""

    def __init__(self, base: nn.Module, models: list[nn.Module], operators: list[Operator], scorer: Scorer,
                 settings: RMMSettings, out_dir: Optional[Path] = None,
                 on_event: Optional[EventCallback] = None, cancel: Optional[CancelToken] = None,
                 model_names: Optional[list[str]] = None, pool: Optional[Any] = None,
                 identity: Optional[dict[str, Any]] = None, replay_history: bool = False,
                 artifacts: Optional[dict[str, str]] = None):
        self.settings = settings
        # what a checkpoint must agree on to be resumed (models, operators, data, seeds)
        self.checkpoint = SearchCheckpoint(out_dir, "rmm", identity or {}, legacy=LEGACY_CHECKPOINT)
        self.replay_history = replay_history
        # pool: a backend (mergecore.search.backend) whose workers score (emitted, subset) items;
        # with it, the episodes up to each PPO update are sampled first, scored in parallel and
        # recorded in episode order (the same results as one at a time: the policy only changes
        # at updates, and the sampler has its own generator)
        self.pool = pool
        self.scorer = scorer
        self.operators = operators
        self.bank = LayerBank(models, base, operators, seed=settings.seed, artifacts=artifacts,
                              model_refs=model_names)
        self.cache = PrefixCache(settings.cache_bytes) if settings.prefix_cache else None
        self.assembler = Assembler(base, self.bank, self.cache)
        self.walk = LayerWalk(len(models), len(operators), self.bank.n_layers, settings.max_steps)
        self.agent = PPOAgent(self.walk.state_dim, self.walk.n_actions, settings.ppo, seed=settings.seed)
        self.dar = DynamicAverageReward(settings.dar_lambda, settings.episodes, scorer.n_subsets, settings.dar)
        self.out_dir = Path(out_dir) if out_dir else None
        self.on_event = on_event
        self.cancel = cancel or CancelToken()
        self.names = model_names or [f"model{i}" for i in range(len(models))]
        self.episode = 0
        self.evaluations = 0
        self.eval_seconds = 0.0  # building candidates + scoring them
        self.build_seconds = 0.0  # of which: assembling the candidate model
        # the run's time before this process took it over (up to its checkpoint), so a resumed run's
        # seconds, like its episodes and evaluations, count the whole run
        self.clock = WallClock()
        self.memo: dict[tuple, tuple[float, dict[str, float]]] = {}
        # trajectory -> (reward, metrics) on the full validation split (the final choice's scores),
        # checkpointed so a run cut short while choosing does not score them again
        self.validated: dict[tuple, tuple[float, dict[str, float]]] = {}
        self.top: list[Trajectory] = []
        self.history: list[dict[str, Any]] = []

    # -- persistence -------------------------------------------------------------------------

    def save(self) -> None:
        """Write the resume state (safetensors + JSON, no pickle) at a PPO-update boundary."""
        tensors: dict[str, torch.Tensor] = {}
        state = {
            "episode": self.episode,
            "evaluations": self.evaluations,
            "eval_seconds": self.eval_seconds,
            "build_seconds": self.build_seconds,
            "seconds": self.elapsed(),
            "agent": pack_tree(self.agent.state_dict(), "agent", tensors),
            "dar": {"last": self.dar.last},
            "top": [{"emitted": [list(x) for x in t.emitted], "actions": list(t.actions), "reward": t.reward,
                     "metrics": t.metrics, "episode": t.episode} for t in self.top],
            "history": self.history,
            "memo": [[[list(x) for x in emitted], subset, reward, metrics]
                     for (emitted, subset), (reward, metrics) in self.memo.items()],
            "validated": [[[list(x) for x in emitted], reward, metrics]
                          for emitted, (reward, metrics) in self.validated.items()],
        }
        self.checkpoint.save(tensors, state)

    def try_resume(self) -> bool:
        """Continue from the checkpoint in `out_dir`, if there is one; a bad one is one line."""
        if not self.checkpoint.exists():
            return False
        tensors, state = self.checkpoint.load()
        with restoring(self.checkpoint.path):
            episode = need(state, "episode", int)
            evaluations = need(state, "evaluations", int)
            last = need(need(state, "dar", dict), "last", float, type(None))
            top = [Trajectory(_emitted(need(t, "emitted", list)), [int(a) for a in need(t, "actions", list)],
                              need(t, "reward", float), dict(need(t, "metrics", dict)), need(t, "episode", int))
                   for t in need(state, "top", list)]
            history = need(state, "history", list)
            if not all(isinstance(h, dict) for h in history):
                raise TypeError("'history' holds a non-object")
            memo: dict[tuple, tuple[float, dict[str, float]]] = {}
            for entry in need(state, "memo", list):
                if not isinstance(entry, list) or len(entry) != 4 or type(entry[1]) is not int:
                    raise TypeError("a memo entry is not [emitted, subset, reward, metrics]")
                emitted, subset, reward, metrics = entry
                if type(reward) not in (int, float) or not isinstance(metrics, dict):
                    raise TypeError("a memo entry is not [emitted, subset, reward, metrics]")
                memo[(tuple(_emitted(emitted)), subset)] = (float(reward), metrics)
            validated: dict[tuple, tuple[float, dict[str, float]]] = {}
            for entry in state.get("validated", []):  # absent from checkpoints written before it was kept
                if (not isinstance(entry, list) or len(entry) != 3 or type(entry[1]) not in (int, float)
                        or not isinstance(entry[2], dict)):
                    raise TypeError("a validated entry is not [emitted, reward, metrics]")
                validated[tuple(_emitted(entry[0]))] = (float(entry[1]), entry[2])
            if episode < 0 or evaluations < 0:
                raise ValueError(f"episode {episode} / evaluations {evaluations} out of range")
            # times up to the checkpoint (absent from checkpoints written before they were kept: 0)
            times = {k: state.get(k, 0.0) for k in ("eval_seconds", "build_seconds")}
            if not all(type(v) in (int, float) and v >= 0 for v in times.values()):
                raise TypeError("'eval_seconds' and 'build_seconds' must be non-negative numbers")
            self.clock.restore(state)
            self.agent.load_state_dict(unpack_tree(need(state, "agent", dict), tensors))
        self.episode, self.evaluations = episode, evaluations
        self.eval_seconds, self.build_seconds = (float(times[k]) for k in times)
        self.dar.last = last
        self.top, self.history, self.memo, self.validated = top, history, memo, validated
        if self.replay_history:  # the episodes before the checkpoint, so a plot starts at the first
            for info in self.history:
                self._emit("rmm.episode", dict(info, replayed=True))
        self._emit("rmm.resumed", {"episode": self.episode})
        return True

    # -- loop --------------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds the run has taken: before its checkpoint, plus this process's part."""
        return self.clock.elapsed()

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        if self.on_event:
            self.on_event(Event(kind, data))

    def score(self, emitted: list[tuple[int, int]], subset: int) -> tuple[float, dict[str, float], float]:
        key = (tuple(emitted), subset)
        if self.settings.memoize and key in self.memo:
            r, m = self.memo[key]
            return r, m, 0.0
        t0 = time.time()
        model = self.assembler.build(emitted)
        self.build_seconds += time.time() - t0
        with torch.no_grad():
            reward, metrics = self.scorer(model, subset)
        dt = time.time() - t0
        self.evaluations += 1
        self.eval_seconds += dt
        if self.settings.memoize:
            self.memo[key] = (reward, metrics)
        return reward, metrics, dt

    def _sample(self) -> tuple[list, bool]:
        """Walk one episode with the current policy: (transitions, fell off)."""
        state = self.walk.reset()
        transitions = []
        while True:
            action, logp = self.agent.act(state)
            step = self.walk.step(action)
            transitions.append((state, action, logp))
            state = step.state
            if step.done:
                break
        return transitions, step.fell_off

    def run_episode(self) -> dict[str, Any]:
        e = self.episode
        subset = e % max(1, self.scorer.n_subsets)
        transitions, fell_off = self._sample()
        if fell_off:
            raw, metrics, dt = self.settings.back_penalty, {}, 0.0
        else:
            raw, metrics, dt = self.score(list(self.walk.emitted), subset)
        return self._finish(e, subset, transitions, fell_off, list(self.walk.emitted), list(self.walk.actions),
                            raw, metrics, dt)

    def run_window(self) -> list[dict[str, Any]]:
        """The episodes up to the next PPO update: sampled, scored on the pool, recorded in order."""
        first = self.episode
        every = self.settings.update_every
        count = min(every - first % every, self.settings.episodes - first)
        samples = []
        for e in range(first, first + count):
            transitions, fell_off = self._sample()
            samples.append((e, e % max(1, self.scorer.n_subsets), transitions, fell_off, list(self.walk.emitted),
                            list(self.walk.actions)))
        todo: list[tuple] = []
        for e, subset, _, fell_off, emitted, _ in samples:
            key = (tuple(emitted), subset)
            if fell_off or (self.settings.memoize and (key in self.memo or key in todo)):
                continue
            todo.append(key)
        results = self.pool.map([(list(k[0]), k[1]) for k in todo], cancel=self.cancel) if todo else []
        fresh = dict(zip(todo, results)) if self.settings.memoize else None
        queue = list(results)
        infos = []
        for e, subset, transitions, fell_off, emitted, actions in samples:
            key = (tuple(emitted), subset)
            if fell_off:
                raw, metrics, dt = self.settings.back_penalty, {}, 0.0
            elif self.settings.memoize and key in self.memo:
                (raw, metrics), dt = self.memo[key], 0.0
            else:
                raw, metrics, dt = fresh.pop(key) if fresh is not None else queue.pop(0)
                self.evaluations += 1
                self.eval_seconds += dt
                if self.settings.memoize:
                    self.memo[key] = (raw, metrics)
            infos.append(self._finish(e, subset, transitions, fell_off, emitted, actions, raw, metrics, dt))
        return infos

    def _finish(self, e: int, subset: int, transitions: list, fell_off: bool, emitted: list[tuple[int, int]],
                actions: list[int], raw: float, metrics: dict[str, float], dt: float) -> dict[str, Any]:
        smoothed = self.dar(e, raw)
        for i, (s, a, lp) in enumerate(transitions):
            last = i == len(transitions) - 1
            self.agent.record(s, a, lp, smoothed if last else 0.0, last)
        if not fell_off:
            self._keep(Trajectory(list(emitted), list(actions), raw, metrics, e))
        best = self.top[0] if self.top else None
        info = {
            "episode": e,
            "subset": subset,
            "raw_reward": raw,
            "dar_reward": smoothed,
            "best_reward": best.reward if best else None,
            "best_trajectory": [list(x) for x in best.emitted] if best else None,
            "actions": [self.walk.action_name(a, self.names, [o.name for o in self.operators]) for a in actions],
            "depth": len(emitted),
            "eval_seconds": dt,
            "evaluations": self.evaluations,
            "metrics": metrics,
        }
        self.history.append(info)
        self.episode += 1
        if self._at_boundary():
            info["ppo"] = self.agent.update()
        self._emit("rmm.episode", info)
        return info

    def _at_boundary(self) -> bool:
        return self.episode % self.settings.update_every == 0 or self.episode >= self.settings.episodes

    def _keep(self, traj: Trajectory) -> None:
        if not traj.emitted:  # a walk that skipped every layer is no model to replay
            return
        for t in self.top:
            if t.emitted == traj.emitted:
                if traj.reward > t.reward:
                    t.reward, t.metrics, t.episode = traj.reward, traj.metrics, traj.episode
                break
        else:
            self.top.append(traj)
        self.top.sort(key=lambda t: -t.reward)
        del self.top[self.settings.keep_top:]

    def full_score(self, emitted: list[tuple[int, int]],
                   full_scorer: Callable[[nn.Module], Scored]) -> Scored:
        """(reward, metrics) of a trajectory on the full validation split: scored once, then kept
        (and checkpointed), so a resumed run's final choice sees the same numbers."""
        key = tuple(emitted)
        if key not in self.validated:
            self.cancel.check()
            with torch.no_grad():
                self.validated[key] = full_scorer(self.assembler.build(list(emitted)))
            self.save()
        reward, metrics = self.validated[key]
        return reward, dict(metrics)

    def uniform(self, op_index: int) -> list[tuple[int, int]]:
        """The data-free merge of operator `op_index`: that operator on every layer."""
        return [(layer, self.bank.n_models + op_index) for layer in range(self.bank.n_layers)]

    def run(self) -> RMMResult:
        self.clock.start()
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        log = None
        if self.out_dir:
            # the log always mirrors the checkpointed history (episodes after it are redone)
            log = open(self.out_dir / "rmm_log.jsonl", "w")
            for info in self.history:
                log.write(json.dumps(info) + "\n")
        try:
            while self.episode < self.settings.episodes:
                self.cancel.check()
                infos = self.run_window() if self.pool is not None else [self.run_episode()]
                for info in infos:
                    if log:
                        log.write(json.dumps(info) + "\n")
                        log.flush()
                if self._at_boundary():
                    self.save()  # at PPO-update boundaries the rollout buffer is empty
        finally:
            if log:
                log.close()
        if not self.top:
            raise MergeError("no episode produced a model (every episode fell off the first layer)")
        return RMMResult(self.top[0], list(self.top), self.episode, self.evaluations, self.elapsed())


def rerank_on_full(search: RMMSearch, full_scorer: Callable[[nn.Module], tuple[float, dict[str, float]]]) -> Trajectory:
    """Re-score the kept top trajectories with `full_scorer` (e.g. the whole validation split)
    and return the best; subset rewards are noisy, so the final pick uses all the data."""
    best: Optional[Trajectory] = None
    for t in search.top:
        reward, metrics = search.full_score(t.emitted, full_scorer)
        cand = Trajectory(t.emitted, t.actions, reward, metrics, t.episode)
        if best is None or cand.reward > best.reward:
            best = cand
    if best is None:
        raise MergeError("no trajectory to re-rank")
    return best
