"""PPO actor-critic for the layer walk (defaults from the RMM paper's code).

Separate actor and critic MLPs (64-64, tanh), clipped surrogate objective (ε 0.2), value
baseline, entropy bonus, Monte-Carlo returns with discount γ normalised over the batch, K
full-batch update epochs every few episodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


def _mlp(inp: int, hidden: tuple[int, ...], out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    last = inp
    for h in hidden:
        layers += [nn.Linear(last, h), nn.Tanh()]
        last = h
    layers.append(nn.Linear(last, out))
    return nn.Sequential(*layers)


@dataclass
class PPOConfig:
    hidden: tuple[int, ...] = (64, 64)
    lr_actor: float = 3e-4
    lr_critic: float = 1e-3
    gamma: float = 0.99
    clip: float = 0.2
    epochs: int = 40
    entropy_coef: float = 0.0001
    value_coef: float = 0.5


@dataclass
class Rollout:
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    dones: list[bool] = field(default_factory=list)

    def clear(self) -> None:
        for v in (self.states, self.actions, self.logprobs, self.rewards, self.dones):
            v.clear()

    def __len__(self) -> int:
        return len(self.actions)


class PPOAgent:
    def __init__(self, state_dim: int, n_actions: int, config: PPOConfig | None = None, seed: int = 0):
        self.config = config or PPOConfig()
        torch.manual_seed(seed)
        self.actor = _mlp(state_dim, self.config.hidden, n_actions)
        self.critic = _mlp(state_dim, self.config.hidden, 1)
        self.optimizer = torch.optim.Adam([
            {"params": self.actor.parameters(), "lr": self.config.lr_actor},
            {"params": self.critic.parameters(), "lr": self.config.lr_critic},
        ])
        self.rng = torch.Generator().manual_seed(seed)
        self.buffer = Rollout()

    @torch.no_grad()
    def act(self, state: np.ndarray, greedy: bool = False) -> tuple[int, float]:
        logits = self.actor(torch.as_tensor(state, dtype=torch.float32))
        dist = torch.distributions.Categorical(logits=logits)
        if greedy:
            action = int(torch.argmax(logits))
        else:
            action = int(torch.multinomial(dist.probs, 1, generator=self.rng))
        return action, float(dist.log_prob(torch.tensor(action)))

    def record(self, state: np.ndarray, action: int, logprob: float, reward: float, done: bool) -> None:
        b = self.buffer
        b.states.append(np.asarray(state, dtype=np.float32))
        b.actions.append(action)
        b.logprobs.append(logprob)
        b.rewards.append(reward)
        b.dones.append(done)

    def returns(self) -> torch.Tensor:
        out: list[float] = []
        running = 0.0
        for r, done in zip(reversed(self.buffer.rewards), reversed(self.buffer.dones)):
            if done:
                running = 0.0
            running = r + self.config.gamma * running
            out.insert(0, running)
        ret = torch.tensor(out, dtype=torch.float32)
        if len(ret) > 1:
            ret = (ret - ret.mean()) / (ret.std() + 1e-7)
        return ret

    def update(self) -> dict[str, float]:
        """K epochs of clipped PPO on the buffer; clears it. Returns the last losses."""
        if len(self.buffer) == 0:
            return {}
        cfg = self.config
        states = torch.as_tensor(np.stack(self.buffer.states))
        actions = torch.as_tensor(self.buffer.actions)
        old_logp = torch.as_tensor(self.buffer.logprobs, dtype=torch.float32)
        rets = self.returns()
        with torch.no_grad():
            adv = rets - self.critic(states).squeeze(-1)
        stats: dict[str, float] = {}
        for _ in range(cfg.epochs):
            dist = torch.distributions.Categorical(logits=self.actor(states))
            logp = dist.log_prob(actions)
            ratio = torch.exp(logp - old_logp)
            surr = torch.min(ratio * adv, torch.clamp(ratio, 1 - cfg.clip, 1 + cfg.clip) * adv)
            values = self.critic(states).squeeze(-1)
            value_loss = nn.functional.mse_loss(values, rets)
            entropy = dist.entropy().mean()
            loss = -surr.mean() + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            stats = {"loss": loss.item(), "value_loss": value_loss.item(), "entropy": entropy.item()}
        self.buffer.clear()
        return stats

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.set_state(state["rng"])
