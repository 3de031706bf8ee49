"""Dynamic Average Reward (RMM paper): smooth noisy subset rewards across episodes.

    R̃_e = λ(e/E) · R̃_{e-1} + (1 - λ(e/E)) · R_e

with λ(e/E) = λ · e / E growing over the run, and the running value reset to the raw reward
whenever the data-subset cycle starts over (each episode scores a different subset; once all
subsets have been seen, the average restarts). `enabled=False` returns raw rewards (ablation).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DynamicAverageReward:
    lam: float = 0.8
    total_episodes: int = 700
    cycle_length: int = 1  # episodes per pass over the data subsets
    enabled: bool = True
    last: float | None = None

    def __call__(self, episode: int, raw: float) -> float:
        """Smoothed reward for `episode` (0-based) whose raw reward is `raw`."""
        if not self.enabled:
            return raw
        if self.last is None or self.cycle_length <= 1 or episode % self.cycle_length == 0:
            self.last = raw
            return raw
        weight = self.lam * min(episode / max(self.total_episodes, 1), 1.0)
        self.last = weight * self.last + (1.0 - weight) * raw
        return self.last

    def state_dict(self) -> dict:
        return {"last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.last = state.get("last")
