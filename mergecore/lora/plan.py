"""What an extraction does with each tensor, decided from the two models' headers alone.

A *linear module* is a module whose tensors are a 2-D `weight` (and maybe a `bias`) and that is
not an embedding; by default those inside the architecture's layer stacks are factorised (the
attention and MLP projections), and `--modules` picks others by name (`q_proj`, a full path,
`lm_head`). Every other tensor that changed is kept whole in peft's `modules_to_save`, at module
granularity, so nothing is dropped (mergekit's extractor dropped modules: its issue #521).
Names are the checkpoint's, which are the loaded module names for the families mergecore tests
(Llama, Mistral, Qwen2, GPT-2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from mergecore.arch import find_architecture, layer_of, model_kind
from mergecore.compat import compatibility
from mergecore.errors import MergeError, clip
from mergecore.io.source import ModelSource

CONV1D_TYPES = ("gpt2",)  # weights stored (in, out): peft's fan_in_fan_out, and ΔWᵀ is factorised
EMBEDDING_HINTS = ("embed", "relative_attention_bias")  # 2-D weights that are lookups, by substring
EMBEDDING_NAMES = ("shared", "wte", "wpe")  # ... and by last name


def module_of(tensor: str) -> str:
    """The module a checkpoint tensor belongs to (`model.norm.weight` -> `model.norm`)."""
    return tensor.rpartition(".")[0]


def matches(module: str, spec: str) -> bool:
    """peft's rule for a name in target_modules: the module itself or its last dotted parts."""
    return module == spec or module.endswith("." + spec)


@dataclass(frozen=True)
class ExtractPlan:
    """The selected linear modules, each module's tensors, and how the adapter is laid out."""

    selected: tuple[str, ...]  # modules whose weight difference is factorised (when it changed)
    tensors: dict[str, tuple[str, ...]]  # module -> its checkpoint tensors
    fan_in_fan_out: bool
    tied_head: Optional[str]  # the output head that shares the input embedding (saved once)
    embedding: Optional[str]  # the input embedding module, when the head is tied to it
    causal_lm: bool


def _check_pair(ft: ModelSource, base: ModelSource) -> None:
    """FT and BASE must be the same architecture with the same tensors and shapes."""
    types = (ft.config.get("model_type"), base.config.get("model_type"))
    if types[0] != types[1]:
        raise MergeError(f"--model '{clip(ft.ref, 200)}' is a {types[0] or 'model of unknown type'} but --base "
                         f"'{clip(base.ref, 200)}' is a {types[1] or 'model of unknown type'}; extract from a "
                         f"fine-tune of that base")
    verdict = compatibility({"model": ft, "base": base}, "base")
    if not verdict.ok:
        more = f" (and {len(verdict.problems) - 1} more problems)" if len(verdict.problems) > 1 else ""
        hint = ("; resize the base's embeddings to the fine-tune's vocabulary first" if any(
            "embed" in p or "lm_head" in p for p in verdict.problems) else "")
        raise MergeError(f"--model and --base do not match: {verdict.problems[0]}{more}{hint}")


def _is_linear(module: str, names: Sequence[str], ft: ModelSource) -> bool:
    leaves = {n.rpartition(".")[2] for n in names}
    weight = f"{module}.weight"
    return (bool(module) and "weight" in leaves and leaves <= {"weight", "bias"}
            and len(ft.info(weight).shape) == 2 and not any(h in module for h in EMBEDDING_HINTS)
            and module.rpartition(".")[2] not in EMBEDDING_NAMES)


def plan_extraction(ft: ModelSource, base: ModelSource, modules: Optional[Sequence[str]] = None) -> ExtractPlan:
    """Check the pair and resolve `modules` (None: every linear module of the layer stacks)."""
    _check_pair(ft, base)
    tensors: dict[str, list[str]] = {}
    for name in ft.tensors:
        tensors.setdefault(module_of(name), []).append(name)
    linear = [m for m, names in tensors.items() if _is_linear(m, names, ft)]
    if modules is None:
        selected = [m for m in linear if layer_of(f"{m}.weight") is not None]
    else:
        specs = [s.strip() for item in modules for s in str(item).split(",") if s.strip()]
        if not specs:
            raise MergeError("--modules names no module; give linear module names such as q_proj,v_proj")
        chosen: set[str] = set()
        for spec in specs:
            found = [m for m in linear if matches(m, spec)]
            if not found:
                other = next((m for m in tensors if matches(m, spec)), None)
                if other is not None:
                    raise MergeError(f"--modules: '{clip(spec, 100)}' names '{clip(other, 200)}', which is not a "
                                     f"linear layer (its changes are kept whole in modules_to_save anyway)")
                known = ", ".join(sorted({m.rpartition('.')[2] for m in linear}))
                raise MergeError(f"--modules: unknown module '{clip(spec, 100)}'; the linear modules are: "
                                 f"{clip(known, 300)}")
            chosen.update(found)
        selected = [m for m in linear if m in chosen]
    if not selected:
        raise MergeError("the model has no linear layers to factorise (2-D weights in its layer stacks); "
                         "name them with --modules")
    model_type = str(ft.config.get("model_type", ""))
    arch = find_architecture(ft.config, ft.tensors)
    causal = model_kind(ft.config) == "causal-lm"
    embedding = next((m for m in tensors if any(p in m for p in arch.pre) and f"{m}.weight" in ft.tensors
                      and len(ft.info(f"{m}.weight").shape) == 2 and "position" not in m and "wpe" not in m), None)
    tied = causal and bool(ft.config.get("tie_word_embeddings", True)) and "lm_head.weight" not in ft.tensors
    return ExtractPlan(tuple(selected), {m: tuple(n) for m, n in tensors.items()}, model_type in CONV1D_TYPES,
                       "lm_head" if tied and embedding else None, embedding if tied else None, causal)


def compact_targets(lora: Sequence[str], all_modules: Sequence[str]) -> list[str]:
    """peft's target_modules for exactly the `lora` modules: a last name (`q_proj`) where every
    module of the model with that name is targeted, the full path elsewhere."""
    targeted = set(lora)
    out: list[str] = []
    for leaf in dict.fromkeys(m.rpartition(".")[2] for m in lora):
        same = [m for m in all_modules if matches(m, leaf)]
        if all(m in targeted for m in same):
            out.append(leaf)
        else:
            out += [m for m in lora if matches(m, leaf)]
    return sorted(dict.fromkeys(out))
