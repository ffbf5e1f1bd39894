"""Choosing hyperparameters and telling why a network does not learn.

    search.py        the hyperparameter search on Optuna (``transferkit tune``)
    space.py         the recipe's ``[tune]`` section as a search space
    objective.py     the validation metrics a study can optimize, each with its direction
    lr_find.py       the learning-rate range test of one stage (``find_learning_rate``), and
                     the stage's set-up it runs on, shared with the learning checks
    diagnostics.py   the learning checks of ``transferkit doctor --model`` (``check_learning``)
"""
