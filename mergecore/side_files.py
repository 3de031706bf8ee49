"""Files written beside the weights: config, generation config, tokenizer, chat template, model
card and the recipe. They follow the plan (its reference model, tokenizer donor, vocabulary),
so this module sits above `plan`, while `io/` stays below it.

A checkpoint carries what replays it: its recipe (`mergecore_recipe.yml`) with the recipe's
artifacts copied under `artifacts/` and named there. `portable_checkpoint` is what an export
ships: the same recipe with Hub models by id and local ones as `models/<folder name>` (relative
to the recipe, where the card says to put them), so `mergecore merge mergecore_recipe.yml OUT`
run in the unpacked folder gives the same tensors.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from mergecore.errors import MergeError
from mergecore.io.adapter import source_folders
from mergecore.io.lora_config import split_adapter_ref
from mergecore.io.source import is_hub_id, read_json_file, read_json_object
from mergecore.io.writer import ShardedWriter
from mergecore.methods import get_method
from mergecore.plan import Plan
from mergecore.recipe import Recipe, load_recipe, recipe_from_dict

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
    "chat_template.jinja", "chat_template.json",
)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "image_processor_config.json")

# Short, well-known chat templates selectable by name (as in mergekit).
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
        " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}


def _tokenizer_donor(plan: Plan) -> Optional[str]:
    src = plan.tokenizer_source
    if src in (None, "base"):
        return plan.base or plan.reference
    if src == "union":  # the base's tokenizer, extended by the vocabulary plan when vocabularies differ
        return plan.base or plan.reference
    return src


def _chat_template(plan: Plan) -> Optional[str]:
    spec = plan.recipe.chat_template
    if not spec:
        return None
    if spec == "auto":
        found = []
        for src in plan.sources.values():
            jinja = src.path / "chat_template.jinja"
            cfg = src.path / "tokenizer_config.json"
            if jinja.is_file():
                found.append(jinja.read_text())
            elif cfg.is_file():
                t = read_json_object(cfg, f"model '{src.ref}': {cfg.name}").get("chat_template")
                if isinstance(t, str):
                    found.append(t)
        return Counter(found).most_common(1)[0][0] if found else None
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    if "{" not in spec or len(spec) < 20:
        raise MergeError(
            f"chat_template '{spec[:40]}' is neither a known name ({', '.join(CHAT_TEMPLATES)}, auto) "
            f"nor a Jinja template"
        )
    return spec


RECIPE_FILE = "mergecore_recipe.yml"
CARD_FILE = "README.md"
ARTIFACTS_DIR = "artifacts"  # the recipe's artifacts, beside the weights (never at the top: *.safetensors there are weights)
MODELS_DIR = "models"  # where an exported recipe expects its local models, relative to the recipe
CARD_TAGS = ("merge", "mergecore")

# scores for the card: {task: score} of this model, {model: {task: score}} or rows [{"model": ..., task: score}]
Scores = Union[Mapping[str, Any], Sequence[Mapping[str, Any]]]


def relocate(recipe: Recipe, models: Optional[Mapping[str, str]] = None,
             artifacts: Optional[Mapping[str, str]] = None) -> Recipe:
    """A copy of `recipe` with its models renamed (`models`: old reference -> new, wherever a model
    is named: base, models, slices, non_layer_from, the tokenizer's source and token sources) and
    artifact paths replaced (`artifacts`: key -> new path). Nothing else changes."""
    models = dict(models or {})
    if not models and not artifacts:
        return recipe
    data = recipe.model_dump(exclude_none=True, mode="json")

    def ren(ref: Any) -> Any:
        return models.get(ref, ref) if isinstance(ref, str) else ref

    for key in ("base_model", "non_layer_from"):
        if key in data:
            data[key] = ren(data[key])
    if data.get("tokenizer_source") not in (None, "base", "union"):
        data["tokenizer_source"] = ren(data["tokenizer_source"])
    for m in data.get("models", []):
        m["model"] = ren(m["model"])
    for s in data.get("slices", []):
        if "base_model" in s:
            s["base_model"] = ren(s["base_model"])
        for src in s["sources"]:
            src["model"] = ren(src["model"])
    tok = data.get("tokenizer") or {}
    if tok.get("source") not in (None, "base", "union"):
        tok["source"] = ren(tok["source"])
    for spec in (tok.get("tokens") or {}).values():
        src = spec.get("source") if isinstance(spec, dict) else None
        if isinstance(src, str):
            spec["source"] = ren(src)
        elif isinstance(src, dict) and "model" in src:
            src["model"] = ren(src["model"])
    if artifacts and data.get("artifacts"):
        data["artifacts"] = {k: artifacts.get(k, v) for k, v in data["artifacts"].items()}
    return recipe_from_dict(data, "recipe")


def shipped_artifacts(artifacts: Mapping[str, str | Path]) -> dict[str, str]:
    """key -> where an artifact goes beside the weights: `artifacts/<its file name>` (a second file
    of the same name: `artifacts/<key>-<name>`)."""
    out: dict[str, str] = {}
    for key, path in artifacts.items():
        name = Path(path).name
        if f"{ARTIFACTS_DIR}/{name}" in out.values():
            name = re.sub(r"[^\w.\-]+", "-", str(key)) + "-" + name
        out[key] = f"{ARTIFACTS_DIR}/{name}"
    return out


def hub_snapshot_id(path: str | Path) -> Optional[str]:
    """'org/name@commit' for a folder of the Hugging Face cache (.../models--org--name/snapshots/<commit>)."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-3].startswith("models--") and parts[-2] == "snapshots":
        repo = parts[-3][len("models--"):].replace("--", "/", 1)
        if is_hub_id(repo):
            return f"{repo}@{parts[-1]}"
    return None


def model_origin(ref: str, path: Optional[str | Path] = None) -> tuple[str, str]:
    """('hub', id) for a Hub model -- a Hub id as written, or a folder of the Hub cache as
    'org/name@commit' -- or ('local', its folder's name). `path`: where the merge found it."""
    p = Path(ref).expanduser()
    if path is not None:
        snap = hub_snapshot_id(path)
        if snap:
            return "hub", ref if is_hub_id(ref) else snap
        return "local", Path(path).name or "model"
    if is_hub_id(ref) and not p.is_dir():
        return "hub", ref
    snap = hub_snapshot_id(p)
    return ("hub", snap) if snap else ("local", p.name or "model")


def _sides(ref: str, paths: Optional[Mapping[str, str | Path]]) -> Optional[tuple[str, str]]:
    """The (base, adapter) of a `BASE+ADAPTER` reference; None for a plain one, also for one that
    `paths` records whole but not by its sides (a folder with '+' in its name)."""
    try:
        sides = split_adapter_ref(ref)
    except MergeError:
        return None
    if sides and paths is not None and ref in paths and not all(s in paths for s in sides):
        return None
    return sides


def _origin(ref: str, paths: Optional[Mapping[str, str | Path]], local: Sequence[str] = ()) -> tuple[str, str]:
    """`model_origin` of a reference, side by side for `BASE+ADAPTER` ('hub' when both sides
    are; the names joined by '+'); a reference in `local` is an exported recipe's local model."""
    sides = _sides(ref, paths)
    if sides is None:
        return ("local", Path(ref).name) if ref in local else model_origin(ref, (paths or {}).get(ref))
    got = [_origin(s, paths, local) for s in sides]
    return ("hub" if all(k == "hub" for k, _ in got) else "local"), "+".join(n for _, n in got)


def portable_models(recipe: Recipe, paths: Optional[Mapping[str, str | Path]] = None
                    ) -> tuple[dict[str, str], dict[str, str]]:
    """(renames, local) for a recipe that travels: Hub models keep their ids (a Hub cache folder
    becomes 'org/name@commit'); a local model becomes `models/<its folder's name>` (-2, -3 ... when
    two differ), a path relative to the recipe; each side of a `BASE+ADAPTER` reference is renamed
    so. `local`: new reference -> the folder it was here."""
    renames: dict[str, str] = {}
    local: dict[str, str] = {}

    def port(ref: str) -> str:
        path = (paths or {}).get(ref)
        kind, name = model_origin(ref, path)
        if kind == "hub":
            return name
        where = str(Path(path) if path is not None else Path(ref).expanduser().absolute())
        same = next((new for new, w in local.items() if w == where), None)
        new, i = same or f"{MODELS_DIR}/{name}", 2
        while same is None and new in local:
            new, i = f"{MODELS_DIR}/{name}-{i}", i + 1
        local[new] = where
        return new

    for ref in recipe.referenced_models():
        renames[ref] = "+".join(port(s) for s in _sides(ref, paths) or (ref,))
    return renames, local


def _score_rows(scores: Scores) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(scores, Mapping):
        if scores and all(isinstance(v, Mapping) for v in scores.values()):
            return [(str(k), dict(v)) for k, v in scores.items()]
        return [("this model", dict(scores))]
    rows = []
    for r in scores:
        r = dict(r)
        rows.append((str(r.pop("model", "this model")), r))
    return rows


def _scores_table(scores: Scores) -> list[str]:
    rows = _score_rows(scores)
    cols = list(dict.fromkeys(k for _, r in rows for k in r))
    if not rows or not cols:
        return []

    def cell(v: Any) -> str:
        if isinstance(v, float) and v != v:  # NaN: a task this model was not scored on
            return ""
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{v:.4f}"
        return "" if v is None else str(v).replace("|", "\\|")

    out = ["| model | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    out += ["| " + " | ".join([name.replace("|", "\\|"), *(cell(r.get(c)) for c in cols)]) + " |" for name, r in rows]
    return out


def model_card(recipe: Recipe | Plan, scores: Optional[Scores] = None, *,
               paths: Optional[Mapping[str, str | Path]] = None, local: Optional[Sequence[str]] = None,
               title: Optional[str] = None, hub_only: bool = False) -> str:
    """The model card (README.md): YAML front matter (`base_model`: the base's Hub id or local
    folder name -- every model's when there is no base; `library_name`; `tags: [merge,
    mergecore]`), the method, the source models, the scores when given and the recipe.

    `paths`: where the merge found each model (tells Hub cache folders from local ones). `local`:
    the references of an exported recipe's local models (`models/...`): the card then says where
    they go to replay it. `hub_only`: `base_model` names Hub models only (the Hub refuses a card
    whose `base_model` is not a model on the Hub)."""
    if isinstance(recipe, Plan):
        paths = paths if paths is not None else source_folders(recipe.sources)
        recipe = recipe.recipe
    method = get_method(recipe.merge_method)
    refs = recipe.referenced_models()
    origin = {r: _origin(r, paths, local or ()) for r in refs}
    # a BASE+ADAPTER model's base is the Hub model the card descends from
    meta_origin = {r: _origin((_sides(r, paths) or (r,))[0], paths, local or ()) for r in refs}
    base = recipe.base_model or next((s.base_model for s in recipe.slices or [] if s.base_model), None)
    named = [r for r in ([base] if base else refs) if not hub_only or meta_origin[r][0] == "hub"]
    names = list(dict.fromkeys(meta_origin[r][1].split("@", 1)[0] for r in named))
    meta: dict[str, Any] = {}
    if names:
        meta["base_model"] = names[0] if base else names
    meta.update(library_name="transformers", tags=list(CARD_TAGS))
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, default_flow_style=None).rstrip(), "---", "",
             f"# {title or Path(str(recipe.name or 'merged-model')).name}", "",
             f"This model was merged with [mergecore](https://pypi.org/project/mergecore/) using the "
             f"**{method.name}** method ({method.summary})."]
    if method.paper:
        lines.append(f"Reference: {method.paper}.")
    lines += ["", "## Source models", ""]
    for r in refs:
        kind, name = origin[r]
        shown = (" + ".join(f"[{n}](https://huggingface.co/{n.split('@', 1)[0]})" for n in name.split("+"))
                 if kind == "hub" and r == name else f"`{r}`")
        lines.append(f"- {shown}" + (" (base)" if r == base else "") + (" (local)" if kind == "local" else ""))
    if scores:
        table = _scores_table(scores)
        if table:
            lines += ["", "## Evaluation", "", *table]
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", ""]
    if local is not None:
        lines += ["## Replay", "", f"From this folder, `mergecore merge {RECIPE_FILE} OUT` writes these weights again "
                  "(the same tensors)."]
        if recipe.artifacts:
            lines.append(f"The files the method reads are in `{ARTIFACTS_DIR}/`.")
        if any(origin[r][0] == "hub" for r in refs):
            lines.append("Hub models are fetched by their ids.")
        if local:
            lines += ["Local models are named relative to this folder; put (or link) each model's folder there "
                      "first:", "", *(f"- `{r}`" for r in local)]
        lines.append("")
    return "\n".join(lines)


@dataclass
class PortableCheckpoint:
    """What an export of a checkpoint ships so that its recipe replays from the unzipped folder."""

    recipe: Recipe  # Hub models by id, local ones as models/<name>, artifacts under artifacts/
    recipe_text: str  # the recipe as written (a comment on where its local models go, then the YAML)
    card: str  # README.md for it (scores included when given)
    files: dict[str, Path]  # relative path -> file to add (artifacts the folder lacks)
    local_models: dict[str, str]  # the recipe's local model reference -> the folder it was merged from


def portable_checkpoint(folder: str | Path, *, paths: Optional[Mapping[str, str | Path]] = None,
                        artifacts: Optional[Mapping[str, str | Path]] = None, scores: Optional[Scores] = None,
                        title: Optional[str] = None, hub_only: bool = False) -> PortableCheckpoint:
    """The recipe, card and extra files that make the merged checkpoint in `folder` replayable
    anywhere: `mergecore merge mergecore_recipe.yml OUT` from the unpacked folder gives the same
    tensors, once its local models are at the `models/...` paths the recipe names (relative to
    the recipe; the card lists them). Hub ids stay ids; every artifact is inside (`artifacts/`).

    `paths` / `artifacts`: where the merge found its models and artifacts (a `Plan`'s `sources`
    and `artifacts`), for those the folder's recipe names relatively; without them, paths are
    taken as they are written."""
    folder = Path(folder)
    recipe = load_recipe(folder / RECIPE_FILE)
    files: dict[str, Path] = {}
    moved: dict[str, str] = {}
    wanted = shipped_artifacts(recipe.artifacts or {})
    for key, ref in (recipe.artifacts or {}).items():
        inside = (folder / ref).resolve()
        if not Path(ref).is_absolute() and inside.is_file() and inside.is_relative_to(folder.resolve()):
            continue  # already beside the weights (the engine puts them there)
        src = Path((artifacts or {}).get(key) or Path(ref).expanduser())
        if not src.is_absolute() or not src.is_file():
            raise MergeError(f"artifact '{key}' ({ref}) of the merge in {folder.name} is not in its folder and was "
                             f"not found; merge the recipe again to export it")
        moved[key] = wanted[key]
        files[wanted[key]] = src
    renames, local = portable_models(recipe, paths)
    portable = relocate(recipe, renames, moved)
    header = [f"# Replay: `mergecore merge {RECIPE_FILE} OUT` in this folder (see README.md)."]
    if local:
        header.append("# Local models are paths relative to this file; put each model's folder there first: "
                      + ", ".join(local) + ".")
    card = model_card(portable, scores, local=list(local), title=title or folder.name, hub_only=hub_only)
    return PortableCheckpoint(portable, "\n".join(header) + "\n" + portable.to_yaml(), card, files, local)

def write_side_files(writer: ShardedWriter, plan: Plan, scores: Optional[Scores] = None) -> None:
    """config.json, generation_config.json, tokenizer/processor files, chat template, the recipe
    (`mergecore_recipe.yml`, its artifacts copied under `artifacts/`) and the model card
    (`README.md`, with `scores` when given)."""
    ref = plan.sources[plan.reference]
    if plan.config:
        writer.add_file("config.json", json.dumps(plan.config, indent=2) + "\n")
    gen_src = plan.sources[plan.base] if plan.base else ref
    gen = gen_src.path / "generation_config.json"
    vocab = plan.vocab
    if gen.is_file() and vocab is not None and vocab.id_map:
        try:  # special token ids renumbered to the output vocabulary
            data = read_json_file(gen, gen.name)
        except MergeError:  # not JSON: copied unchanged, as transformers would meet it in the source
            data = None
        if isinstance(data, dict):
            writer.add_file(gen.name, json.dumps(vocab.translate_ids(data), indent=2) + "\n")
        else:
            writer.copy_file(gen)
    elif gen.is_file():
        writer.copy_file(gen)
    donor = vocab.donor if vocab is not None else _tokenizer_donor(plan)
    if donor is not None:
        dpath = plan.sources[donor].path
        built = vocab is not None and vocab.tokenizer is not None
        for fname in (PROCESSOR_FILES if built else TOKENIZER_FILES + PROCESSOR_FILES):
            if (dpath / fname).is_file():
                writer.copy_file(dpath / fname)
        if built:  # the union (or extended) tokenizer, saved by transformers
            vocab.save_tokenizer(writer.tmp_dir)
    template = _chat_template(plan)
    if template:
        writer.add_file("chat_template.jinja", template)
        cfg = writer.tmp_dir / "tokenizer_config.json"
        if cfg.is_file():
            data = read_json_object(cfg, f"{cfg.name} of the tokenizer")
            if "chat_template" in data:
                data["chat_template"] = template
                cfg.write_text(json.dumps(data, indent=2))
    # the recipe's artifacts travel with the checkpoint (artifacts/), and its recipe names them there
    shipped = shipped_artifacts(plan.artifacts)
    for key, rel in shipped.items():
        writer.copy_file(plan.artifacts[key], rel)
    recipe = relocate(plan.recipe, artifacts=shipped)
    writer.add_file(RECIPE_FILE, recipe.to_yaml())
    writer.add_file(CARD_FILE, model_card(recipe, scores=scores, paths=source_folders(plan.sources)))
