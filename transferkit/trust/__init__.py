"""Knowing what the model does not know: the rejection threshold for images of no known class
(``rejection``), conformal prediction sets (``conformal``), fitted on the validation split at
the end of finetune and measured by evaluate. Predict applies them through
``transferkit.inference.uncertainty``, which needs nothing from this package."""
