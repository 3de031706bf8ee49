"""Can these models be merged tensor by tensor, and if not, exactly what differs.

The app's Models tab shows this before a recipe is written; the planner finds the same problems
one at a time when it builds a plan (a tensor missing in a model, a shape that differs, another
architecture). Here they are listed all at once, each as one short line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from mergecore.io.source import ModelSource


@dataclass(frozen=True)
class Compatibility:
    """The verdict for a set of models against a reference (the base, or the first model)."""

    reference: str
    problems: list[str]
    architecture: str
    tensors: int

    @property
    def ok(self) -> bool:
        return not self.problems


def compatibility(sources: Mapping[str, ModelSource], reference: str, *, shapes_shown: int = 3) -> Compatibility:
    """Compare every model with `reference`: architecture, tensor names and shapes (headers only)."""
    ref = sources[reference]
    problems: list[str] = []
    archs = {name: src.architecture for name, src in sources.items()}
    if len(set(archs.values())) > 1:
        problems.append("architectures differ: " + ", ".join(f"'{n}' is {a}" for n, a in archs.items()))
    ref_t = ref.tensors
    for name, src in sources.items():
        if name == reference:
            continue
        other = src.tensors
        missing = [t for t in ref_t if t not in other]
        extra = [t for t in other if t not in ref_t]
        shapes = [(t, ref_t[t].shape, other[t].shape) for t in ref_t if t in other and ref_t[t].shape != other[t].shape]
        if missing:
            problems.append(f"'{name}' lacks {len(missing)} tensor(s) '{reference}' has, e.g. "
                            + ", ".join(f"'{t}'" for t in missing[:3]))
        if extra:
            problems.append(f"'{name}' has {len(extra)} tensor(s) '{reference}' lacks, e.g. "
                            + ", ".join(f"'{t}'" for t in extra[:3]))
        for t, a, b in shapes[:shapes_shown]:
            problems.append(f"'{t}' is {list(a)} in '{reference}' but {list(b)} in '{name}'")
        if len(shapes) > shapes_shown:
            problems.append(f"... and {len(shapes) - shapes_shown} more tensors differ in shape between "
                            f"'{reference}' and '{name}'")
    return Compatibility(reference, problems, archs[reference], len(ref_t))
