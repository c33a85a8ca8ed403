"""Per-example attributions from a store: row selection, fit, evaluate.
"""
