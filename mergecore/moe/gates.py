"""Router rows of the mixture: one vector per layer and expert, from the experts' prompts.

`hidden` (mergekit's name `hidden_avg` too): the BASE model is run once per prompt, and a forward
pre-hook on every layer's MLP records its input (the residual stream after post_attention_layernorm,
which is exactly what the router sees); a prompt's vector is the mean over its own tokens (special
tokens such as BOS are run but not averaged: the same BOS state in every prompt would pull all the
gates together); an expert's is the mean over its positive prompts minus the mean over its negative
prompts. `hidden_last` takes each prompt's last token instead. `cheap_embed`: the same with the
base's token embeddings (no forward pass; one vector for every layer). Each row is then scaled to
unit length per layer, as mergekit does, so a token's router logit is |h|·cos(h, prompts) and no
expert wins by having louder prompts. `random` is a seeded N(0, 1) draw (mergekit's, unnormalised);
`uniform_random` nn.Linear's default init U(±1/√hidden).

mergekit differs in two ways: it reads the residual stream at the layer's input (before attention
and the norm) and, for `hidden`, each prompt's last token; the router acts on the MLP's input, so
mergecore takes that.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from mergecore.errors import MergeError, clip
from mergecore.events import CancelToken
from mergecore.io.adapter import AdapterSource
from mergecore.io.source import ModelSource
from mergecore.moe.config import HIDDEN_MODES, Expert, MoEConfig

EMBED = "model.embed_tokens.weight"
# (prompts done, prompts total, seconds, what)
GateProgress = Callable[[int, int, float, str], None]


def check_device(device: str) -> torch.device:
    """`--device` as a torch device, or one line (unknown, or cuda where there is none)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MergeError(f"unknown device '{clip(device, 60)}'; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise MergeError(f"unsupported device '{clip(device, 60)}'; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: no CUDA device is available here; use --device cpu")
    return dev


def _tokenizer(base: ModelSource):
    from mergecore.models import load_tokenizer

    try:
        return load_tokenizer(base.path)
    except MergeError as err:
        raise MergeError(f"gate prompts are tokenized with the base model's tokenizer: {err}") from None


def _load_base(base: ModelSource, device: torch.device) -> torch.nn.Module:
    """The base model whole (a BASE+ADAPTER base with its adapter folded in): in float32 on the
    CPU (16-bit matmuls there are slow and coarse), in its own 16-bit dtype on a GPU (half the
    memory); the means are taken in float32 either way."""
    dtype = torch.float32
    own = base.info(EMBED).dtype if base.has(EMBED) else torch.float32
    if device.type == "cuda" and own in (torch.float16, torch.bfloat16):
        dtype = own
    from transformers.utils import logging as hf_logging

    from mergecore.models import load_model

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the gates have their own bar (and --quiet means none)
    try:
        model = load_model(base.path, device=str(device), dtype=dtype)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    if isinstance(base, AdapterSource):
        with torch.no_grad():
            for name in sorted(base.adapted):
                model.get_parameter(name).copy_(base.read(name))
    return model


class _Encoder:
    """A prompt -> [layers, hidden] float32 (see the module doc for each mode)."""

    def __init__(self, mode: str, base: ModelSource, layers: int, device: torch.device):
        self.mode, self.layers, self.device = mode, layers, device
        self.tokenizer = _tokenizer(base)
        self.captured: list[Optional[torch.Tensor]] = [None] * layers
        if mode == "cheap_embed":
            if not base.has(EMBED):
                raise MergeError(f"base model '{clip(base.ref, 120)}' has no {EMBED} for cheap_embed gates")
            self.embed = base.read(EMBED).float()
            return
        self.model = _load_base(base, device)
        blocks = getattr(getattr(self.model, "model", None), "layers", None)
        if blocks is None or len(blocks) != layers:
            raise MergeError(f"base model '{clip(base.ref, 120)}' loaded without its {layers} decoder layers")
        for i, block in enumerate(blocks):
            block.mlp.register_forward_pre_hook(self._hook(i))

    def _hook(self, i: int):
        def record(module: torch.nn.Module, args: tuple) -> None:
            self.captured[i] = args[0].detach()
        return record

    def __call__(self, prompt: str, where: str) -> torch.Tensor:
        enc = self.tokenizer(prompt, return_tensors="pt", return_special_tokens_mask=True)
        ids = enc["input_ids"]
        keep = enc["special_tokens_mask"][0] == 0
        if not bool(keep.any()):
            raise MergeError(f"{where}: the prompt {clip(prompt, 60)!r} has no tokens besides special ones")
        if self.mode == "cheap_embed":
            if int(ids.max()) >= self.embed.shape[0]:
                raise MergeError(f"{where}: the tokenizer gives token id {int(ids.max())}, beyond the base's "
                                 f"{self.embed.shape[0]} embedding rows")
            return self.embed[ids[0][keep]].mean(0).expand(self.layers, -1)
        with torch.inference_mode():
            self.model.model(input_ids=ids.to(self.device), attention_mask=enc["attention_mask"].to(self.device))
        rows = []
        last = int(keep.nonzero()[-1])
        for h in self.captured:
            states = h[0].float().cpu()
            rows.append(states[last] if self.mode == "hidden_last" else states[keep].mean(0))
        return torch.stack(rows)


def _mean(encode: _Encoder, prompts: list[str], where: str, step: Callable[[str], None]) -> torch.Tensor:
    total = None
    for p in prompts:
        v = encode(p, where)
        total = v.clone() if total is None else total + v
        step(where)
    assert total is not None
    return total / len(prompts)


def prompt_gates(config: MoEConfig, base: ModelSource, layers: int, *, device: torch.device,
                 cancel: Optional[CancelToken] = None, progress: Optional[GateProgress] = None
                 ) -> tuple[torch.Tensor, list[str]]:
    """[layers, routed + shared experts, hidden] float32 unit rows from the prompts, and warnings."""
    experts = config.all_experts
    total = sum(len(e.positive_prompts or []) + len(e.negative_prompts or []) for e in experts)
    done, start = 0, time.monotonic()

    def step(where: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, time.monotonic() - start, where)
        if cancel is not None:
            cancel.check()

    encode = _Encoder(config.gate_mode, base, layers, device)
    rows, warnings = [], []
    for i, e in enumerate(experts):
        where = _label(config, i)
        vec = _mean(encode, e.positive_prompts or [], where, step)
        if e.negative_prompts:
            vec = vec - _mean(encode, e.negative_prompts, where, step)
        norm = vec.norm(dim=-1, keepdim=True)
        flat = int((norm.squeeze(-1) <= 1e-6 * max(float(norm.max()), 1e-30)).sum())
        if flat:
            warnings.append(f"{where}: its positive and negative prompts give the same mean in {flat} layer(s); "
                            f"its gate is zero there")
        rows.append(vec / norm.clamp(min=1e-8))
    del encode
    gates = torch.stack(rows, dim=1)
    return gates, warnings + similar_gates(gates[:, : len(config.experts)], config)


def _label(config: MoEConfig, i: int) -> str:
    n = len(config.experts)
    e: Expert = config.all_experts[i]
    group = f"experts.{i}" if i < n else f"shared_experts.{i - n}"
    return f"{group} ({clip(e.source_model, 80)})"


def similar_gates(gates: torch.Tensor, config: MoEConfig, threshold: float = 0.99) -> list[str]:
    """A warning for each pair of routed experts whose gate rows are nearly parallel in some
    layers (mergekit warns of such degenerate gates too): routing will hardly tell them apart."""
    out = []
    unit = gates / gates.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    cos = unit @ unit.transpose(1, 2)  # [layers, experts, experts]
    n = gates.shape[1]
    for a in range(n):
        for b in range(a + 1, n):
            layers = int((cos[:, a, b] > threshold).sum())
            if layers:
                out.append(f"the gates of experts {a} and {b} point the same way (cosine > {threshold}) in {layers} "
                           f"of {gates.shape[0]} layers; their prompts may be too similar to route between them")
    return out


def random_gates(config: MoEConfig, layers: int, hidden: int) -> torch.Tensor:
    """Seeded `random` (N(0, 1)) or `uniform_random` (U(±1/√hidden)) rows, [layers, experts, hidden]."""
    g = torch.Generator().manual_seed(config.seed)
    shape = (layers, len(config.all_experts), hidden)
    if config.gate_mode == "random":
        return torch.randn(shape, generator=g)
    bound = 1 / math.sqrt(hidden)
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def gate_vectors(config: MoEConfig, base: ModelSource, layers: int, hidden: int, *, device: torch.device,
                 cancel: Optional[CancelToken] = None, progress: Optional[GateProgress] = None
                 ) -> tuple[torch.Tensor, list[str]]:
    """The router rows for `config.gate_mode`, [layers, routed + shared experts, hidden] float32."""
    if config.gate_mode in ("random", "uniform_random"):
        return random_gates(config, layers, hidden), []
    if config.gate_mode not in (*HIDDEN_MODES, "cheap_embed"):  # the config refuses it first
        raise MergeError(f"unknown gate_mode '{clip(config.gate_mode, 40)}'")
    return prompt_gates(config, base, layers, device=device, cancel=cancel, progress=progress)
