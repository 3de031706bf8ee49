"""Start the mergecore app: `python launch.py [--host 127.0.0.1] [--port 7860] [--share] [--allow-dir DIR]`.

The page is served at once. The built-in demo models are built meanwhile, on a background thread
(locally, no download; cached afterwards, so later starts only load them): by default the
miniature fmnist-vit family, a small ViT and four experts trained on Fashion-MNIST and digits in
about a minute on a CPU (`--demo-family synthetic-llama` for three tiny random Llamas instead).
The Models tab shows the build's stage, percent and seconds (the terminal a progress bar), loads
the demo into the pages that have no models yet when it is done and offers it to the others; Hub
or local models can be added meanwhile. If the default demo cannot be built, the page says why
in one line and opens on the synthetic demo. Everything the app writes goes under --work-dir. A
path typed into the app is only read inside the work dir, the demo dir, the Hugging Face cache
and the folders given with --allow-dir (repeatable; `app.paths`).
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

    for d in args.allow_dir:  # before the demo is built: a typo should not cost a minute
        if not os.path.isdir(os.path.expanduser(d)):
            print(f"error: --allow-dir {d}: not a folder", file=sys.stderr)
            return 2

    if not args.no_demo:  # an unknown family is refused before anything starts
        from app.demo_family import PROVIDERS

        name = args.demo_family or os.environ.get("MERGECORE_DEMO_FAMILY")
        if name and name not in PROVIDERS:
            print(f"error: unknown demo family '{name}'; known: {', '.join(PROVIDERS)}", file=sys.stderr)
            return 2

    from app.tabs.models import start_demo_build
    from app.ui import build_app, launch_kwargs, make_context

    try:
        ctx = make_context(args.work_dir or (cache_root() / "app"), zip_limit=parse_size(args.zip_limit),
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
    # the page first (Gradio prints its address), then the demo build behind it
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
                **launch_kwargs(ctx))
    if not args.no_demo:
        build_in_background(ctx, args.demo_family, start_demo_build)
    demo.block_thread()
    return 0


def build_in_background(ctx, name, start_demo_build) -> None:
    """Build the demo family behind the served page, with a progress bar in the terminal (the
    Models tab shows the same progress); a failed default build falls back to the synthetic demo."""
    import threading

    import transformers

    transformers.utils.logging.disable_progress_bar()
    print("building the demo models in the background (cached after the first run; the page is up) ...", flush=True)
    last, start = [""], time.time()

    def progress(ev):
        d = ev.data
        frac = d.get("fraction", 0) or 0
        line = (f"  [{'#' * int(30 * frac):<30}] {100 * frac:5.1f}%  {time.time() - start:5.0f} s  "
                f"{str(d.get('stage', ''))[:60]}")
        if line != last[0]:
            last[0] = line
            print(f"\r{line:<110}", end="", flush=True)

    fallback = not (name or os.environ.get("MERGECORE_DEMO_FAMILY"))
    build = start_demo_build(ctx, name, fallback=fallback, on_progress=progress)

    def report() -> None:
        build.wait()
        if build.note:
            print(f"\n  {build.note}", flush=True)
        if build.family is None:
            print(f"\nerror: the demo models could not be built: {build.error}", file=sys.stderr, flush=True)
        else:
            print(f"\n  {build.family.title}: {len(build.family.models)} models ready in {build.elapsed:.1f} s",
                  flush=True)

    threading.Thread(target=report, name="mergecore-demo-report", daemon=True).start()


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.exit(main())
