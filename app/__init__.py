"""mergecore's Gradio app (`python launch.py`). Tabs call the engine; no merge logic lives here.

    from app.ui import build_app, make_context, launch_kwargs
"""
