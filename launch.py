"""Start the mergecore app: `python launch.py [--host 127.0.0.1] [--port 7860] [--share] [--allow-dir DIR]`.

On first run the built-in demo models are built locally (no download; a progress bar is
printed): by default the miniature fmnist-vit family, a small ViT and four experts trained on
Fashion-MNIST and digits in about a minute on a CPU (`--demo-family synthetic-llama` for three
tiny random Llamas instead). Then the app opens on them. Everything the app writes goes under
--work-dir. A path typed into the app is only read inside the work dir, the demo dir, the Hugging
Face cache and the folders given with --allow-dir (repeatable; `app.paths`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="mergecore: the model-merging workbench (Gradio app)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--demo-dir", default=None, help="where the demo models are built and cached "
                        "(default: $MERGECORE_CACHE/demo, i.e. ~/.cache/mergecore/demo)")
    parser.add_argument("--demo-family", default=None, help="which built-in demo family to open on: fmnist-vit-mini "
                        "(default; small ViTs trained here on first run) or synthetic-llama (random tiny Llamas)")
    parser.add_argument("--no-demo", action="store_true", help="start without building or loading the demo models")
    parser.add_argument("--work-dir", default=None, help="where merges and downloads are written "
                        "(default: $MERGECORE_CACHE/app)")
    parser.add_argument("--zip-limit", default="2GB", help="largest checkpoint offered as a zip download (default 2GB)")
    parser.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                        help="a folder whose models and tasks files the app may read, besides the work dir, the demo "
                             "dir and the Hugging Face cache (repeatable)")
    args = parser.parse_args(argv)

    from mergecore.demo import cache_root
    from mergecore.errors import MergeError
    from mergecore.io.writer import parse_size

    from app.demo_family import build_demo_family

    for d in args.allow_dir:  # before the demo is built: a typo should not cost a minute
        if not os.path.isdir(os.path.expanduser(d)):
            print(f"error: --allow-dir {d}: not a folder", file=sys.stderr)
            return 2

    family = None
    if not args.no_demo:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        start = time.time()
        print("preparing the demo models (built locally on first run; cached afterwards) ...", flush=True)

        last = [""]

        def progress(ev):
            d = ev.data
            frac = d.get("fraction", 0) or 0
            bar = "#" * int(30 * frac)
            line = f"  [{bar:<30}] {100 * frac:5.1f}%  {time.time() - start:5.0f} s  {str(d.get('stage', ''))[:60]}"
            if line != last[0]:
                last[0] = line
                print(f"\r{line:<110}", end="", flush=True)

        try:
            family = build_demo_family(args.demo_family, args.demo_dir, progress=progress)
        except MergeError as err:
            if args.demo_family or os.environ.get("MERGECORE_DEMO_FAMILY"):
                print(f"\nerror: {err}", file=sys.stderr)
                return 2
            # e.g. Fashion-MNIST is not installed: open on the synthetic demo rather than not at all
            print(f"\n  the default demo could not be built: {err}\n  opening on the synthetic demo instead "
                  f"(--demo-family synthetic-llama)", flush=True)
            family = build_demo_family("synthetic-llama", args.demo_dir, progress=progress)
        print(f"\n  {family.title}: {len(family.models)} models ready in {time.time() - start:.1f} s", flush=True)

    from app.ui import build_app, launch_kwargs, make_context

    try:
        ctx = make_context(args.work_dir or (cache_root() / "app"), demo=family, zip_limit=parse_size(args.zip_limit),
                           allowed_dirs=args.allow_dir, demo_dir=args.demo_dir)
    except MergeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    demo = build_app(ctx)
    demo.queue(default_concurrency_limit=4)
    from mergecore.io.outdir import install_signal_handlers

    # merges run in worker threads: on Ctrl-C / SIGTERM / SIGHUP the main thread removes their
    # temporary folders (the process-wide registry) before the app stops
    install_signal_handlers()
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_kwargs(ctx))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.exit(main())
