"""RegMean++ statistics: Gram matrices of layer l's inputs taken through the merged layers < l.

Nguyen et al. 2025 (arXiv:2508.03121; fusion_bench/method/regmean_plusplus/regmean_plusplus.py):
the merged model starts as the average of the models outside the layer stack (embeddings, final
norm, heads), then layer by layer: model i's data runs through the merged layers < l and model
i's own layer l, hooks add up the inputs of layer l's linear maps, and layer l is merged at once
with the closed-form RegMean solve (`mergecore.methods.regmean.regmean_solve`, the same α the
recipe will use) and its other tensors averaged — exactly what the method then computes.

The forward pass stops after layer l (a hook raises), so every architecture works without
knowing its layers' call signature; the price is l + 1 layer passes for layer l (about L²/2 for
the whole model, against the reference's cached layer inputs).
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch
from torch import nn

from mergecore.arch import layer_of, main_stack
from mergecore.errors import MergeError
from mergecore.eval.kind import call_with_head
from mergecore.eval.training import TaskData
from mergecore.events import CancelToken
from mergecore.methods.regmean import DEFAULT_RATIO, regmean_solve
from mergecore.stats.hooks import GramHooks, StatsProgress, linear_modules, to_device
from mergecore.stats.store import tensor_key


class _Stop(Exception):
    """Raised after the layer whose inputs were wanted: the rest of the forward pass is not needed."""


def _stop_after(module: nn.Module) -> Any:
    def hook(*_: Any) -> None:
        raise _Stop()

    return module.register_forward_hook(hook)


def _layer(name: str, stack: str) -> Optional[int]:
    ref = layer_of(name)
    return ref.index if ref is not None and ref.stack == stack else None


@torch.no_grad()
def collect_plusplus(models: Sequence[nn.Module], datas: Sequence[Optional[TaskData]], checkpoint: Sequence[dict[str, str]],
                     *, device: str, batch_size: int, ratio: Optional[float], progress: StatsProgress,
                     cancel: CancelToken) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Gram matrices (keyed `tensor_key(model, weight)`) and the description entries of a
    gram_plusplus file (`checkpoint`: per model, state key -> checkpoint name); the models are
    left unchanged."""
    ratio = DEFAULT_RATIO if ratio is None else float(ratio)
    if not 0 <= ratio <= 1:
        raise MergeError(f"the RegMean ratio must be in [0, 1], got {ratio}")
    found = main_stack([n for n, _ in models[0].named_parameters()])
    if found is None:
        raise MergeError("RegMean++ merges layer by layer, but the models have no stack of numbered layers")
    stack, depth = found
    work = copy.deepcopy(models[0]).eval()
    own = [dict(m.named_parameters()) for m in models]
    merged = dict(work.named_parameters())
    for name, p in merged.items():
        if _layer(name, stack) is None:  # outside the layers: the average (the method's fallback)
            p.copy_(torch.stack([o[name] for o in own]).mean(0))
    mods = linear_modules(work, checkpoint[0])
    inputs: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    n = len(models)
    for layer in range(depth):
        in_layer = [k for k in merged if _layer(k, stack) == layer]
        here = {w: m for w, m in mods.items() if _layer(m[2], stack) == layer}
        grams = []
        for i, data in enumerate(datas):
            assert data is not None
            for k in in_layer:
                merged[k].copy_(own[i][k])
            with GramHooks(here) as hooks:
                handle = _stop_after(work.get_submodule(f"{stack}.{layer}"))
                try:
                    for start in range(0, len(data), batch_size):
                        idx = list(range(start, min(len(data), start + batch_size)))
                        kwargs, mask, _ = data.inputs(idx)
                        hooks.batch(mask.to(device) if mask is not None else None)
                        try:
                            call_with_head(work, data.head, to_device(kwargs, device))
                        except _Stop:
                            pass
                        cancel.check()
                finally:
                    handle.remove()
            if i == 0:
                inputs.update(hooks.inputs)
            elif any(inputs.get(w) != k for w, k in hooks.inputs.items()):
                raise MergeError("the models do not have the same linear layers; RegMean++ merges models of one "
                                 "architecture")
            grams.append(hooks.means())
            progress("collect", layer * n + i + 1, depth * n, f"layer {layer + 1}/{depth}, model {i + 1}/{n}")
        for k in in_layer:  # merge layer l in memory, as the method will
            ck = checkpoint[0].get(k, "")
            key = inputs.get(ck)
            if ck in here and key is not None and all(key in g for g in grams):
                merged[k].copy_(regmean_solve([o[k] for o in own], [g[key] for g in grams], ratio,
                                              transposed=here[ck][1]))
            else:
                merged[k].copy_(torch.stack([o[k] for o in own]).mean(0))
        for i, g in enumerate(grams):
            tensors.update({tensor_key(i, key): m for key, m in g.items()})
    if not tensors:
        raise MergeError("RegMean++ found no linear layer inside the model's layers")
    transposed = sorted(w for w, (_, t, _) in mods.items() if t and w in inputs)
    return tensors, {"inputs": inputs, "transposed": transposed, "ratio": ratio, "stack": stack}
