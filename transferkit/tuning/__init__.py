"""Hyperparameter search and learning diagnostics: ``search`` (``transferkit tune`` on Optuna),
``space`` (the recipe's ``[tune]`` section as a search space)."""
