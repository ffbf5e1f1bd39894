"""Knowing what the model does not know: the rejection threshold for images of no known class
(``rejection``), conformal prediction sets (``conformal``), fitted on the validation split at
the end of finetune and measured by evaluate, and ``audit`` (likely label errors, outliers and
near-duplicates in a labelled folder). Predict applies the rejection and the sets through
``transferkit.inference.uncertainty``, which needs nothing from this package. Sits with
evaluation: above inference and training, below workflow."""
