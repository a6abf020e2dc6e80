"""Opt-in research code: paper toys, the main job's data and evaluation, offline models, token analysis."""
