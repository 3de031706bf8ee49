"""Task kinds, one module each; `mergecore.eval.tasks` imports every module here.

A new kind is one new module in this folder (see `mergecore.eval.kind` for what it defines).
"""
