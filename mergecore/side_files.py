"""Files written beside the weights: config, generation config, tokenizer, chat template, model
card and the recipe. They follow the plan (its reference model, tokenizer donor, vocabulary),
so this module sits above `plan`, while `io/` stays below it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

from mergecore.errors import MergeError
from mergecore.io.source import read_json_file, read_json_object
from mergecore.io.writer import ShardedWriter
from mergecore.plan import Plan

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


def model_card(plan: Plan) -> str:
    models = list(plan.sources)
    front = ["---", "library_name: transformers", "tags:", "- mergecore", "- merge"]
    hub = [m for m in models if not Path(m).exists()]
    if hub:
        front.append("base_model:")
        front += [f"- {m}" for m in hub]
    front.append("---")
    lines = front + [
        "",
        f"# {Path(str(plan.recipe.name or 'merged-model')).name}",
        "",
        f"This model was merged with [mergecore](https://pypi.org/project/mergecore/) using the "
        f"**{plan.method.name}** method ({plan.method.summary}).",
    ]
    if plan.method.paper:
        lines.append(f"Reference: {plan.method.paper}.")
    lines += ["", "## Source models", ""]
    for m in models:
        tag = " (base)" if m == plan.base else ""
        lines.append(f"- {m}{tag}")
    lines += ["", "## Recipe", "", "```yaml", plan.recipe.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


def write_side_files(writer: ShardedWriter, plan: Plan) -> None:
    """config.json, generation_config.json, tokenizer/processor files, chat template, README."""
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
    writer.add_file("mergecore_recipe.yml", plan.recipe.to_yaml())
    writer.add_file("README.md", model_card(plan))
