"""A mixture's config made to travel (the app's Export of a mixture): the config `build_moe` wrote
beside the weights, with Hub models kept by id and local models renamed `models/<folder name>`, a
path relative to the config (`build_moe` looks a relative reference up beside its config file),
exactly as an exported merge recipe names them (`mergecore.side_files.portable_models`).
`mergecore moe mergecore_moe.yml OUT` in the unpacked folder builds the same mixture once each
local model's folder is at the path the config names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mergecore.errors import MergeError
from mergecore.moe.build import CONFIG_FILE, moe_card
from mergecore.moe.config import MoEConfig, load_moe_config, moe_config_from_dict, moe_config_yaml
from mergecore.side_files import portable_models


@dataclass
class PortableMoE:
    """What an export of a mixture ships so that its config rebuilds it anywhere."""

    config: MoEConfig  # Hub models by id, local ones as models/<name>
    config_text: str  # a comment on how to rebuild it and where local models go, then the YAML
    card: str  # README.md for it
    local_models: dict[str, str]  # the config's local model reference -> the folder it was built from


def relocated(config: MoEConfig, renames: dict[str, str]) -> MoEConfig:
    """A copy of `config` with its models renamed (old reference -> new), wherever one is named."""
    data = config.model_dump(exclude_none=True)
    data["base_model"] = renames.get(data["base_model"], data["base_model"])
    for e in [*data["experts"], *(data.get("shared_experts") or [])]:
        e["source_model"] = renames.get(e["source_model"], e["source_model"])
    return moe_config_from_dict(data)


def portable_moe(folder: str | Path) -> PortableMoE:
    """The config, card and local models that make the mixture in `folder` rebuildable anywhere
    (one line when `folder` holds no mixture's config)."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise MergeError(f"{folder.name} has no {CONFIG_FILE}: it is not a mixture built by mergecore moe")
    config = load_moe_config(folder / CONFIG_FILE)
    renames, local = portable_models(config)  # type: ignore[arg-type]  # reads referenced_models() only
    portable = relocated(config, renames)
    header = [f"# Rebuild: `mergecore moe {CONFIG_FILE} OUT` in this folder (see README.md)."]
    if local:
        header.append("# Local models are paths relative to this file; put each model's folder there first: "
                      + ", ".join(local) + ".")
    try:
        architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        architecture = "MoEForCausalLM"
    card = moe_card(portable, str(architecture))
    if local:
        card += "\nLocal models (paths relative to the config): " + ", ".join(f"`{m}`" for m in local) + "\n"
    return PortableMoE(portable, "\n".join(header) + "\n" + moe_config_yaml(portable), card, local)
