"""Ready-made experiments: models and examples that need no download."""
