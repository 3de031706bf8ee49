"""`build_moe`: dense experts into one mixture-of-experts checkpoint, streamed tensor by tensor.

Order of work, so that bad input costs nothing: the config is checked whole, the output path is
checked, every model is opened lazily (headers only) and checked against the base, then the gates
are computed (the one step that loads a model whole: the base, for `hidden` gates), and only then
is anything written: each output tensor is read from its source as it is written into the sharded
safetensors of a temporary folder (`ShardedWriter`), which is renamed into place at the end. A
failure or a cancel on the way leaves nothing at the output path (`io/outdir.py`'s rule; kind
`moe`, so `--overwrite` replaces only an earlier mixture).

An expert's weights are copied byte for byte (a different `dtype` converts them, `noise_scale`
and `residual_scale` change them as in mergekit); attention, norms, embeddings and the head are the
base's; the tokenizer and generation config are copied from the base's folder.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from mergecore.errors import MergeError
from mergecore.events import CancelToken
from mergecore.io.adapter import open_source
from mergecore.io.lora_config import split_adapter_ref
from mergecore.io.outdir import existing_dirs, stale_warning
from mergecore.io.source import ModelSource, dtype_from_name, is_hub_id
from mergecore.io.writer import DEFAULT_SHARD_SIZE, ShardedWriter, parse_size, prepare_output_dir
from mergecore.moe.arch import (PARTS, Output, base_tensors, check_expert, choose_output, layer_of, mlp_name,
                                output_config)
from mergecore.moe.config import Expert, MoEConfig, load_moe_config, moe_config_yaml
from mergecore.moe.gates import check_device, gate_vectors
from mergecore.side_files import TOKENIZER_FILES

CONFIG_FILE = "mergecore_moe.yml"
CARD_FILE = "README.md"
KIND = "moe"


@dataclass
class MoEProgress:
    """`stage` 'gates' (prompts run through the base) or 'writing' (bytes written)."""

    stage: str
    done: int
    total: int
    elapsed: float
    current: str = ""


@dataclass
class MoEResult:
    """What `build_moe` wrote."""

    out: Path
    architecture: str
    experts: int
    experts_per_token: int
    shared: bool
    layers: int
    gate_mode: str
    bytes: int
    seconds: float
    gates: torch.Tensor  # [layers, routed + shared experts, hidden] float32, as written (before the dtype)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        shared = " + 1 shared" if self.shared else ""
        return (f"wrote {self.out}: {self.architecture}, {self.experts} experts{shared} ({self.experts_per_token} per "
                f"token) over {self.layers} layers, {self.gate_mode} gates; {self.bytes / 2**20:.1f} MiB in "
                f"{self.seconds:.1f}s")


Job = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def _out_dtype(config: MoEConfig, base: ModelSource) -> torch.dtype:
    """The config's dtype, else the base's (config.json's dtype / torch_dtype, else its MLP's)."""
    if config.dtype:
        return dtype_from_name(config.dtype)  # type: ignore[return-value]
    for key in ("dtype", "torch_dtype"):
        name = base.config.get(key)
        if isinstance(name, str):
            try:
                return dtype_from_name(name)  # type: ignore[return-value]
            except MergeError:
                pass
    return base.info(mlp_name(0, "gate_proj")).dtype


def _expert_tensor(src: ModelSource, name: str, expert: Expert, part: str, dtype: torch.dtype,
                   salt: str) -> torch.Tensor:
    """The expert's MLP weight as it goes into the mixture (mergekit's noise and residual scale)."""
    t = src.read(name)
    if expert.noise_scale:
        g = torch.Generator().manual_seed(zlib.crc32(salt.encode()))
        t = t.float() + torch.randn(t.shape, generator=g) * expert.noise_scale
    if part == "down_proj" and expert.residual_scale is not None:
        t = t.float() * expert.residual_scale
    return t.to(dtype)


def _jobs(out: Output, base: ModelSource, experts: list[ModelSource], shared: Optional[ModelSource],
          config: MoEConfig, gates: torch.Tensor, dtype: torch.dtype) -> list[Job]:
    """Every output tensor with its maker, embeddings first, then layer by layer, then the rest."""
    per_layer: dict[int, list[Job]] = {i: [] for i in range(out.layers)}
    first: list[Job] = []
    last: list[Job] = []

    def copy(name: str) -> Job:
        info = base.info(name)
        keep = dtype if info.dtype.is_floating_point else info.dtype
        return (name, keep, info.shape, lambda: base.read(name).to(keep))

    for name in base_tensors(base):
        layer = layer_of(name)
        (per_layer[layer] if layer is not None and layer in per_layer else first if "embed" in name else last
         ).append(copy(name))
    for i in range(out.layers):
        jobs = per_layer[i]
        row = gates[i, : out.experts].clone()
        jobs.append((out.gate(i), dtype, tuple(row.shape), lambda row=row: row.to(dtype)))
        groups = [(e, src, config.experts[e]) for e, src in enumerate(experts)]
        if shared is not None:
            groups.append((-1, shared, config.shared_experts[0]))  # type: ignore[index]
        for e, src, spec in groups:
            for part in PARTS:
                name = mlp_name(i, part)
                target = out.shared_expert(i, part) if e < 0 else out.expert(i, e, part)
                salt = f"{config.seed}:{target}"
                jobs.append((target, dtype, src.info(name).shape,
                             lambda src=src, name=name, spec=spec, part=part, salt=salt:
                             _expert_tensor(src, name, spec, part, dtype, salt)))
        if shared is not None:
            srow = gates[i, out.experts:].clone()
            jobs.append((out.shared_gate(i), dtype, tuple(srow.shape), lambda srow=srow: srow.to(dtype)))
    return first + [j for i in range(out.layers) for j in per_layer[i]] + last


def moe_card(config: MoEConfig, architecture: str) -> str:
    """README.md of a mixture: front matter (base_model when it is a Hub id), what it is made of
    (`architecture`: its config.json's, e.g. MixtralForCausalLM) and the config."""
    meta: dict[str, object] = {}
    base_side = (split_adapter_ref(config.base_model) or (config.base_model,))[0]
    if is_hub_id(base_side) and not Path(base_side).expanduser().exists():
        meta["base_model"] = base_side
    meta.update(library_name="transformers", tags=["moe", "merge", "mergecore"])
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {architecture.removesuffix('ForCausalLM')} mixture of experts", "",
             f"Built with `mergecore moe` from `{config.base_model}` (attention, norms, embeddings) and "
             f"{len(config.experts)} experts ({config.experts_per_token} per token, `{config.gate_mode}` gates):", ""]
    for i, e in enumerate(config.experts):
        lines.append(f"- expert {i}: `{e.source_model}` ({len(e.positive_prompts or [])} positive prompts)")
    for e in config.shared_experts or []:
        lines.append(f"- shared expert: `{e.source_model}`")
    lines += ["", "## Config", "", "```yaml", moe_config_yaml(config).rstrip(), "```", ""]
    return "\n".join(lines)


def _warnings(config: MoEConfig, out: Output) -> list[str]:
    found = []
    if out.experts & (out.experts - 1):
        found.append(f"{out.experts} experts is not a power of two; llama.cpp cannot run such a model")
    refs = [e.source_model for e in config.experts]
    if len(refs) > 1 and len(set(refs)) == 1:
        found.append("every expert is the same model: the mixture computes what that model does, at a higher cost "
                     "(useful only as a start for training)")
    return found


def build_moe(config: MoEConfig | str | Path, out: str | Path, *, device: str = "cpu",
              progress: Optional[Callable[[MoEProgress], None]] = None, cancel: Optional[CancelToken] = None,
              overwrite: bool = False, shard_size: str | int = DEFAULT_SHARD_SIZE,
              search_dirs: tuple[Path, ...] = ()) -> MoEResult:
    """Build the mixture that `config` (a `MoEConfig` or a YAML file in mergekit-moe's format)
    describes into the folder `out`, written atomically. Model references are folders, Hub ids or
    `BASE+ADAPTER`; relative ones are also looked up beside a config file. Raises `MergeError`
    (one line) on bad input and `Cancelled` when `cancel` is set; nothing is left at `out` then."""
    start = time.monotonic()
    protect: tuple[Path, ...] = ()
    if not isinstance(config, MoEConfig):
        folder = Path(config).expanduser().resolve().parent
        config = load_moe_config(config)
        search_dirs, protect = (*search_dirs, folder), (folder,)
    dev = check_device(device)
    shard = parse_size(shard_size)
    refs = [config.base_model, *(e.source_model for e in config.all_experts)]
    sides = [s for r in refs for s in (split_adapter_ref(r, search_dirs) or (r,))]
    local = existing_dirs(p for r in sides for p in (r, *(d / r for d in search_dirs)))
    prepare_output_dir(out, overwrite=overwrite, sources=local, protect=protect, kind=KIND)  # before any model
    opened: dict[str, ModelSource] = {}
    try:
        def source(ref: str) -> ModelSource:
            if ref not in opened:
                opened[ref] = open_source(ref, search_dirs)
            return opened[ref]

        base = source(config.base_model)
        spec = choose_output(config, base)
        check_expert(base, base, spec, "base model")
        experts = [source(e.source_model) for e in config.experts]
        for i, src in enumerate(experts):
            check_expert(src, base, spec, f"experts.{i}")
        shared = source(config.shared_experts[0].source_model) if spec.shared else None  # type: ignore[index]
        if shared is not None:
            check_expert(shared, base, spec, "shared_experts.0")
        dtype = _out_dtype(config, base)
        intermediate = base.info(mlp_name(0, "gate_proj")).shape[0]
        cfg_json = output_config(spec, base, config, intermediate, dtype)

        def gate_step(done: int, total: int, elapsed: float, what: str) -> None:
            if progress is not None:
                progress(MoEProgress("gates", done, total, elapsed, what))

        gates, warnings = gate_vectors(config, base, spec.layers, spec.hidden, device=dev, cancel=cancel,
                                       progress=gate_step)
        warnings = _warnings(config, spec) + warnings
        if cancel is not None:
            cancel.check()
        jobs = _jobs(spec, base, experts, shared, config, gates, dtype)
        folders = [p for s in opened.values() for p in s.folders]
        with ShardedWriter(out, [(n, d, s) for n, d, s, _ in jobs], shard_size=shard, overwrite=overwrite,
                           sources=folders, protect=protect, kind=KIND,
                           metadata={"mergecore": f"moe {spec.kind}"}) as writer:
            warnings += [stale_warning(s) for s in writer.stale_removed]
            done, begun = 0, time.monotonic()
            for name, _, _, make in jobs:
                if cancel is not None:
                    cancel.check()
                done += writer.write(name, make())
                if progress is not None:
                    progress(MoEProgress("writing", done, writer.total_bytes, time.monotonic() - begun, name))
            _side_files(writer, base, config, spec, cfg_json)
            if cancel is not None:
                cancel.check()
            path = writer.finalize()
    finally:
        for s in opened.values():
            s.close()
    return MoEResult(path, spec.architecture, spec.experts, config.experts_per_token, spec.shared, spec.layers,
                     config.gate_mode, writer.total_bytes, time.monotonic() - start, gates, warnings)


def _side_files(writer: ShardedWriter, base: ModelSource, config: MoEConfig, spec: Output, cfg_json: str) -> None:
    """config.json (the mixture's), the base's generation config and tokenizer, the config that
    built it and a model card."""
    writer.add_file("config.json", cfg_json)
    for name in ("generation_config.json", *TOKENIZER_FILES):
        if (base.path / name).is_file():
            writer.copy_file(base.path / name)
    writer.add_file(CONFIG_FILE, moe_config_yaml(config))
    writer.add_file(CARD_FILE, moe_card(config, spec.architecture))
