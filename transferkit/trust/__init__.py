"""Knowing what the model does not know: ``audit`` (likely label errors, outliers and
near-duplicates in a labelled folder). Sits with evaluation: above inference and training,
below workflow.
"""
