"""Staged fine-tuning.

    stages.py       the stage story: ``run_stages``, and ``begin_stage`` (freeze -> feature
                    cache -> head BatchNorm statistics -> recompile) that lr-find and
                    doctor --model share
    compile.py      the optimizer, learning-rate schedule and loss of a stage
    features.py     the frozen-part feature cache, and the forward passes in Keras
    callbacks.py    per-epoch bookkeeping, resumable early stopping, eager validation
    checkpoint.py   RUN.partial: checkpoints after every epoch, resume, the signal handlers
    tensorboard.py  one TensorBoard log across the stages
    tracking.py     MLflow tracking: params, per-epoch metrics across stages, files, the model
"""
