"""Plan and execute a merge: one job per output tensor, streamed read -> method -> write.

`plan_merge` opens the sources (headers only), checks everything that can be checked before a
byte is written (models, architectures, shapes, slices, parameters, output path) and returns a
`Plan`. `execute_plan` runs the jobs on a small thread pool under a memory budget: each job reads
its input tensors, calls the method, writes the result at its final offset and releases
everything, so peak memory is a few tensors, not a model. `merge` does both.
"""

from __future__ import annotations

import difflib
import json
import math
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from mergecore.arch import config_num_layers, is_pre_weight, layer_of, layer_stacks, relayer_config
from mergecore.errors import MergeError
from mergecore.events import CancelToken, MergeProgress, ProgressCallback
from mergecore.io.extras import write_side_files
from mergecore.io.source import ModelSource, dtype_from_name, dtype_name
from mergecore.io.outdir import stale_warning
from mergecore.io.writer import DEFAULT_SHARD_SIZE, ShardedWriter, prepare_output_dir
from mergecore.methods import MergeMethod, get_method
from mergecore.methods.base import OwnedInputs
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

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def working_bytes(self) -> int:
        """Rough peak bytes while this job runs (inputs, float32 copies, temporaries)."""
        n_in = len(self.inputs) + (1 if self.base else 0)
        if self.copy:
            return self.numel * 4
        if self.streaming:  # base + the one input being read + accumulators
            return self.numel * 4 * 8
        return self.numel * 4 * (2 * n_in + 3)


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

    def describe(self, memory_budget: Optional[int] = None) -> str:
        """Human-readable plan: models, tensors, per-layer parameters, memory estimate."""
        lines = [
            f"method: {self.method.name} -- {self.method.summary}",
            f"models: {', '.join(self.sources)}" + (f" (base: {self.base})" if self.base else ""),
            f"output: {len(self.jobs)} tensors, {self.out_bytes / 1e9:.3f} GB, "
            f"{len(self.layer_sources)} layers (sources have {self.source_layer_count}), "
            f"reads {self.in_bytes / 1e9:.3f} GB",
        ]
        lines.append(f"estimated peak memory: {self.peak_memory_estimate(memory_budget) / 2**30:.2f} GiB")
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
            lines.append(f"  {label}: {_describe_params(jobs)}")
        return "\n".join(lines)


def _group(name: str) -> str:
    if any(k in name for k in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")):
        return "attn"
    if any(k in name for k in ("mlp", "ffn", "intermediate", "feed_forward", "fc1", "fc2", "c_fc")):
        return "mlp"
    return "other"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _describe_params(jobs: list[TensorJob]) -> str:
    keys = list(dict.fromkeys(k for j in jobs for k in j.params))
    parts = []
    for k in keys:
        by_group: dict[str, set[str]] = {}
        for j in jobs:
            if k in j.params:
                by_group.setdefault(_group(j.out_name), set()).add(_fmt(j.params[k]))
        values = {v for s in by_group.values() for v in s}
        if len(values) == 1:
            parts.append(f"{k}={values.pop()}")
        else:
            parts.append(f"{k}=" + " ".join(f"{g}:{'|'.join(sorted(s))}" for g, s in by_group.items()))
    return ", ".join(parts) if parts else "(copy)"


# ---------------------------------------------------------------------------------------------
# Planning


def _open_sources(refs: list[str], search_dirs: tuple[Path, ...]) -> dict[str, ModelSource]:
    return {r: ModelSource(r, search_dirs=search_dirs) for r in refs}


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


def _check_architectures(sources: dict[str, ModelSource]) -> None:
    archs = {ref: s.architecture for ref, s in sources.items()}
    if len(set(archs.values())) > 1:
        desc = ", ".join(f"{r} is {a}" for r, a in archs.items())
        raise MergeError(f"architectures do not match: {desc}")


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


def _depth(src: ModelSource) -> int:
    stacks = layer_stacks(src.tensors)
    if not stacks:
        return 0
    if len(stacks) > 1:
        return max(stacks.values())
    return next(iter(stacks.values()))


class _ParamReader:
    """Resolve a method parameter for one tensor with mergekit's precedence:
    slice source > output slice > global."""

    def __init__(self, recipe: Recipe, method: MergeMethod):
        self.recipe = recipe
        self.method = method

    def value(self, spec, out_slice: OutputSlice, source: Optional[InputSlice], tensor: str, t: float, model: str) -> Any:
        levels = []
        if source is not None and source.parameters:
            levels.append(source.parameters)
        if out_slice.parameters:
            levels.append(out_slice.parameters)
        if self.recipe.parameters:
            levels.append(self.recipe.parameters)
        for params in levels:
            if spec.name in params:
                v = resolve(params[spec.name], tensor, t)
                if v is not UNSET:
                    return spec.coerce(v, f"{model}, {tensor}" if model else tensor)
        if spec.required:
            who = f" for model '{model}'" if spec.per_model and model else ""
            known = {p.name for p in self.method.params}
            unknown = [k for lv in levels for k in lv if isinstance(k, str) and k not in known and len(k) <= 64]
            typo = difflib.get_close_matches(spec.name, unknown, n=1)
            hint = f" ('{typo[0]}' in the recipe is not a parameter of '{self.method.name}': a typo?)" if typo else ""
            raise MergeError(
                f"method '{self.method.name}' needs parameter '{spec.name}'{who} (tensor {tensor}){hint}; "
                f"set it under the model's parameters or the global parameters"
            )
        return spec.default


def plan_merge(
    recipe: Recipe,
    *,
    out_dtype: Optional[str] = None,
    search_dirs: tuple[Path, ...] = (),
    sources: Optional[dict[str, ModelSource]] = None,
    allow_nonfinite: bool = False,
) -> Plan:
    """Check the recipe against the models and build one job per output tensor."""
    method = get_method(recipe.merge_method)
    warnings: list[str] = validate_parameters(recipe)  # unused parameters: mergekit ignores them too
    artifacts = resolve_artifacts(recipe, search_dirs)
    if "artifacts" in method.context and not artifacts:
        raise MergeError(f"method '{method.name}' reads its data from the recipe's 'artifacts:', which is missing")
    refs = recipe.referenced_models()
    if sources is None:
        sources = _open_sources(refs, search_dirs)
    else:
        missing = [r for r in refs if r not in sources]
        sources = {**sources, **_open_sources(missing, search_dirs)}
        sources = {r: sources[r] for r in refs}
    _check_architectures(sources)
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

    def slice_method(out_slice: OutputSlice) -> MergeMethod:
        return get_method(out_slice.merge_method) if out_slice.merge_method else method
    seen_shapes: dict[str, tuple] = {}

    # per output slice: the models that feed it and how they map onto method arguments
    def split_inputs(out_slice: OutputSlice, where: str) -> tuple[list[InputSlice], Optional[InputSlice]]:
        method = slice_method(out_slice)
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
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            want = (
                f"exactly {method.min_models}" if method.max_models == method.min_models
                else f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else "")
            )
            besides = " besides the base" if method.base != "ignored" else ""
            raise MergeError(f"{where}: method '{method.name}' takes {want} model(s){besides}, got {n}")
        return srcs, base_src

    jobs: list[TensorJob] = []

    def add_job(out_name: str, ref_name: str, out_slice: OutputSlice, feeds: list[tuple[InputSlice, str]],
                base_feed: Optional[tuple[InputSlice, str]], layer: Optional[int], t: float) -> None:
        ref_info = ref_src.info(ref_name) if ref_src.has(ref_name) else sources[feeds[0][0].model].info(feeds[0][1])
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
                raise MergeError(
                    f"tensor '{name}' has shape {list(other)} in '{src.model}' but {list(shape)} in "
                    f"'{reference if ref_src.has(ref_name) else feeds[0][0].model}'"
                )
        if vocab_like:
            shape = vocab.output_shape(shape)
        if out_name in seen_shapes:
            raise MergeError(f"output tensor '{out_name}' would be written twice; check the slices")
        seen_shapes[out_name] = shape
        if not ref_info.dtype.is_floating_point:
            # integer buffers (position ids, ...) are copied from the first source
            jobs.append(TensorJob(out_name, shape, ref_info.dtype, [(feeds[0][0].model, feeds[0][1])], None, {}, layer, t, copy=True))
            return
        method = slice_method(out_slice)
        reader = _ParamReader(recipe, method)
        params: dict[str, Any] = {}
        for spec in method.global_params:
            params[spec.name] = reader.value(spec, out_slice, None, out_name, t, "")
        for spec in method.per_model_params:
            params[spec.name] = [reader.value(spec, out_slice, src, name, t, src.model) for src, name in feeds]
        dtype = forced or ref_info.dtype
        inputs = [(src.model, name) for src, name in feeds]
        base_in = (base_feed[0].model, base_feed[1]) if base_feed else None
        copy = (
            not vocab_like
            and method.name == "passthrough"
            and all(s in (None, 1.0) for s in params.get("scale", [None]))
            and sources[inputs[0][0]].info(inputs[0][1]).dtype == dtype
        )
        jobs.append(TensorJob(out_name, shape, dtype, inputs, base_in, params, layer, t, copy=copy, method=method.name,
                              streaming="streaming" in method.tags and not vocab_like, vocab=vocab_like))

    def add_copy_job(name: str, model: str) -> None:
        src = sources[model]
        info = src.info(name)
        if name in seen_shapes:
            raise MergeError(f"output tensor '{name}' would be written twice; check the slices")
        vocab_like = vocab is not None and vocab.is_vocab_tensor(name, {model: info})
        shape = vocab.output_shape(info.shape) if vocab_like else info.shape
        seen_shapes[name] = shape
        dtype = (forced or info.dtype) if info.dtype.is_floating_point else info.dtype
        jobs.append(TensorJob(name, shape, dtype, [(model, name)], None, {}, None, 0.0, copy=True, vocab=vocab_like))

    # layer tensors, grouped by (stack, layer) of the reference layout
    layer_names: dict[str, dict[int, list[str]]] = {}
    non_layer: list[str] = []
    for name in ref_src.tensors:
        ref = layer_of(name)
        if ref is None:
            non_layer.append(name)
        else:
            layer_names.setdefault(ref.stack, {}).setdefault(ref.index, []).append(name)
    if len(layer_names) > 1 and recipe.slices is not None:
        raise MergeError(
            f"slices need a model with one layer stack; '{reference}' has {len(layer_names)} "
            f"({', '.join(layer_names)})"
        )

    def names_in_layer(src: ModelSource, idx: int) -> list[str]:
        return [n for n in src.tensors if (r := layer_of(n)) is not None and r.index == idx]

    pre = [n for n in non_layer if is_pre_weight(n)]
    post = [n for n in non_layer if not is_pre_weight(n)]
    if recipe.non_layer_from:
        for name in pre:
            add_copy_job(name, recipe.non_layer_from)
    else:
        first_srcs, first_base = split_inputs(slices[0], "slices[0]")
        for name in pre:
            add_job(name, name, slices[0], [(s, name) for s in first_srcs], (first_base, name) if first_base else None, None, 0.0)

    layer_sources: list[tuple[str, int]] = []
    out_layer = 0
    for si, out_slice in enumerate(slices):
        where = f"slices[{si}]"
        srcs, base_src = split_inputs(out_slice, where)
        all_srcs = list(out_slice.sources)
        lengths = set()
        for s in all_srcs:
            a, b = s.layer_range
            depth = _depth(sources[s.model])
            if a >= b and not (a == b == 0 == depth):
                raise MergeError(f"{where}: layer_range [{a}, {b}] is empty; it must be [start, end) with start < end")
            if not (0 <= a < b <= depth) and not (a == b == 0 == depth):
                raise MergeError(f"{where}: layer_range [{a}, {b}] is outside model '{s.model}', which has {depth} layers")
            lengths.add(b - a)
        if len(lengths) > 1:
            raise MergeError(f"{where}: all sources of a slice must span the same number of layers, got {sorted(lengths)}")
        n = lengths.pop()
        lead = all_srcs[0]
        lead_src = sources[lead.model]
        for off in range(n):
            t = layer_position(off, n)
            lead_layer = lead.layer_range[0] + off
            for lead_name in names_in_layer(lead_src, lead_layer):
                lref = layer_of(lead_name)
                out_name = lref.name(out_layer)

                def src_name(s: InputSlice) -> str:
                    return lref.name(s.layer_range[0] + off)

                add_job(out_name, out_name, out_slice, [(s, src_name(s)) for s in srcs],
                        (base_src, src_name(base_src)) if base_src else None, out_layer, t)
            layer_sources.append((lead.model, lead_layer))
            out_layer += 1

    if recipe.non_layer_from:
        for name in post:
            add_copy_job(name, recipe.non_layer_from)
    else:
        last_srcs, last_base = split_inputs(slices[-1], f"slices[{len(slices) - 1}]")
        for name in post:
            add_job(name, name, slices[-1], [(s, name) for s in last_srcs], (last_base, name) if last_base else None, None, 0.0)

    # output config follows the reference model, with its depth and dtype updated
    config = dict(ref_src.config)
    src_count = _depth(ref_src)
    declared = config_num_layers(config)
    if declared is not None and src_count and declared != src_count:
        warnings.append(f"config of '{reference}' declares {declared} layers but its weights have {src_count}")
    identity = [(reference, i) for i in range(src_count)]
    if layer_sources != identity and config:
        config = relayer_config(config, [layer for _, layer in layer_sources], declared or src_count)
    float_dtypes = Counter(j.out_dtype for j in jobs if j.out_dtype.is_floating_point)
    if float_dtypes and config:
        name = dtype_name(float_dtypes.most_common(1)[0][0])
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name

    if vocab is not None:
        config = vocab.update_config(config) if config else config
        warnings += vocab.warnings
        if not vocab.tensors:
            warnings.append("the output vocabulary changes, but no embedding tensor has the models' vocabulary "
                            "sizes as its first dimension; nothing was permuted")
    tok = recipe.effective_tokenizer_source
    return Plan(
        recipe=recipe, method=method, sources=sources, jobs=jobs, reference=reference,
        base=recipe.base_model, config=config, layer_sources=layer_sources,
        source_layer_count=src_count, compute_dtype=compute_dtype, tokenizer_source=tok,
        warnings=warnings, artifacts=artifacts, vocab=vocab, allow_nonfinite=allow_nonfinite,
    )


# ---------------------------------------------------------------------------------------------
# Execution


def default_memory_budget(plan: Plan) -> int:
    """Bytes of job working memory allowed in flight: the largest job, and at least 1 GiB."""
    largest = max((j.working_bytes() for j in plan.jobs), default=0)
    return max(largest, 1024**3)


class _Budget:
    """Counting semaphore over bytes; a job larger than the budget runs alone."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self.cond = threading.Condition()

    def acquire(self, n: int, cancel: CancelToken) -> int:
        n = min(n, self.total)
        with self.cond:
            while self.used + n > self.total:
                self.cond.wait(0.2)
                cancel.check()
            self.used += n
        return n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def seed_for_tensor(seed: int, name: str) -> int:
    """Seed of a randomised method for one tensor, from the recipe seed and the *source* tensor
    name: the same source layer gets the same random mask wherever it lands in the output (so a
    search's layer bank and the replayed recipe agree)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class NonFiniteTally:
    """Non-finite values met in source tensors during one run, per model; safe across threads.

    Each (model, tensor) counts once, however many jobs read it, so the warning reports what
    the files hold.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], int] = {}

    def add(self, model: str, name: str, count: int) -> None:
        with self._lock:
            self._seen[(model, name)] = count

    def warnings(self) -> list[str]:
        with self._lock:
            items = sorted(self._seen.items())
        by_model: dict[str, list[tuple[str, int]]] = {}
        for (model, name), count in items:
            by_model.setdefault(model, []).append((name, count))
        out = []
        for model, hits in by_model.items():
            values = sum(c for _, c in hits)
            first = ", ".join(f"'{n}'" for n, _ in hits[:3]) + (", ..." if len(hits) > 3 else "")
            out.append(f"model '{model}' holds {values} non-finite value{'s' if values != 1 else ''} (NaN or inf) "
                       f"in {len(hits)} tensor{'s' if len(hits) != 1 else ''} ({first}); merged tensors that "
                       f"read them may be non-finite too")
        return out


def _nonfinite_count(t: torch.Tensor) -> int:
    """How many values of `t` are NaN or +-inf (0 for integer tensors); one pass when all are finite."""
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return 0
    return int((~torch.isfinite(t)).sum())


def _check_output(plan: Plan, job: TensorJob, method: str, merged: torch.Tensor, out: torch.Tensor) -> None:
    """Refuse an output that turned non-finite from finite inputs: a parameter (lambda: -1e308) or
    the cast to a narrower dtype overflowed, and the checkpoint would hold inf/NaN silently."""
    if plan.allow_nonfinite:
        return
    bad = _nonfinite_count(merged)
    if bad:
        raise MergeError(
            f"merged tensor '{job.out_name}' ({method}) has {bad} non-finite values although its inputs are "
            f"finite; check the parameters (lambda, weight) or pass --allow-nonfinite")
    bad = _nonfinite_count(out) if out is not merged else 0
    if bad:
        raise MergeError(
            f"merged tensor '{job.out_name}' ({method}) has {bad} values out of the range of "
            f"{dtype_name(job.out_dtype)}, non-finite after the cast; use a wider --dtype or pass --allow-nonfinite")


def compute_tensor(plan: Plan, job: TensorJob, device: torch.device | str = "cpu", *,
                   source_nonfinite: Optional[NonFiniteTally] = None) -> torch.Tensor:
    """Run one job's method and return the output tensor (out dtype, on CPU).

    Raises MergeError when the result is non-finite although every input was finite (unless
    `plan.allow_nonfinite`); non-finite values already in an input are recorded in
    `source_nonfinite` instead, and do not fail the tensor.
    """
    inputs_finite = True

    def note(model: str, name: str, t: torch.Tensor) -> torch.Tensor:
        nonlocal inputs_finite
        bad = _nonfinite_count(t)
        if bad:
            inputs_finite = False
            if source_nonfinite is not None:
                source_nonfinite.add(model, name, bad)
        return t

    if job.copy:
        model, name = job.inputs[0]
        raw = note(model, name, plan.sources[model].read(name))
        if job.vocab and plan.vocab is not None:
            merged = plan.vocab.permute([(model, raw.to(plan.compute_dtype))], None, job.out_name)[0]
        else:
            merged = raw
        out = merged.to(job.out_dtype)
        if inputs_finite:
            _check_output(plan, job, "copy", merged, out)
        return out
    dev = torch.device(device)
    method = get_method(job.method) if job.method else plan.method

    def loader(model: str, name: str):
        return lambda: note(model, name, plan.sources[model].read(name).to(dev)).to(plan.compute_dtype)

    if "streaming" in method.tags and not job.vocab:  # read each input when the method gets to it
        tensors = OwnedInputs([loader(m, n) for m, n in job.inputs])
    else:
        tensors = [loader(m, n)() for m, n in job.inputs]
    base = loader(*job.base)() if job.base else None
    if job.vocab and plan.vocab is not None:  # rows into the output vocabulary, with mergekit's fill
        fill_base = job.base[0] if job.base else plan.base
        given = list(zip([m for m, _ in job.inputs], tensors)) + ([(job.base[0], base)] if job.base else [])
        permuted = plan.vocab.permute(given, fill_base, job.out_name)
        tensors, base = permuted[:len(job.inputs)], (permuted[-1] if job.base else None)
        del given, permuted
    gen = None
    if method.randomized:
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed_for_tensor(plan.recipe.seed or 0, job.inputs[0][1]))
    merged = method(tensors, base, job.params, generator=gen, tensor_name=job.out_name, artifacts=plan.artifacts)
    del tensors, base
    if tuple(merged.shape) != job.shape:
        raise MergeError(f"method '{method.name}' returned shape {list(merged.shape)} for '{job.out_name}', expected {list(job.shape)}")
    out = merged.to("cpu", job.out_dtype)
    if inputs_finite:  # a streaming method has read every input by now
        _check_output(plan, job, method.name, merged, out)
    return out


@dataclass
class MergeResult:
    out_dir: Path
    seconds: float
    tensors: int
    bytes_written: int
    shards: int
    plan: Plan
    warnings: list[str] = field(default_factory=list)  # e.g. non-finite values met in the sources

    def summary(self) -> str:
        return (
            f"wrote {self.tensors} tensors ({self.bytes_written / 1e9:.3f} GB in {self.shards} "
            f"shard{'s' if self.shards != 1 else ''}) to {self.out_dir} in {self.seconds:.1f} s"
        )


def execute_plan(
    plan: Plan,
    out_dir: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    threads: int = 2,
    device: str = "cpu",
    memory_budget: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    overwrite: bool = False,
    protect: tuple[Path, ...] = (),
) -> MergeResult:
    """Stream every job of `plan` into a checkpoint at `out_dir` (atomically).

    The writer enforces the output-path policy for every caller: never a source model's folder
    (or inside or above one), a `protect`ed folder (the recipe's), the working directory, or a
    folder mergecore did not write; an earlier merge's folder only with `overwrite`."""
    cancel = cancel or CancelToken()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for but no CUDA device is available")
    start = time.time()
    layout = [(j.out_name, j.out_dtype, j.shape) for j in plan.jobs]
    meta = {"mergecore_method": plan.method.name}
    budget = _Budget(memory_budget or default_memory_budget(plan))
    tally = NonFiniteTally()
    done_tensors = 0
    done_bytes = 0
    sources = [src.path for src in plan.sources.values()]
    with ShardedWriter(out_dir, layout, shard_size=shard_size, metadata=meta, overwrite=overwrite,
                       sources=sources, protect=protect) as writer:
        total_bytes = writer.total_bytes

        def run(job: TensorJob) -> int:
            cancel.check()
            held = budget.acquire(job.working_bytes(), cancel)
            try:
                cancel.check()
                out = compute_tensor(plan, job, device, source_nonfinite=tally)
                return writer.write(job.out_name, out)
            finally:
                budget.release(held)

        if progress:
            progress(MergeProgress(0, len(plan.jobs), 0, total_bytes, 0.0))
        # largest jobs first keeps the pool busy at the end; writes land at fixed offsets anyway
        order = sorted(plan.jobs, key=lambda j: -j.working_bytes())
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="merge") as pool:
            pending: dict[Future, TensorJob] = {pool.submit(run, j): j for j in order}
            try:
                while pending:
                    finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    if cancel.cancelled:
                        cancel.check()
                    for fut in finished:
                        job = pending.pop(fut)
                        done_bytes += fut.result()
                        done_tensors += 1
                        if progress:
                            progress(MergeProgress(done_tensors, len(plan.jobs), done_bytes, total_bytes,
                                                   time.time() - start, job.out_name))
                        # a cancel from the progress callback (or while the last jobs finished)
                        # stops here: nothing has been renamed into place yet
                        cancel.check()
            except BaseException:
                cancel.cancel()
                for fut in pending:
                    fut.cancel()
                raise
        write_side_files(writer, plan)
        out = writer.finalize()
    stale = [stale_warning(s) for s in writer.stale_removed]  # temp folders of dead runs, removed
    return MergeResult(out, time.time() - start, len(plan.jobs), done_bytes, len(writer.shard_names), plan,
                       warnings=stale + tally.warnings())


def merge(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    out_dtype: Optional[str] = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    threads: int = 2,
    device: str = "cpu",
    memory_budget: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    search_dirs: tuple[Path, ...] = (),
    overwrite: bool = False,
) -> MergeResult:
    """Plan and execute `recipe` into `out_dir`; the one entry point the CLI, app and searches use.
    `search_dirs` (the recipe's folder) are protected: the output may be neither one nor above one."""
    prepare_output_dir(out_dir, overwrite=overwrite, protect=search_dirs)
    plan = plan_merge(recipe, out_dtype=out_dtype, search_dirs=search_dirs)
    return execute_plan(plan, out_dir, shard_size=shard_size, threads=threads, device=device,
                        memory_budget=memory_budget, progress=progress, cancel=cancel, overwrite=overwrite,
                        protect=search_dirs)


def checkpoint_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers under their *checkpoint* names.

    transformers 5 renames some architectures' weights on load (e.g. ViT's
    `encoder.layer.N.attention.attention.query` is `layers.N.attention.q_proj` in the module);
    its own save-time reversal gives the names back. Only one-to-one renames map to a tensor
    of the model; fused or split weights are left out (such tensors need a merge to a folder).
    Computed once per model and kept on it.
    """
    cached = model.__dict__.get("_mergecore_checkpoint_tensors")
    if cached is not None:
        return cached
    own = model.state_dict(keep_vars=True)
    names = {k: k for k in own}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        detached = {k: v.detach() for k, v in own.items()}
        by_ptr = {(v.data_ptr(), tuple(v.shape)): k for k, v in detached.items()}
        reverted = revert_weight_conversion(model, dict(detached))
        names = {}
        for ck, t in reverted.items():
            mk = by_ptr.get((t.data_ptr(), tuple(t.shape))) if isinstance(t, torch.Tensor) else None
            if mk is not None:
                names[ck] = mk
    except Exception:  # not a transformers model, or no conversion: the module names are the names
        pass
    out = {ck: own[mk].data if isinstance(own[mk], torch.nn.Parameter) else own[mk] for ck, mk in names.items()}
    model.__dict__["_mergecore_checkpoint_tensors"] = out
    return out


def merge_in_memory(
    plan: Plan,
    model: Optional[torch.nn.Module] = None,
    *,
    device: str = "cpu",
    cancel: Optional[CancelToken] = None,
    source_nonfinite: Optional[NonFiniteTally] = None,
) -> Any:
    """Run every job of `plan` without writing a checkpoint (searches score candidates this way).

    With `model` (a resident model of the output's architecture, e.g. the base loaded once),
    each merged tensor is copied straight into the model's parameter or buffer of that name and
    the model is returned: a candidate costs one merge pass, no reload. Without it, the merged
    state dict (name -> tensor, out dtype, on CPU) is returned. The tensors are exactly what
    `execute_plan` writes for the same plan (same `compute_tensor`), so a replayed recipe
    scores the same (and is checked for non-finite values the same way; `source_nonfinite`
    collects the sources' own). Raises MergeError if an output tensor has no place in `model`.
    """
    cancel = cancel or CancelToken()
    if model is None:
        out: dict[str, torch.Tensor] = {}
        for job in plan.jobs:
            cancel.check()
            out[job.out_name] = compute_tensor(plan, job, device, source_nonfinite=source_nonfinite)
        return out
    targets = checkpoint_tensors(model)
    for job in plan.jobs:
        t = targets.get(job.out_name)
        if t is None:
            raise MergeError(f"the resident {type(model).__name__} has no parameter or buffer '{job.out_name}'; "
                             f"merge to a folder instead")
        if tuple(t.shape) != tuple(job.shape):
            raise MergeError(f"'{job.out_name}' has shape {list(job.shape)} in the plan but {list(t.shape)} in "
                             f"the resident model")
    with torch.no_grad():
        for job in plan.jobs:
            cancel.check()
            targets[job.out_name].copy_(compute_tensor(plan, job, device, source_nonfinite=source_nonfinite))
    return model


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
        "vocab_size": plan.vocab.size if plan.vocab is not None else None,
    }, indent=1)
