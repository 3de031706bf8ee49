"""Which tensors get coefficients, the frozen source weights, and the merged parameters.

One model stays resident (the base, loaded once). The merged tensors are rebuilt from the
frozen source tensors and the coefficients on every step with `mergecore.methods.dam.combine`
(the same function the `dam` merge method runs at replay), and the model is run with
`torch.func.functional_call`: no module is copied and no custom layer is needed.

Which tensors are merged (a *slot* each):

* every `nn.Linear` (and GPT-2's `Conv1D`, whose input dimension is dim 0): the weight gets one
  coefficient per input column and model (`granularity: column`) or one per model
  (`granularity: layer`); the bias one scalar per model. This includes a causal LM's
  `lm_head` (as in the DAM paper; `lm_head: false` leaves it the base's) unless it is *tied* to
  the input embeddings: a tied head is the embedding matrix, so it follows the embeddings
  (the base's, or merged with `merge_embeddings`), never a coefficient set of its own;
* with `merge_embeddings`: `nn.Embedding` and patch-embedding convolutions (`nn.Conv1d/2d/3d`;
  one coefficient per input channel); with `merge_norms`: LayerNorm / RMSNorm style modules
  (one coefficient per element of the weight, one scalar for the bias);
* never: classifier heads that the tasks swap in per task (`head_from`), tensors matching an
  `exclude` pattern, and raw parameters outside those modules (ViT position embeddings and
  [CLS] token, ...). All of these are the base model's in the merged model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from mergecore.arch import is_norm
from mergecore.errors import MergeError
from mergecore.io.source import ModelSource
from mergecore.methods.dam import combine, inverse_activate


@dataclass(frozen=True)
class Slot:
    """One merged tensor: its module parameter name, its checkpoint tensor name (transformers 5
    renames some architectures' weights on load), and its coefficient shape."""

    name: str
    kind: str  # linear | conv1d | embedding | conv | norm
    shape: tuple[int, ...]
    coef_shape: tuple[int, ...]  # per row, broadcastable against `shape`
    is_bias: bool
    ckpt: str = ""  # checkpoint tensor name ("" until `assign_checkpoint_names`)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.coef_shape:
            n *= s
        return n


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except Exception:  # pragma: no cover - transformers always has it
        return None


def find_slots(model: nn.Module, *, granularity: str = "column", merge_embeddings: bool = False,
               merge_norms: bool = False, lm_head: bool = True, exclude: Iterable[str] = ()) -> list[Slot]:
    """The tensors of `model` that get coefficients, in module order."""
    if granularity not in ("column", "layer"):
        raise MergeError(f"granularity must be 'column' or 'layer', got '{granularity}'")
    excl = [re.compile(p) if any(c in p for c in "^$*+?[]()|\\") else re.compile(re.escape(p)) for p in exclude]
    canonical = {id(p): n for n, p in model.named_parameters()}  # first name of each (possibly tied) tensor
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    conv1d = _conv1d_class()
    slots: list[Slot] = []
    for mname, module in model.named_modules():
        own = [(pn, p) for pn, p in module._parameters.items() if p is not None]
        if not own:
            continue
        if isinstance(module, nn.Linear):
            kind = "linear"
            if module is out_emb or mname.split(".")[-1] == "lm_head":
                if not lm_head:
                    continue
        elif conv1d is not None and isinstance(module, conv1d):
            kind = "conv1d"
        elif isinstance(module, nn.Embedding):
            if not merge_embeddings:
                continue
            kind = "embedding"
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if not merge_embeddings:
                continue
            kind = "conv"
        elif is_norm(mname, module):
            if not merge_norms:
                continue
            kind = "norm"
        else:
            continue
        for pn, p in own:
            name = f"{mname}.{pn}" if mname else pn
            if kind in ("linear", "conv1d") and uses.get(id(p), 1) > 1:
                continue  # a tied head is the embedding matrix: it follows the embeddings
            if canonical.get(id(p)) != name:  # the same tensor under another name
                continue
            if not p.is_floating_point() or any(r.search(name) for r in excl):
                continue
            shape = tuple(p.shape)
            is_bias = pn == "bias"
            if is_bias or granularity == "layer" or p.ndim < 1:
                coef = (1,) * max(1, p.ndim)
            elif kind in ("linear", "embedding"):
                coef = (1,) * (p.ndim - 1) + (shape[-1],)
            elif kind == "conv1d":
                coef = (shape[0],) + (1,) * (p.ndim - 1)
            elif kind == "conv":
                coef = (1, shape[1]) + (1,) * (p.ndim - 2)
            else:  # norm weight: one per element
                coef = shape
            slots.append(Slot(name, kind, shape, coef, is_bias))
    if not slots:
        raise MergeError(f"{type(model).__name__}: no tensor gets DAM coefficients (no nn.Linear outside the "
                         f"excluded names); check 'exclude'")
    return slots


def assign_checkpoint_names(slots: list[Slot], model: nn.Module, source: ModelSource) -> list[Slot]:
    """The slots with their checkpoint names (`mergecore.io.names`), checked against the checkpoint."""
    from dataclasses import replace

    from mergecore.io.names import checkpoint_names

    mapping = checkpoint_names(model, source)
    have = set(source.tensors)
    out = []
    for s in slots:
        ck = mapping.get(s.name)
        if ck is None or ck not in have:
            raise MergeError(f"{type(model).__name__}: parameter '{s.name}' has no one-to-one tensor in the checkpoint "
                             f"(fused or renamed weights); leave it to the base with `exclude: ['{s.name}']`")
        out.append(replace(s, ckpt=ck))
    return out


class Merger:
    """Frozen source tensors + trainable coefficients -> merged tensors (one dict per step).

    `sources[name]` lists the merge inputs' tensors (the models in order); `base[name]` is the
    base model's tensor when the form or `include_base` needs it.
    """

    def __init__(self, slots: list[Slot], *, n_models: int, transform: str = "none", form: str = "sum",
                 include_base: bool = False, init: Optional[float] = None):
        self.slots = slots
        self.by_name = {s.name: s for s in slots}
        self.transform = transform
        self.form = form
        self.include_base = include_base
        self.n_rows = n_models + (1 if include_base else 0)
        if form == "task_vectors" and include_base:
            raise MergeError("form 'task_vectors' adds task vectors to the base; it cannot also merge the base "
                             "(set include_base: false)")
        if init is None:
            init = 0.3 if form == "task_vectors" else 1.0 / self.n_rows
        self.init = float(init)
        raw = inverse_activate(self.init, transform)
        self.coefs: dict[str, nn.Parameter] = {
            s.name: nn.Parameter(torch.full((self.n_rows, *s.coef_shape), raw, dtype=torch.float32)) for s in slots}
        self.sources: dict[str, list[torch.Tensor]] = {s.name: [] for s in slots}
        self.base: dict[str, torch.Tensor] = {}

    @property
    def needs_base(self) -> bool:
        return self.include_base or self.form == "task_vectors"

    def parameters(self) -> list[nn.Parameter]:
        return [self.coefs[s.name] for s in self.slots]

    def num_coefficients(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def add_source(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Append one model's slot tensors (float32, frozen)."""
        for s in self.slots:
            t = tensors.get(s.name)
            if t is None:
                raise MergeError(f"{where} has no tensor '{s.name}'")
            if tuple(t.shape) != s.shape:
                raise MergeError(f"'{s.name}' has shape {list(t.shape)} in {where} but {list(s.shape)} in the base")
            self.sources[s.name].append(t.detach().to(torch.float32))

    def set_base(self, tensors: dict[str, torch.Tensor]) -> None:
        self.base = {s.name: tensors[s.name].detach().to(torch.float32).clone() for s in self.slots}

    def merged(self, names: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
        """name -> merged tensor (differentiable in the coefficients when grad is enabled)."""
        out = {}
        for name in (names if names is not None else self.by_name):
            out[name] = combine(self.coefs[name], self.sources[name], self.base.get(name), transform=self.transform,
                                form=self.form, include_base=self.include_base)
        return out

    def effective(self, name: str) -> torch.Tensor:
        from mergecore.methods.dam import activate

        return activate(self.coefs[name], self.transform)

    def raw_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.coefs.items()}

    def uniform_state(self, values: list[float]) -> dict[str, torch.Tensor]:
        """Raw coefficients that give every merged tensor the effective row values `values`: the
        uniform merge (weight averaging, task arithmetic) a start or a baseline is."""
        if len(values) != self.n_rows:
            raise MergeError(f"{len(values)} uniform coefficients for {self.n_rows} rows")
        raw = torch.tensor([inverse_activate(v, self.transform) for v in values], dtype=torch.float32)
        return {s.name: raw.view(-1, *([1] * len(s.coef_shape))).expand(self.n_rows, *s.coef_shape).clone()
                for s in self.slots}

    def load_raw_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.coefs) - set(state)
        if missing:
            raise MergeError(f"the checkpoint has no coefficients for {sorted(missing)[:3]}; it belongs to another "
                             f"configuration (use --restart)")
        with torch.no_grad():
            for k, p in self.coefs.items():
                if tuple(state[k].shape) != tuple(p.shape):
                    raise MergeError(f"checkpoint coefficients for '{k}' have shape {list(state[k].shape)}, expected "
                                     f"{list(p.shape)}; it belongs to another configuration (use --restart)")
                p.copy_(state[k])

    @torch.no_grad()
    def write_into(self, model: nn.Module) -> None:
        """Copy the current merged tensors into the resident model's parameters (for evaluation)."""
        params = dict(model.named_parameters())
        for name, t in self.merged().items():
            params[name].copy_(t)
