"""How good a run is and why: metrics, calibration, figures, evaluation of a labelled folder,
test-time augmentation and Grad-CAM.

    metrics.py       accuracy, per-class scores, log loss, ECE, Brier, ROC/PR (scikit-learn)
    calibration.py   temperature scaling folded into the output layer
    figures.py       confusion, top losses, reliability, ROC / PR, history (matplotlib objects)
    evaluate.py      evaluate_folder: stream a labelled folder through an engine; write_evaluation
    tta.py           deterministic test-time variants and the engine that averages them
    gradcam.py       explain: Grad-CAM heatmaps at the backbone's last convolutional layer
    card.py          MODEL_CARD.md of a run (Hugging Face layout), and ``report`` that refreshes it
"""
