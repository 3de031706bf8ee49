"""Mixtures of experts from dense models (mergekit-moe's config format): `build.py` streams the
checkpoint, `gates.py` computes the router rows from the experts' prompts, `arch.py` says which
inputs make which mixture (Mixtral, Qwen2-MoE) and its tensor names, `config.py` the YAML schema;
`cli.py` is the thin `mergecore moe` command."""
