"""Base + LoRA adapter models in the session: the Models tab's "Add base + adapter" (or a
`BASE+ADAPTER` reference typed as a model) and recipes that name such references.

Each side is found as a model is: the base may be a model of the session (by name, reference or
folder), either side a local folder inside the folders the app may read (`app.paths`) or a Hub id
(fetched in the background from the Models tab, at once for an imported recipe, as its Hub
models are). The engine then opens the pair and checks the adapter against the base before it
joins the session (`app.state.add_model` -> `mergecore.io.adapter.open_adapter`): a folder without
adapter_config.json, another adapter type, an adapter for another base are each its one line.
The session keeps the pair as one model: its recipe reference `BASE+ADAPTER` as given, its source
both folders resolved (`app.state.source_path`). Nothing here imports Gradio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from mergecore.errors import MergeError
from mergecore.io.lora_config import join_adapter_ref, split_adapter_ref

from app import state as st
from app.paths import confine, local_model

SIDES = (("base", "base model"), ("adapter", "adapter"))


@dataclass(frozen=True)
class AdapterPair:
    """A base and an adapter as given, and the confined local folder of each (None: a Hub id)."""

    base: str
    adapter: str
    folders: tuple[Optional[Path], Optional[Path]]

    @property
    def ref(self) -> str:
        """The recipe reference: `BASE+ADAPTER` as given."""
        return join_adapter_ref(self.base, self.adapter)

    @property
    def local(self) -> bool:
        """Whether both sides are local folders (nothing to fetch)."""
        return all(f is not None for f in self.folders)

    def source(self, folders: Optional[Sequence[Path]] = None) -> str:
        """The session's source of the pair: both folders (these, or the local ones) joined."""
        base, adapter = folders if folders is not None else self.folders
        if base is None or adapter is None:
            raise MergeError(f"'{self.ref}' has a side still to fetch from the Hub")
        return join_adapter_ref(str(base), str(adapter))


def split(ref: str) -> Optional[tuple[str, str]]:
    """(base, adapter) of a `BASE+ADAPTER` reference typed as one model, None for a plain one."""
    return split_adapter_ref((ref or "").strip())


def _folder(text: str, roots: Sequence[Path], what: str) -> Optional[Path]:
    """The confined local folder `text` names, None for a Hub id; one line for anything else."""
    p = local_model(text, roots, f"{what} folder")
    if p is not None and not p.is_dir():
        raise MergeError(f"{what} '{text}' is neither a local folder nor a Hub id (org/name)")
    return p


def pair(base: Optional[str], adapter: Optional[str], state: dict[str, Any], roots: Sequence[Path]) -> AdapterPair:
    """The base (a session model, a folder or a Hub id) and the adapter (a folder or a Hub id) as
    given, each side confined; the engine checks the pair when it is added."""
    base, adapter = (base or "").strip(), (adapter or "").strip()
    if not base:
        raise MergeError("give the base model of the adapter: a loaded model, a local folder or a Hub id")
    if not adapter:
        raise MergeError("give the adapter: a PEFT LoRA folder (with adapter_config.json) or a Hub id")
    join_adapter_ref(base, adapter)  # a '+' inside a side: one line before anything is looked up
    m = st.find_model(state, base)
    if m is not None and st.adapter_sides(m["path"]):
        raise MergeError(f"'{m['name']}' is a base + adapter itself; give its base model instead")
    base_folder = Path(m["path"]) if m is not None else _folder(base, roots, "base model")
    return AdapterPair(m["ref"] if m is not None else base, adapter, (base_folder, _folder(adapter, roots, "adapter")))


def fetch(jc: Any, p: AdapterPair) -> str:
    """The fetch job of a pair with a Hub side: each Hub id's snapshot (downloaded unless cached),
    then the pair's source."""
    from mergecore.io.source import resolve_model_path

    folders = []
    for text, folder in zip((p.base, p.adapter), p.folders):
        if folder is None:
            jc.log(f"resolving {text} (Hub download if it is not cached) ...")
            folder = resolve_model_path(text)
            jc.log(f"local folder: {folder}")
        folders.append(folder)
    return p.source(folders)


def load_ref(state: dict[str, Any], ref: str, roots: Sequence[Path]) -> dict[str, Any]:
    """A recipe's `BASE+ADAPTER` reference added to the session (a copy) as it is written, each
    side confined (a Hub side fetched now, or one line)."""
    from mergecore.io.source import resolve_model_path

    sides = split(ref)
    if sides is None:
        raise MergeError(f"'{ref}' is not a base+adapter reference")
    folders = []
    for text, (_, what) in zip(sides, SIDES):
        local = local_model(text, roots, f"{what} folder")  # None: a Hub id
        p = resolve_model_path(str(local) if local is not None else text)
        folders.append(str(confine(p, roots, f"{what} folder")))
    return st.add_model(state, ref, join_adapter_ref(*folders))
