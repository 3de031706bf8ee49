"""The RMM environment: an agent walks the layers and picks, per layer, where it comes from.

Actions (N source models, M merge operators):
  0 .. N-1      take layer k from model i        -> emit (k, a), k += 1
  N .. N+M-1    take layer k merged by operator m -> emit (k, a), k += 1
  N+M           skip                              -> k += 1, emit nothing
  N+M+1         back                              -> k -= 1, emit nothing
The episode ends when k reaches L, after `max_steps` steps, or when back goes below layer 0
(with a penalty). The state is the (N+M) x L merging map (how often each action was taken at
each layer) followed by a one-hot of the current layer position, which the reference code
leaves out (without it, the agent cannot tell where it is after a skip or a back).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepResult:
    state: np.ndarray
    emitted: tuple[int, int] | None  # (layer, action) or None
    done: bool
    fell_off: bool  # back below layer 0


@dataclass
class LayerWalk:
    """One episode's state machine (no model code: assembling and scoring live elsewhere)."""

    n_models: int
    n_ops: int
    n_layers: int
    max_steps: int | None = None
    position: int = 0
    steps: int = 0
    emitted: list[tuple[int, int]] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    merge_map: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.n_models < 1 or self.n_layers < 1 or self.n_ops < 0:
            raise ValueError("need at least one model and one layer")
        if self.max_steps is None:
            self.max_steps = 2 * self.n_layers
        self.merge_map = np.zeros((self.n_models + self.n_ops, self.n_layers), dtype=np.float32)

    @property
    def n_actions(self) -> int:
        return self.n_models + self.n_ops + 2

    @property
    def skip(self) -> int:
        return self.n_models + self.n_ops

    @property
    def back(self) -> int:
        return self.n_models + self.n_ops + 1

    @property
    def state_dim(self) -> int:
        return (self.n_models + self.n_ops) * self.n_layers + self.n_layers + 1

    def reset(self) -> np.ndarray:
        self.position = 0
        self.steps = 0
        self.emitted = []
        self.actions = []
        self.merge_map[:] = 0
        return self.state()

    def state(self) -> np.ndarray:
        pos = np.zeros(self.n_layers + 1, dtype=np.float32)
        pos[min(max(self.position, 0), self.n_layers)] = 1.0
        return np.concatenate([self.merge_map.reshape(-1), pos])

    def action_name(self, action: int, model_names: list[str] | None = None, op_names: list[str] | None = None) -> str:
        if action < self.n_models:
            return model_names[action] if model_names else f"model{action}"
        if action < self.n_models + self.n_ops:
            i = action - self.n_models
            return op_names[i] if op_names else f"op{i}"
        return "skip" if action == self.skip else "back"

    def step(self, action: int) -> StepResult:
        if not 0 <= action < self.n_actions:
            raise ValueError(f"action {action} out of range 0..{self.n_actions - 1}")
        self.steps += 1
        self.actions.append(action)
        emitted = None
        fell_off = False
        if action < self.n_models + self.n_ops:
            self.merge_map[action, self.position] += 1
            emitted = (self.position, action)
            self.emitted.append(emitted)
            self.position += 1
        elif action == self.skip:
            self.position += 1
        else:
            self.position -= 1
            fell_off = self.position < 0
        done = fell_off or self.position >= self.n_layers or self.steps >= self.max_steps
        return StepResult(self.state(), emitted, done, fell_off)
