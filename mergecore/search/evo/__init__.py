"""Evolutionary merge search: CMA-ES over the free parameters of a recipe template."""
