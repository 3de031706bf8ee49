"""Offline model families (a base, fine-tuned experts, tasks), built locally and cached.

    from mergecore.families import build_family, load_family
    fam = build_family("fmnist-vit", quick=False, progress=..., cancel=...)   # cached after the first build
    fam.base, fam.experts, fam.tasks("test"), fam.evaluator("val", subset=0.05)
"""

from mergecore.families.base import (
    Family,
    FamilyProgress,
    build_family,
    families_root,
    family_dir,
    family_names,
    get_builder,
    get_family,
    load_family,
    register_family,
)

__all__ = ["Family", "FamilyProgress", "build_family", "families_root", "family_dir", "family_names", "get_builder",
           "get_family", "load_family", "register_family"]
