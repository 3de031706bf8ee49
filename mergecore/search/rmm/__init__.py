"""Reinforced Model Merging: a PPO agent picks, layer by layer, a source model or a merge operator."""
