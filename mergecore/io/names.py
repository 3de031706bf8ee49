"""Map a loaded transformers model's parameter names to the tensor names in its checkpoint.

transformers 5 renames some architectures' weights on load (e.g. ViT's
`vit.encoder.layer.0.attention.attention.query.weight` is `vit.layers.0.attention.q_proj.weight`
in memory) and back on save. Code that works on loaded modules but must agree with the engine,
which works on checkpoint names (seeds of randomised methods, coefficient files), maps names
with this: one place for RMM's bank, DAM's coefficient files and in-memory merges
(`checkpoint_tensors`).

transformers' own save-time reversal names each tensor exactly (matched by storage, no reading).
Only tensors it cannot name one-to-one (fused or split conversions, no transformers) are matched
by value, within the same layer and shape; tied weights take their twin's name.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mergecore.arch import layer_of
from mergecore.errors import MergeError
from mergecore.io.source import ModelSource


def _reverted(model: nn.Module, state: dict[str, torch.Tensor]) -> Optional[list[tuple[str, list[str]]]]:
    """Per tensor that transformers' save-time reversal names: (checkpoint name, the `state` keys
    sharing its storage). None without transformers or for a plain module (nothing renamed)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - older transformers: no renaming on load
        return None
    by_storage: dict[tuple, list[str]] = {}
    for key, value in state.items():
        by_storage.setdefault((value.data_ptr(), tuple(value.shape)), []).append(key)
    try:
        reverted = revert_weight_conversion(model, dict(state))
    except Exception:  # noqa: BLE001 - not a transformers model: nothing is renamed
        return None
    return [(ck, by_storage.get((value.data_ptr(), tuple(value.shape)), []))
            for ck, value in reverted.items() if isinstance(value, torch.Tensor)]


def reverted_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{state_dict key: checkpoint name} from transformers' save-time reversal, for the tensors it
    renames one-to-one; {} without transformers or for a plain module."""
    out: dict[str, str] = {}
    for ck, keys in _reverted(model, state) or []:
        if ck in keys:  # tied tensors share storage: a key that is its own name wins
            out[ck] = ck
        elif len(keys) == 1:
            out[keys[0]] = ck
    return out


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers under their *checkpoint* names (no copies).

    Only one-to-one renames map to a tensor of the model; fused or split weights are left out
    (such tensors need a merge to a folder). Without a conversion (a plain module, or no
    transformers) the module names are the names. Computed once per model and kept on it.
    """
    cached = model.__dict__.get("_mergecore_checkpoint_tensors")
    if cached is not None:
        return cached
    own = model.state_dict(keep_vars=True)
    pairs = _reverted(model, {k: v.detach() for k, v in own.items()})
    names = {k: k for k in own} if pairs is None else {ck: keys[-1] for ck, keys in pairs if keys}
    out = {ck: own[mk].data if isinstance(own[mk], nn.Parameter) else own[mk] for ck, mk in names.items()}
    model.__dict__["_mergecore_checkpoint_tensors"] = out
    return out


def checkpoint_names(model: nn.Module, source: ModelSource) -> dict[str, str]:
    """{in-memory state_dict key: checkpoint tensor name} for every tensor of `model`."""
    state = model.state_dict()
    out: dict[str, str] = {}
    for key, ck in reverted_names(model, state).items():
        if ck in source.tensors and source.info(ck).shape == tuple(state[key].shape):
            out[key] = ck
    by_group: dict[tuple, list[str]] = {}
    for name, info in source.tensors.items():
        ref = layer_of(name)
        by_group.setdefault((ref.index if ref else None, info.shape), []).append(name)
    cache: dict[str, torch.Tensor] = {}

    def read(name: str) -> torch.Tensor:
        if name not in cache:
            cache[name] = source.read(name)
        return cache[name]

    tied: list[tuple[str, torch.Tensor]] = []
    for key, value in state.items():
        if key in out:
            continue
        if key in source.tensors and source.info(key).shape == tuple(value.shape):
            out[key] = key
            continue
        ref = layer_of(key)
        candidates = by_group.get((ref.index if ref else None, tuple(value.shape)), [])
        match = [c for c in candidates if c not in out.values() and torch.equal(read(c).to(value.dtype), value.cpu())]
        if len(match) >= 1:
            out[key] = match[0]
        elif value.numel() and value.is_floating_point():
            tied.append((key, value))
    # tied weights (e.g. lm_head.weight = embed_tokens.weight) are saved once: share the name of
    # the tensor they share storage with
    for key, value in tied:
        twin = next((k for k, v in state.items() if k in out and v.data_ptr() == value.data_ptr()
                     and v.shape == value.shape), None)
        if twin is None:
            raise MergeError(f"cannot find the checkpoint tensor of '{key}' in {source.path}")
        out[key] = out[twin]
    return out
