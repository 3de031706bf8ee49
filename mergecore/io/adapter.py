"""`BASE+ADAPTER` model references: a PEFT LoRA adapter folded into its base tensor by tensor.

mergekit's syntax: `model: org/base+org/adapter` (either side a local folder or a Hub id) names
the base with the adapter applied. `AdapterSource` is the base's `ModelSource` (its config, tensor
names, shapes and dtypes, its side files) whose `read(name)` returns, for each adapted weight,

    W + scale·B·A          (transposed for fan_in_fan_out and embeddings; DoRA rescales the rows)

computed when the merge reads that tensor, and the adapter's own tensor for what PEFT saved whole
(`modules_to_save`, trained biases). So a merge streams as with any model: no folded copy is
written and the model is never loaded whole. The result is what PEFT's `merge_and_unload` gives
(in float32 with the same operations; a 16-bit base is rounded once, from float32).

The adapter is read from adapter_model.safetensors with the same validated header as a model
(never a pickle), and checked against the base before a weight is read: every adapted module
must be a base tensor of the shape the adapter implies, or the reference is refused in one line.

A base whose config ties the output head to the input embedding (`tie_word_embeddings`: Qwen2,
GPT-2) saves no head, but an adapter that changed the embedding saves `lm_head` too (peft's
`ensure_weight_tying` and extract-lora write it whole, or as a LoRA tied to the embedding's). That
head is the embedding's twin: with `ensure_weight_tying` peft loads the two into one shared weight,
the head last, so the embedding reads as the saved head (a twin LoRA, the embedding's transposed,
is applied once: what the PeftModel computes; peft 0.21's merge_and_unload adds it twice).
Without it, peft unties them, which a tied checkpoint cannot hold: accepted only when the saved
head equals the embedding it would be tied to, else refused in one line.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

from mergecore.errors import MergeError, short
from mergecore.io.lora_config import (LoraSettings, join_adapter_ref, read_lora_config, split_adapter_ref,
                                      weights_file)
from mergecore.io.source import ModelSource, TensorInfo, _safetensors_infos, resolve_model_path

PREFIX = "base_model.model."  # PEFT's PeftModel -> LoraModel -> the transformers model
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                       r"lora_magnitude_vector)(?:\.(?P<param>weight|bias))?$")
_WRAPPERS = re.compile(r"\.modules_to_save(?:\.[^.]+)?(?=\.[^.]+$)|\.base_layer(?=\.)")
_LINEAR_PARTS = {"lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector",
                 "lora_magnitude_vector.weight"}
_EMBEDDING_PARTS = {"lora_embedding_A", "lora_embedding_B"}
TIED_HEADS = ("lm_head",)  # output heads transformers ties to the input embedding
TIED_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared")


def _leaf_module(name: str) -> str:
    """The last module name of a tensor or module path (`model.lm_head.weight` -> `lm_head`)."""
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 and parts[-1] in ("weight", "bias") else parts[-1]


@dataclass(frozen=True)
class Patch:
    """How one base tensor changes: W + scale·(B A) (its transpose when `transpose`), rescaled
    row-wise to `magnitude` for DoRA; for a bias (`a` None), b + scale·lora_B.bias."""

    b: TensorInfo
    a: Optional[TensorInfo]
    scale: float
    transpose: bool = False
    magnitude: Optional[TensorInfo] = None


class AdapterSource(ModelSource):
    """The base model of a `BASE+ADAPTER` reference with its LoRA adapter applied as tensors are
    read (see the module doc); side files (config, tokenizer) are the base's."""

    def __init__(self, ref: str, base_ref: str, adapter_ref: str, base_path: Path, adapter_path: Path):
        super().__init__(ref, path=base_path)
        self.base_ref, self.adapter_ref, self.adapter_path = base_ref, adapter_ref, adapter_path
        self.settings: LoraSettings = read_lora_config(adapter_path, ref)
        self.adapter_file = weights_file(adapter_path, ref)
        self._adapter = _safetensors_infos(self.adapter_file)
        self.replaced: dict[str, TensorInfo] = {}  # base tensor -> the adapter's tensor that replaces it
        self.patches: dict[str, Patch] = {}  # base tensor -> its LoRA change
        self._map_adapter()

    # -- opening -----------------------------------------------------------------------------

    def _map_adapter(self) -> None:
        """Sort the adapter's tensors into LoRA pairs per module and whole replacement tensors,
        each tied to the base tensor it changes (checked: present, same shape)."""
        modules: dict[str, dict[str, TensorInfo]] = {}
        head_whole: list[TensorInfo] = []  # a tied head saved whole (the embedding's twin)
        for key, info in self._adapter.items():
            if not key.startswith(PREFIX):
                raise MergeError(f"{self._where}: tensor {short(key)} in {self.adapter_file.name} is not a PEFT "
                                 f"adapter tensor (names start with '{PREFIX}')")
            rest = key[len(PREFIX):]
            m = _LORA_KEY.match(rest)
            if m:
                part = m["part"] + (f".{m['param']}" if m["param"] else "")
                modules.setdefault(m["module"], {})[part] = info
                continue
            if "lora_" in rest or "trainable_tokens" in rest:
                raise MergeError(f"{self._where}: adapter tensor {short(key)} is not one mergecore knows how to apply")
            stripped = _WRAPPERS.sub("", rest)
            if self._is_tied_head(stripped):
                head_whole.append(info)
                continue
            name = self._locate(stripped, "a tensor it saves whole")
            self._check_shape(name, info.shape, key)
            if name in self.replaced:
                raise MergeError(f"{self._where}: the adapter saves base tensor '{name}' twice")
            self.replaced[name] = info
        head_lora = {m: modules.pop(m) for m in list(modules) if self._is_tied_head(m)}
        for module, parts in modules.items():
            self._add_module(module, parts)
        self._tie_head(head_whole, head_lora)
        if not self.patches and not self.replaced:
            raise MergeError(f"{self._where}: {self.adapter_file.name} holds no adapter weights")

    @property
    def _where(self) -> str:
        return f"model '{self.ref}'"

    # -- a head tied to the embedding ---------------------------------------------------------

    @functools.cached_property
    def tied_embedding(self) -> Optional[str]:
        """The base's input embedding weight when its config ties the output head to it and the
        base saves no head of its own (else None)."""
        if not self.config.get("tie_word_embeddings", True) or any(
                _leaf_module(t) in TIED_HEADS for t in self.tensors):
            return None
        hits = [t for t in self.tensors if t.endswith(".weight") and _leaf_module(t) in TIED_EMBEDDINGS
                and len(self.tensors[t].shape) == 2]
        return hits[0] if len(hits) == 1 else None

    def _is_tied_head(self, name: str) -> bool:
        """Whether `name` (a module or a tensor) is an output head the base ties to its embedding."""
        return _leaf_module(name) in TIED_HEADS and self.tied_embedding is not None

    def unpatched(self, name: str) -> torch.Tensor:
        """Base tensor `name` as the adapter saves it whole (or the base's), before any LoRA."""
        saved = self.replaced.get(name)
        return self._read_info(saved.name, saved) if saved is not None else super().read(name)

    def _tie_head(self, whole: list[TensorInfo], lora: dict[str, dict[str, TensorInfo]]) -> None:
        """Fold the saved head of a tied base into its embedding as peft does (see the module doc)."""
        if not whole and not lora:
            return
        emb = str(self.tied_embedding)
        tying = self.settings.ensure_weight_tying
        for info in whole:
            self._check_shape(emb, info.shape, info.name)
            if tying:  # one shared weight, the head loaded last: the embedding reads as the saved head
                self.replaced[emb] = info
            elif not torch.equal(self._read_info(info.name, info).float(), self.unpatched(emb).float()):
                raise MergeError(f"{self._where}: the adapter saves '{_leaf_module(info.name)}' whole, unlike '{emb}' "
                                 f"the base ties it to (tie_word_embeddings), and has no ensure_weight_tying, so "
                                 f"peft unties them, which a checkpoint with tied embeddings cannot hold; fold it "
                                 f"with peft's merge_and_unload and save it with tie_word_embeddings false")
        for module, parts in lora.items():
            patch = self.patches.get(emb)
            a, b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
            twin = (tying and patch is not None and patch.transpose and patch.magnitude is None
                    and a is not None and b is not None and set(parts) == {"lora_A.weight", "lora_B.weight"}
                    and self.settings.scale(*self.settings.rank_alpha(module)) == patch.scale
                    and tuple(a.shape) == tuple(reversed(patch.b.shape))
                    and tuple(b.shape) == tuple(reversed(patch.a.shape))
                    and torch.equal(self._read_info(a.name, a), self._read_info(patch.b.name, patch.b).T)
                    and torch.equal(self._read_info(b.name, b), self._read_info(patch.a.name, patch.a).T))
            if not twin:
                raise MergeError(f"{self._where}: the adapter trains a LoRA on '{module}', which the base ties to "
                                 f"'{emb}' (tie_word_embeddings), other than the embedding's own LoRA "
                                 f"(ensure_weight_tying), so peft unties them, which a checkpoint with tied "
                                 f"embeddings cannot hold; fold it with peft's merge_and_unload instead")

    def _locate(self, name: str, what: str) -> str:
        """The base tensor `name` (an adapter of the same model with or without its task head
        names modules with or without the outer prefix: the one base name ending alike)."""
        if name in self.tensors:
            return name
        hits = [t for t in self.tensors if t.endswith("." + name) or name.endswith("." + t)]
        if len(hits) == 1:
            return hits[0]
        raise MergeError(f"{self._where}: the adapter does not fit the base: {what}, '{name}', is not a tensor of "
                         f"'{self.base_ref}' -- an adapter for another model?")

    def _check_shape(self, name: str, shape: tuple[int, ...], what: str) -> None:
        base = self.tensors[name]
        if tuple(shape) != base.shape:
            raise MergeError(f"{self._where}: the adapter does not fit the base: {short(what)} gives '{name}' shape "
                             f"{list(shape)}, but it is {list(base.shape)} in '{self.base_ref}' -- an adapter for "
                             f"another model?")

    def _add_module(self, module: str, parts: dict[str, TensorInfo]) -> None:
        """One adapted module: its weight's Patch (and its bias's, with lora_bias)."""
        embedding = bool(_EMBEDDING_PARTS & set(parts))
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        unknown = set(parts) - (_EMBEDDING_PARTS | {"lora_magnitude_vector"} if embedding else _LINEAR_PARTS)
        a, b = parts.get(a_key), parts.get(b_key)
        if unknown or a is None or b is None:
            what = (f"has {', '.join(sorted(unknown))}" if unknown
                    else f"has {b_key if a is None else a_key} without {a_key if a is None else b_key}")
            raise MergeError(f"{self._where}: adapter module '{module}' {what}; the adapter file is incomplete or "
                             f"not plain LoRA")
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise MergeError(f"{self._where}: adapter module '{module}' is a LoRA on a convolution "
                             f"({len(a.shape)}-D lora_A); only linear and embedding layers are applied")
        weight = self._locate(f"{module}.weight", "a module it adapts")
        r, alpha = self.settings.rank_alpha(module)
        if a.shape[0] != r or b.shape[1] != r:
            raise MergeError(f"{self._where}: adapter module '{module}' has rank {a.shape[0]} x {b.shape[1]} in its "
                             f"weights but r = {r} in its adapter_config.json")
        transpose = embedding or self.settings.fan_in_fan_out
        out_shape = (b.shape[0], a.shape[1])
        self._check_shape(weight, out_shape[::-1] if transpose else out_shape, f"the LoRA of '{module}'")
        dtype = self.tensors[weight].dtype
        if not dtype.is_floating_point:
            raise MergeError(f"{self._where}: base tensor '{weight}' is {str(dtype).removeprefix('torch.')}, not "
                             f"floating point (a quantized base?); a LoRA is applied to a float base only")
        magnitude = parts.get("lora_magnitude_vector", parts.get("lora_magnitude_vector.weight"))
        if magnitude is not None and embedding:
            raise MergeError(f"{self._where}: adapter module '{module}' is a DoRA embedding; DoRA is applied to "
                             f"linear layers only")
        if (magnitude is not None) != self.settings.dora:
            raise MergeError(f"{self._where}: adapter module '{module}' "
                             + ("has a DoRA magnitude but use_dora is false" if magnitude is not None
                                else "has no DoRA magnitude (lora_magnitude_vector) although use_dora is true"))
        if magnitude is not None and tuple(magnitude.shape) != (b.shape[0],):
            raise MergeError(f"{self._where}: adapter module '{module}': its DoRA magnitude has shape "
                             f"{list(magnitude.shape)}, expected [{b.shape[0]}]")
        scale = self.settings.scale(r, alpha)
        self.patches[weight] = Patch(b, a, scale, transpose, magnitude)
        bias = parts.get("lora_B.bias")
        if bias is not None:
            name = f"{weight.removesuffix('.weight')}.bias"
            if name not in self.tensors:
                raise MergeError(f"{self._where}: adapter module '{module}' trains a LoRA bias (lora_bias), but "
                                 f"'{self.base_ref}' has no '{name}' to add it to")
            self._check_shape(name, bias.shape, f"the LoRA bias of '{module}'")
            self.patches[name] = Patch(bias, None, scale)

    # -- reading -----------------------------------------------------------------------------

    @property
    def folders(self) -> tuple[Path, ...]:
        return (self.path, self.adapter_path)

    @property
    def adapted(self) -> set[str]:
        """The base tensors the adapter changes (the others read as the base's)."""
        return set(self.patches) | set(self.replaced)

    def lora(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B, A, scale) of base tensor `name`'s LoRA as saved: its change is scale·B·A, transposed
        into the weight when `patches[name].transpose` (embeddings, fan_in_fan_out)."""
        p = self.patches[name]
        if p.a is None:
            raise MergeError(f"internal: '{name}' has a LoRA bias, not factors")
        return self._read_info(p.b.name, p.b), self._read_info(p.a.name, p.a), p.scale

    def read(self, name: str) -> torch.Tensor:
        """The tensor as PEFT's merge_and_unload leaves it, in the base's dtype."""
        info = self.info(name)
        saved = self.replaced.get(name)
        w = self._read_info(name, saved).to(info.dtype) if saved is not None else super().read(name)
        patch = self.patches.get(name)
        return w if patch is None else self._apply(w, patch)

    def _apply(self, w: torch.Tensor, p: Patch) -> torch.Tensor:
        """PEFT's merge, op for op: delta = transpose(B @ A) * scale, W + delta (DoRA: times
        magnitude / the row norms of W + delta), in float32 (float64 for a float64 base)."""
        ct = torch.float64 if w.dtype == torch.float64 else torch.float32
        b = self._read_info(p.b.name, p.b).to(ct)
        if p.a is None:
            return (w.to(ct) + b * p.scale).to(w.dtype)
        product = b @ self._read_info(p.a.name, p.a).to(ct)
        delta = (product.T if p.transpose else product).mul_(p.scale)  # in place: one full-size temporary
        base = w.to(ct)  # `w` is this read's own memory, so a float32 one is updated in place
        if p.magnitude is None:
            return base.add_(delta).to(w.dtype)
        rows = (base.T + delta.T) if p.transpose else (base + delta)
        factor = (self._read_info(p.magnitude.name, p.magnitude).to(ct) / torch.linalg.norm(rows, dim=1)).view(-1, 1)
        return ((factor.T if p.transpose else factor) * (base + delta)).to(w.dtype)

    def __repr__(self) -> str:
        return f"AdapterSource({self.ref!r}, {len(self.patches)} adapted, {len(self.replaced)} replaced)"


def open_source(ref: str, search_dirs: tuple[Path, ...] = ()) -> ModelSource:
    """A recipe's model reference opened lazily: a `BASE+ADAPTER` one as an `AdapterSource`
    (each side resolved like a model: a folder, or a Hub snapshot), anything else a `ModelSource`."""
    sides = split_adapter_ref(ref, search_dirs)
    if sides is None:
        return ModelSource(ref, search_dirs=search_dirs)
    paths = []
    for side, what in zip(sides, ("base", "adapter")):
        try:
            paths.append(resolve_model_path(side, search_dirs))
        except MergeError as err:
            raise MergeError(f"the {what} of '{ref}': {err}") from None
    return AdapterSource(ref, *sides, *paths)


def open_adapter(base: str | Path, adapter: str | Path, search_dirs: tuple[Path, ...] = ()) -> AdapterSource:
    """`base` with the LoRA `adapter` applied (each a folder or a Hub id, resolved like a model),
    checked against each other before a weight is read: one MergeError line for an adapter folder
    without adapter_config.json, another adapter type, an adapter for another base."""
    ref = join_adapter_ref(str(base), str(adapter))
    src = open_source(ref, search_dirs)
    if not isinstance(src, AdapterSource):  # the joined name is itself an existing folder
        raise MergeError(f"'{ref}' is a folder of its own, so it cannot name a base and an adapter")
    return src


def source_folders(sources: Mapping[str, ModelSource]) -> dict[str, Path]:
    """Where each reference was found, plus each side of a `BASE+ADAPTER` one under its own
    reference (the model card and an export name the sides separately)."""
    out: dict[str, Path] = {ref: s.path for ref, s in sources.items()}
    for s in sources.values():
        if isinstance(s, AdapterSource):
            out.setdefault(s.base_ref, s.path)
            out.setdefault(s.adapter_ref, s.adapter_path)
    return out
