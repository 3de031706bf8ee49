"""Start mergecore on its built-in demo.

Until the Gradio app lands this runs a demo merge of locally built synthetic models and prints
where the checkpoint is.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="mergecore demo")
    parser.add_argument("--out", default=None, help="where to write the demo merge")
    args = parser.parse_args(argv)

    from mergecore.demo import build_synthetic_llamas, cache_root, demo_recipe
    from mergecore.executor import merge

    print("building demo models (synthetic tiny Llamas) ...", flush=True)
    models = build_synthetic_llamas()
    recipe = demo_recipe(models)
    out = args.out or str(cache_root() / "demo-merge")
    print("recipe:\n" + recipe.to_yaml())
    result = merge(recipe, out)
    print(result.summary())
    print(f"merged checkpoint: {result.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
