"""Differentiable Adaptive Merging (DAM) and layer-wise AdaMerging: train merging coefficients.

    from mergecore.search.dam import load_dam_config, run_dam
    cfg, root = load_dam_config("dam.yml")
    summary = run_dam(cfg, root, "out/", on_event=print)      # out/recipe.yml replays with `mergecore merge`

`config` (the YAML, the loop's settings, the recipe), `merger` (which tensors get coefficients,
the merged tensors), `data` (D_i and teacher outputs), `losses`, `search` (the loop: events,
cancel, checkpoints, resume), `run` (DAM as a search of the one program: loading, teachers,
training; a background-thread job).
"""

from mergecore.search.dam.run import DAMConfig, DAMJob, DAMRun, dam_recipe, load_dam_config, prepare_dam, run_dam

__all__ = ["DAMConfig", "DAMJob", "DAMRun", "dam_recipe", "load_dam_config", "prepare_dam", "run_dam"]
