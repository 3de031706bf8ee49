"""DAM: replay trained merging coefficients (Differentiable Adaptive Merging, layer-wise AdaMerging).

The coefficients come from a DAM search (`mergecore search dam`) and live in a safetensors file
named by the recipe's `artifacts:`; one entry per merged tensor, keyed by the tensor's name.
Each entry has one row per merge input and a shape that broadcasts against the tensor:

    Linear weight [out, in]      column granularity  [R, 1, in]   (one value per input column)
    Conv1D weight [in, out]      column granularity  [R, in, 1]
    embedding [V, D]             column granularity  [R, 1, D]
    norm weight [D]              column granularity  [R, D]
    any weight                   layer granularity   [R, 1, ..., 1] (one scalar per model)
    any bias                                         [R, 1]         (one scalar per model)

The merge inputs (R rows) are the recipe's models in order, preceded by the base when
`include_base` is true. `combine` is the one formula, shared with the search (which builds the
same tensors in memory while it trains), so a replayed recipe equals the searched model:

    form sum           W = Σ_r act(c_r) ⊙ W_r                 (DAM: W = Σ_i W_i · diag(c_i))
    form task_vectors  W = W_0 + Σ_i act(c_i) ⊙ (W_i − W_0)   (AdaMerging: base + scaled task vectors)

with act = identity (`transform: none`) or tanh. A tensor without coefficients (embeddings and
norms unless they were merged, classifier heads, position embeddings, ...) is the base's.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence

import torch

from mergecore.errors import MergeError
from mergecore.methods.base import BaseTensor, Tensors, merge_method

FORMAT = "mergecore-dam"
TRANSFORMS = ("none", "tanh")
FORMS = ("sum", "task_vectors")


def activate(coef: torch.Tensor, transform: str) -> torch.Tensor:
    """The effective coefficients act(c)."""
    if transform == "none":
        return coef
    if transform == "tanh":
        return torch.tanh(coef)
    raise MergeError(f"DAM transform must be one of {', '.join(TRANSFORMS)}, got '{transform}'")


def inverse_activate(value: float, transform: str) -> float:
    """The raw coefficient whose effective value is `value` (for the initialisation)."""
    if transform == "tanh":
        import math

        if not -1 < value < 1:
            raise MergeError(f"with transform tanh the initial coefficient must be in (-1, 1), got {value}")
        return math.atanh(value)
    return value


def combine(coef: torch.Tensor, tensors: Sequence[torch.Tensor], base: Optional[torch.Tensor], *,
            transform: str = "none", form: str = "sum", include_base: bool = False) -> torch.Tensor:
    """Merged tensor from raw coefficients `coef` ([R, ...], broadcastable) and the inputs.

    Differentiable in `coef` (the search calls it with autograd on) and deterministic: the terms
    are added in row order, so the search and the replay produce the same bits.
    """
    rows = ([base] if include_base else []) + list(tensors)
    if include_base and base is None:
        raise MergeError("DAM coefficients include the base model, but no base tensor was given")
    if coef.shape[0] != len(rows):
        raise MergeError(f"DAM coefficients have {coef.shape[0]} rows but there are {len(rows)} merge inputs"
                         + (" (base included)" if include_base else ""))
    ref = rows[0]
    if coef.ndim != ref.ndim + 1 or any(c not in (1, s) for c, s in zip(coef.shape[1:], ref.shape)):
        raise MergeError(f"DAM coefficients of shape {list(coef.shape)} do not broadcast over a tensor of shape "
                         f"{list(ref.shape)}")
    act = activate(coef, transform)
    if form == "sum":
        out = act[0] * rows[0]
        for r in range(1, len(rows)):
            out = out + act[r] * rows[r]
        return out
    if form == "task_vectors":
        if base is None:
            raise MergeError("DAM form 'task_vectors' needs a base model")
        if include_base:
            raise MergeError("DAM form 'task_vectors' cannot include the base model as a merge input")
        out = base
        for r in range(len(rows)):
            out = out + act[r] * (rows[r] - base)
        return out
    raise MergeError(f"DAM form must be one of {', '.join(FORMS)}, got '{form}'")


# -- the coefficients file ----------------------------------------------------------------------


def save_coefficients(path: str | Path, coefs: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write raw coefficients (float32) and a JSON description into a safetensors file (atomically)."""
    from safetensors.torch import save_file

    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in coefs.items()}
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "dam": json.dumps(meta)})
    tmp.replace(p)


def read_meta(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - corrupt or not a safetensors file
        raise MergeError(f"cannot read DAM coefficients {path}: {str(err).splitlines()[0] if str(err) else err}") from None
    if md.get("format") != FORMAT:
        raise MergeError(f"{path} is not a DAM coefficients file (format '{md.get('format')}')")
    try:
        return json.loads(md.get("dam", "{}"))
    except json.JSONDecodeError:
        raise MergeError(f"{path}: the DAM metadata is not valid JSON") from None


class _Reader:
    """Open coefficient files once per process (keys and metadata cached; tensors read on demand)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[tuple[str, float, int], tuple[set[str], dict[str, Any]]] = {}

    def entry(self, path: Path) -> tuple[set[str], dict[str, Any]]:
        st = path.stat()
        key = (str(path), st.st_mtime, st.st_size)
        with self._lock:
            hit = self._files.get(key)
            if hit is None:
                from safetensors import safe_open

                meta = read_meta(path)
                with safe_open(str(path), "pt") as f:
                    hit = self._files[key] = (set(f.keys()), meta)
            return hit

    def tensor(self, path: Path, name: str) -> Optional[torch.Tensor]:
        keys, _ = self.entry(path)
        if name not in keys:
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return f.get_tensor(name).to(torch.float32)


_READER = _Reader()


# not an operator: its values are trained per tensor by a DAM search, not chosen per layer
@merge_method(base="required", operator=False,
              summary="trained per-column (DAM) or per-layer (AdaMerging) coefficients from a DAM search",
              formula="θ = Σᵢ act(cᵢ)⊙θᵢ  (or θ₀ + Σᵢ act(cᵢ)⊙τᵢ),  cᵢ trained per input column or per layer",
              paper="Gauthier-Caron et al. 2024, Merging in a Bottle: Differentiable Adaptive Merging "
                    "(arXiv:2410.08371); Yang et al. 2024, AdaMerging (arXiv:2310.02575)")
def dam(
    tensors: Tensors,
    base: BaseTensor,
    *,
    transform: Annotated[Literal["none", "tanh"], "coefficient transform act(c) used in training"] = "none",
    form: Annotated[Literal["sum", "task_vectors"],
                    "sum: Σ act(c_i) W_i; task_vectors: W_0 + Σ act(c_i)(W_i − W_0)"] = "sum",
    include_base: Annotated[bool, "the base model is the first merge input (row 0 of the coefficients)"] = False,
    coefficients: Annotated[str, "name of the coefficients file under the recipe's artifacts"] = "coefficients",
    tensor_name: str = "",
    artifacts: Optional[dict[str, Any]] = None,
) -> torch.Tensor:
    """W = Σ_i act(c_i) ⊙ W_i (form sum; c_i broadcasts: one value per input column, or per layer),
    or W = W_0 + Σ_i act(c_i) ⊙ (W_i − W_0) (form task_vectors, layer-wise AdaMerging).

    Coefficients are read from the safetensors file `artifacts[coefficients]` (a path relative
    to the recipe's folder), written by `mergecore search dam`. Tensors without coefficients
    are copied from the base model. DAM: Gauthier-Caron et al. 2024 (arXiv:2410.08371);
    AdaMerging: Yang et al., ICLR 2024 (arXiv:2310.02575).
    """
    if base is None:
        raise MergeError("method 'dam' needs a base_model (it supplies every tensor without coefficients)")
    path = (artifacts or {}).get(coefficients)
    if path is None:
        raise MergeError(f"method 'dam': the recipe's artifacts have no '{coefficients}' entry "
                         f"(found: {', '.join(sorted(artifacts or {})) or 'none'})")
    path = Path(path)
    _, meta = _READER.entry(path)
    trained = meta.get("transform")
    if trained is not None and trained != transform:
        raise MergeError(f"{path.name}: the coefficients were trained with transform '{trained}' but the recipe "
                         f"says '{transform}'")
    coef = _READER.tensor(path, tensor_name)
    if coef is None:
        return base.clone()
    try:
        return combine(coef.to(base.device), tensors, base, transform=transform, form=form, include_base=include_base)
    except MergeError as err:
        raise MergeError(f"tensor '{tensor_name}': {err}") from None
