"""Recipe -> Plan: one job per output tensor, every check that can run before a byte is written.

`plan_merge` opens the sources (headers only) and checks models, architectures, shapes, slices,
parameters and artifacts; the `Plan` it returns is what `--dry-run` prints (`Plan.describe`,
`plan_to_json`) and what `mergecore.executor` streams into a checkpoint.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from mergecore.arch import (
    GENERIC,
    Architecture,
    config_num_layers,
    find_architecture,
    is_pre_weight,
    layer_of,
    layer_stacks,
    relayer_config,
    tensor_group,
)
from mergecore.errors import MergeError
from mergecore.io.adapter import open_source
from mergecore.io.source import ModelSource, dtype_from_name, dtype_name
from mergecore.methods import MergeMethod, ParamSpec, get_method
from mergecore.methods._cost import Cost
from mergecore.methods._cost import summarize as summarize_cost
from mergecore.params import UNSET, layer_position, resolve
from mergecore.recipe import InputSlice, OutputSlice, Recipe, validate_parameters
from mergecore.vocab import VocabPlan, plan_vocabulary

PROCESS_BASELINE_BYTES = 450 * 1024**2  # python + torch + libraries, measured on CPU


@dataclass
class TensorJob:
    """Everything needed to produce one output tensor."""

    out_name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    inputs: list[tuple[str, str]]  # (model ref, tensor name) in method order
    base: Optional[tuple[str, str]]
    params: dict[str, Any]
    layer: Optional[int]
    t: float
    copy: bool = False  # output is the single input unchanged (raw copy, no math)
    method: str = ""  # merge method of this tensor (slices may override the recipe's)
    streaming: bool = False  # the method reads inputs one at a time (see methods.base)
    vocab: bool = False  # token-indexed rows, permuted into the output vocabulary (Plan.vocab) first
    cost: Optional[Cost] = None  # the method's extra work on this tensor (SVDs, solves), for --dry-run

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def working_bytes(self) -> int:
        """Rough peak bytes while this job runs (inputs, float32 copies, temporaries)."""
        n_in = len(self.inputs) + (1 if self.base else 0)
        extra = self.cost.extra_bytes if self.cost is not None else 0
        if self.copy:
            return self.numel * 4
        if self.streaming:  # base + the one input being read + accumulators
            return self.numel * 4 * 8 + extra
        return self.numel * 4 * (2 * n_in + 3) + extra


@dataclass
class Plan:
    recipe: Recipe
    method: MergeMethod
    sources: dict[str, ModelSource]
    jobs: list[TensorJob]
    reference: str  # the model whose config, names and side files the output follows
    base: Optional[str]
    config: dict[str, Any]
    layer_sources: list[tuple[str, int]]  # per output layer: (model, source layer)
    source_layer_count: int
    compute_dtype: torch.dtype
    tokenizer_source: Optional[str]
    warnings: list[str] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)  # recipe artifacts, resolved (methods read them)
    vocab: Optional[VocabPlan] = None  # output vocabulary when the models' vocabularies differ (tokenizer_source)
    allow_nonfinite: bool = False  # keep going when finite inputs merge into inf/NaN (--allow-nonfinite)
    arch: Architecture = GENERIC  # the reference model's architecture entry (mergecore.arch)

    @property
    def out_bytes(self) -> int:
        return sum(j.numel * torch.empty((), dtype=j.out_dtype).element_size() for j in self.jobs)

    @property
    def in_bytes(self) -> int:
        return sum(
            self.sources[m].info(n).nbytes
            for j in self.jobs
            for (m, n) in (j.inputs + ([j.base] if j.base else []))
        )

    def peak_memory_estimate(self, memory_budget: Optional[int] = None) -> int:
        largest = max((j.working_bytes() for j in self.jobs), default=0)
        budget = memory_budget or default_memory_budget(self)
        return PROCESS_BASELINE_BYTES + max(largest, budget)

    def describe(self, memory_budget: Optional[int] = None, threads: int = 1, device: str = "cpu") -> str:
        """Human-readable plan: models, tensors, per-layer parameters, memory estimate."""
        lines = [
            f"method: {self.method.name} -- {self.method.summary}",
            f"models: {', '.join(self.sources)}" + (f" (base: {self.base})" if self.base else ""),
            f"output: {len(self.jobs)} tensors, {self.out_bytes / 1e9:.3f} GB, "
            f"{len(self.layer_sources)} layers (sources have {self.source_layer_count}), "
            f"reads {self.in_bytes / 1e9:.3f} GB",
        ]
        lines.append(f"estimated peak memory: {self.peak_memory_estimate(memory_budget) / 2**30:.2f} GiB")
        lines += summarize_cost([j.cost for j in self.jobs if j.cost is not None], threads, device)
        if self.vocab is not None:
            lines.append(self.vocab.describe())
        lines += [f"warning: {w}" for w in self.warnings]
        by_layer: dict[Optional[int], list[TensorJob]] = {}
        for j in self.jobs:
            by_layer.setdefault(j.layer, []).append(j)
        lines.append("per-layer parameters (attn / mlp / other tensors where they differ):")
        for layer in sorted(by_layer, key=lambda x: -1 if x is None else x):
            jobs = by_layer[layer]
            label = "non-layer" if layer is None else f"layer {layer:>3}"
            if layer is not None:
                src_model, src_layer = self.layer_sources[layer]
                label += f" <- {src_model}[{src_layer}]"
            lines.append(f"  {label}: {_describe_params(jobs, self.arch)}")
        return "\n".join(lines)


def _check_matrices(jobs: list[TensorJob]) -> None:
    """A method tagged `matrices` (its core works on weight matrices: an SVD, a Gram solve) is
    refused when none of the tensors it merges is 2-D, instead of silently taking its fallback
    on every tensor."""
    merged = [j for j in jobs if j.method and not j.copy]
    for name in dict.fromkeys(j.method for j in merged):
        if "matrices" in get_method(name).tags and not any(len(j.shape) == 2 for j in merged if j.method == name):
            raise MergeError(f"method '{name}' works on 2-D weight matrices, but every tensor it would merge here is "
                             f"1-D or scalar (its per-matrix step would never run)")


def default_memory_budget(plan: Plan) -> int:
    """Bytes of job working memory allowed in flight: the largest job, and at least 1 GiB."""
    largest = max((j.working_bytes() for j in plan.jobs), default=0)
    return max(largest, 1024**3)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _describe_params(jobs: list[TensorJob], arch: Architecture) -> str:
    keys = list(dict.fromkeys(k for j in jobs for k in j.params))
    parts = []
    for k in keys:
        by_group: dict[str, set[str]] = {}
        for j in jobs:
            if k in j.params:
                by_group.setdefault(tensor_group(j.out_name, arch), set()).add(_fmt(j.params[k]))
        values = {v for s in by_group.values() for v in s}
        if len(values) == 1:
            parts.append(f"{k}={values.pop()}")
        else:
            parts.append(f"{k}=" + " ".join(f"{g}:{'|'.join(sorted(s))}" for g, s in by_group.items()))
    return ", ".join(parts) if parts else "(copy)"


def plan_to_json(plan: Plan) -> str:
    """Machine-readable plan (used by --dry-run --json)."""
    return json.dumps({
        "method": plan.method.name,
        "models": list(plan.sources),
        "base": plan.base,
        "layers": [list(x) for x in plan.layer_sources],
        "tensors": [
            {"name": j.out_name, "shape": list(j.shape), "dtype": dtype_name(j.out_dtype), "layer": j.layer,
             "inputs": [list(i) for i in j.inputs], "base": list(j.base) if j.base else None, "params": j.params}
            for j in plan.jobs
        ],
        "estimated_peak_bytes": plan.peak_memory_estimate(),
        "extra_flops": sum(j.cost.flops for j in plan.jobs if j.cost is not None),
        "svd_shapes": [list(s) for j in plan.jobs if j.cost is not None for s in j.cost.svd],
        "vocab_size": plan.vocab.size if plan.vocab is not None else None,
    }, indent=1)


# ---------------------------------------------------------------------------------------------
# Planning


def resolve_artifacts(recipe: Recipe, search_dirs: tuple[Path, ...] = ()) -> dict[str, Path]:
    """The recipe's `artifacts:` as existing files: absolute paths as given, relative ones looked
    up in `search_dirs` (the recipe file's folder) and then the working directory."""
    out: dict[str, Path] = {}
    for key, ref in (recipe.artifacts or {}).items():
        p = Path(ref).expanduser()
        candidates = [p] if p.is_absolute() else [d / p for d in search_dirs] + [p]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            where = ", ".join(str(c) for c in candidates)
            raise MergeError(f"artifacts: file '{ref}' ({key}) not found (looked at {where})")
        out[key] = found.resolve()
    return out


def _open_sources(recipe: Recipe, search_dirs: tuple[Path, ...],
                  given: Optional[dict[str, ModelSource]]) -> dict[str, ModelSource]:
    """The recipe's models, in recipe order: those `given` (already open) and the rest opened now."""
    given = given or {}
    sources = {r: given[r] if r in given else open_source(r, search_dirs) for r in recipe.referenced_models()}
    archs = {ref: s.architecture for ref, s in sources.items()}
    if len(set(archs.values())) > 1:
        desc = ", ".join(f"{r} is {a}" for r, a in archs.items())
        raise MergeError(f"architectures do not match: {desc}")
    return sources


def _depth(src: ModelSource) -> int:
    stacks = layer_stacks(src.tensors)
    if not stacks:
        return 0
    if len(stacks) > 1:
        return max(stacks.values())
    return next(iter(stacks.values()))


def _normalize_slices(recipe: Recipe, method: MergeMethod, sources: dict[str, ModelSource]) -> list[OutputSlice]:
    """`models:` recipes become one full-depth slice, as in mergekit."""
    if recipe.slices is not None:
        return recipe.slices
    srcs = []
    for m in recipe.models or []:
        n = _depth(sources[m.model])
        srcs.append(InputSlice(model=m.model, layer_range=(0, n), parameters=m.parameters))
    base = recipe.base_model
    if base and method.base != "ignored" and all(m.model != base for m in recipe.models or []):
        srcs.append(InputSlice(model=base, layer_range=(0, _depth(sources[base]))))
    return [OutputSlice(sources=srcs)]


def _slice_depth(out_slice: OutputSlice, sources: dict[str, ModelSource], where: str) -> int:
    """How many layers every source of the slice spans (they must agree and fit their models)."""
    lengths = set()
    for s in out_slice.sources:
        a, b = s.layer_range
        depth = _depth(sources[s.model])
        if a >= b and not (a == b == 0 == depth):
            raise MergeError(f"{where}: layer_range [{a}, {b}] is empty; it must be [start, end) with start < end")
        if not (0 <= a < b <= depth) and not (a == b == 0 == depth):
            raise MergeError(f"{where}: layer_range [{a}, {b}] is outside model '{s.model}', which has {depth} layers")
        lengths.add(b - a)
    if len(lengths) > 1:
        raise MergeError(f"{where}: all sources of a slice must span the same number of layers, got {sorted(lengths)}")
    return lengths.pop()


def _param_value(recipe: Recipe, method: MergeMethod, spec: ParamSpec, out_slice: OutputSlice, source: Optional[InputSlice],
                 tensor: str, t: float, model: str) -> Any:
    """A method parameter for one tensor with mergekit's precedence: slice source > output slice >
    global; coerced and range checked by the parameter's own `coerce` (as `resolve_params` does)."""
    levels = [lv for lv in ((source.parameters if source else None), out_slice.parameters, recipe.parameters) if lv]
    for params in levels:
        if spec.name in params:
            v = resolve(params[spec.name], tensor, t)
            if v is not UNSET:
                return spec.coerce(v, f"{model}, {tensor}" if model else tensor)
    if spec.required:
        raise method.missing_param(spec, [k for lv in levels for k in lv], model=model, at=f"tensor {tensor}",
                                   fix="set it under the model's parameters or the global parameters")
    return spec.default


def _split_inputs(recipe: Recipe, out_slice: OutputSlice, method: MergeMethod,
                  where: str) -> tuple[list[InputSlice], Optional[InputSlice]]:
    """The slice's models as the method's `tensors`, and its base (None when the method takes none)."""
    base_ref = out_slice.base_model or recipe.base_model
    srcs = list(out_slice.sources)
    base_src = None
    if method.base in ("required", "optional") and base_ref:
        matches = [s for s in srcs if s.model == base_ref]
        if not matches:
            raise MergeError(f"{where}: base model '{base_ref}' must be one of the slice's sources")
        base_src = matches[0]
        srcs = [s for s in srcs if s is not base_src]
    elif method.base == "required":
        raise MergeError(f"method '{method.name}' needs a base_model")
    n = len(srcs)
    if not method.accepts(n):
        want = (
            f"exactly {method.min_models}" if method.max_models == method.min_models
            else f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else "")
        )
        besides = " besides the base" if method.base != "ignored" else ""
        raise MergeError(f"{where}: method '{method.name}' takes {want} model(s){besides}, got {n}")
    return srcs, base_src


class _Planner:
    """Builds the jobs of one plan; holds what every job needs (sources, dtype, vocabulary)."""

    def __init__(self, recipe: Recipe, method: MergeMethod, sources: dict[str, ModelSource],
                 reference: str, vocab: Optional[VocabPlan], forced: Optional[torch.dtype]):
        self.recipe, self.method, self.sources = recipe, method, sources
        self.reference, self.ref_src = reference, sources[reference]
        self.vocab, self.forced = vocab, forced
        self.jobs: list[TensorJob] = []
        self.seen: set[str] = set()

    def slice_method(self, out_slice: OutputSlice) -> MergeMethod:
        return get_method(out_slice.merge_method) if out_slice.merge_method else self.method

    def split(self, out_slice: OutputSlice, where: str) -> tuple[list[InputSlice], Optional[InputSlice]]:
        return _split_inputs(self.recipe, out_slice, self.slice_method(out_slice), where)

    def _claim(self, name: str) -> None:
        if name in self.seen:
            raise MergeError(f"output tensor '{name}' would be written twice; check the slices")
        self.seen.add(name)

    def add(self, out_name: str, out_slice: OutputSlice, feeds: list[tuple[InputSlice, str]],
            base_feed: Optional[tuple[InputSlice, str]], layer: Optional[int], t: float) -> None:
        """The job of one merged tensor (`out_name` in the reference's layout)."""
        sources, vocab = self.sources, self.vocab
        on_ref = self.ref_src.has(out_name)
        ref_info = self.ref_src.info(out_name) if on_ref else sources[feeds[0][0].model].info(feeds[0][1])
        shape = ref_info.shape
        all_feeds = feeds + ([base_feed] if base_feed else [])
        vocab_like = layer is None and vocab is not None and vocab.is_vocab_tensor(
            out_name, {src.model: sources[src.model].tensors.get(name) for src, name in all_feeds})
        for src, name in all_feeds:
            s = sources[src.model]
            if not s.has(name):
                raise MergeError(f"model '{src.model}' has no tensor '{name}' (needed for output tensor '{out_name}')")
            other = s.info(name).shape
            if other != shape and not (vocab_like and other[1:] == shape[1:]):
                raise MergeError(f"tensor '{name}' has shape {list(other)} in '{src.model}' but {list(shape)} in "
                                 f"'{self.reference if on_ref else feeds[0][0].model}'")
        if vocab_like:
            shape = vocab.output_shape(shape)
        self._claim(out_name)
        if not ref_info.dtype.is_floating_point:
            # integer buffers (position ids, ...) are copied from the first source
            self.jobs.append(TensorJob(out_name, shape, ref_info.dtype, [(feeds[0][0].model, feeds[0][1])], None, {},
                                       layer, t, copy=True))
            return
        method = self.slice_method(out_slice)
        params: dict[str, Any] = {}
        for spec in method.global_params:
            params[spec.name] = _param_value(self.recipe, method, spec, out_slice, None, out_name, t, "")
        for spec in method.per_model_params:
            params[spec.name] = [_param_value(self.recipe, method, spec, out_slice, src, name, t, src.model)
                                 for src, name in feeds]
        dtype = self.forced or ref_info.dtype
        inputs = [(src.model, name) for src, name in feeds]
        base_in = (base_feed[0].model, base_feed[1]) if base_feed else None
        copy = (  # a method tagged "copy" is the identity at its defaults: read and write the bytes
            not vocab_like
            and "copy" in method.tags
            and all(all(v in (None, p.default) for v in (params[p.name] if p.per_model else [params[p.name]]))
                    for p in method.params)
            and sources[inputs[0][0]].info(inputs[0][1]).dtype == dtype
        )
        cost = None if copy or method.cost is None else method.cost(tuple(shape), len(inputs), params)
        self.jobs.append(TensorJob(out_name, shape, dtype, inputs, base_in, params, layer, t, copy=copy,
                                   method=method.name, streaming="streaming" in method.tags and not vocab_like,
                                   vocab=vocab_like, cost=cost))

    def add_copy(self, name: str, model: str) -> None:
        """A tensor copied unchanged from `model` (`non_layer_from`)."""
        info = self.sources[model].info(name)
        self._claim(name)
        vocab_like = self.vocab is not None and self.vocab.is_vocab_tensor(name, {model: info})
        shape = self.vocab.output_shape(info.shape) if vocab_like else info.shape
        dtype = (self.forced or info.dtype) if info.dtype.is_floating_point else info.dtype
        self.jobs.append(TensorJob(name, shape, dtype, [(model, name)], None, {}, None, 0.0, copy=True, vocab=vocab_like))

    def add_non_layer(self, names: list[str], out_slice: OutputSlice, where: str) -> None:
        """Embeddings (with the first slice) or final norm and heads (with the last one)."""
        if self.recipe.non_layer_from:
            for name in names:
                self.add_copy(name, self.recipe.non_layer_from)
            return
        srcs, base = self.split(out_slice, where)
        for name in names:
            self.add(name, out_slice, [(s, name) for s in srcs], (base, name) if base else None, None, 0.0)

    def add_layers(self, slices: list[OutputSlice]) -> list[tuple[str, int]]:
        """The jobs of every output layer, slice by slice; returns each output layer's source."""
        layer_sources: list[tuple[str, int]] = []
        for si, out_slice in enumerate(slices):
            where = f"slices[{si}]"
            srcs, base_src = self.split(out_slice, where)
            n = _slice_depth(out_slice, self.sources, where)
            lead = out_slice.sources[0]
            lead_src = self.sources[lead.model]
            for off in range(n):
                out_layer = len(layer_sources)
                lead_layer = lead.layer_range[0] + off
                for lead_name in lead_src.tensors:
                    lref = layer_of(lead_name)
                    if lref is None or lref.index != lead_layer:
                        continue

                    def src_name(s: InputSlice) -> str:
                        return lref.name(s.layer_range[0] + off)

                    self.add(lref.name(out_layer), out_slice, [(s, src_name(s)) for s in srcs],
                             (base_src, src_name(base_src)) if base_src else None, out_layer, layer_position(off, n))
                layer_sources.append((lead.model, lead_layer))
        return layer_sources


def _output_config(planner: _Planner, layer_sources: list[tuple[str, int]], src_count: int,
                   warnings: list[str]) -> dict[str, Any]:
    """The reference model's config with the output's depth, dtype and vocabulary."""
    config = dict(planner.ref_src.config)
    declared = config_num_layers(config)
    if declared is not None and src_count and declared != src_count:
        warnings.append(f"config of '{planner.reference}' declares {declared} layers but its weights have {src_count}")
    identity = [(planner.reference, i) for i in range(src_count)]
    if layer_sources != identity and config:
        config = relayer_config(config, [layer for _, layer in layer_sources], declared or src_count)
    float_dtypes = Counter(j.out_dtype for j in planner.jobs if j.out_dtype.is_floating_point)
    if float_dtypes and config:
        name = dtype_name(float_dtypes.most_common(1)[0][0])
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    vocab = planner.vocab
    if vocab is not None:
        config = vocab.update_config(config) if config else config
        warnings += vocab.warnings
        if not vocab.tensors:
            warnings.append("the output vocabulary changes, but no embedding tensor has the models' vocabulary "
                            "sizes as its first dimension; nothing was permuted")
    return config


def plan_merge(
    recipe: Recipe,
    *,
    out_dtype: Optional[str] = None,
    search_dirs: tuple[Path, ...] = (),
    sources: Optional[dict[str, ModelSource]] = None,
    allow_nonfinite: bool = False,
) -> Plan:
    """Check the recipe against the models and build one job per output tensor; `sources` may
    hold models already open (a search's), the others are opened here."""
    method = get_method(recipe.merge_method)
    warnings: list[str] = validate_parameters(recipe)  # unused parameters: mergekit ignores them too
    artifacts = resolve_artifacts(recipe, search_dirs)
    if "artifacts" in method.context and not artifacts:
        raise MergeError(f"method '{method.name}' reads its data from the recipe's 'artifacts:', which is missing")
    sources = _open_sources(recipe, search_dirs, sources)
    if method.base == "required" and not recipe.base_model and not any(s.base_model for s in recipe.slices or []):
        raise MergeError(f"method '{method.name}' needs a base_model")

    slices = _normalize_slices(recipe, method, sources)
    vocab = plan_vocabulary(recipe, sources)  # None when the embeddings need no permutation
    reference = recipe.base_model or slices[0].sources[0].model
    ref_src = sources[reference]
    forced = dtype_from_name(out_dtype) or dtype_from_name(recipe.out_dtype) or dtype_from_name(recipe.dtype)
    compute_dtype = torch.float64 if dtype_from_name(recipe.dtype) == torch.float64 else torch.float32
    if recipe.non_layer_from and recipe.non_layer_from not in sources:
        raise MergeError(f"non_layer_from: model '{recipe.non_layer_from}' is not one of the recipe's models")
    stacks = layer_stacks(ref_src.tensors)
    if len(stacks) > 1 and recipe.slices is not None:
        raise MergeError(f"slices need a model with one layer stack; '{reference}' has {len(stacks)} "
                         f"({', '.join(stacks)})")
    arch = find_architecture(ref_src.config, ref_src.tensors)
    non_layer = [n for n in ref_src.tensors if layer_of(n) is None]

    planner = _Planner(recipe, method, sources, reference, vocab, forced)
    planner.add_non_layer([n for n in non_layer if is_pre_weight(n, arch)], slices[0], "slices[0]")
    layer_sources = planner.add_layers(slices)
    planner.add_non_layer([n for n in non_layer if not is_pre_weight(n, arch)], slices[-1],
                          f"slices[{len(slices) - 1}]")
    src_count = _depth(ref_src)
    _check_matrices(planner.jobs)
    config = _output_config(planner, layer_sources, src_count, warnings)
    return Plan(
        recipe=recipe, method=method, sources=sources, jobs=planner.jobs, reference=reference,
        base=recipe.base_model, config=config, layer_sources=layer_sources,
        source_layer_count=src_count, compute_dtype=compute_dtype, tokenizer_source=recipe.effective_tokenizer_source,
        warnings=warnings, artifacts=artifacts, vocab=vocab, allow_nonfinite=allow_nonfinite, arch=arch,
    )
