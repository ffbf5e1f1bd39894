"""Calibrated confidences: one temperature, fitted on validation images, folded into the model.

Temperature scaling divides the output layer's pre-activations (logits) by one T > 0 chosen to
minimise the validation log loss. Dividing the output Dense's kernel and bias by T computes
exactly that (softmax((Wx + b) / T) = softmax((W / T) x + b / T), and likewise for a sigmoid
unit), so the saved model.keras keeps built-in layers only: ``keras.models.load_model``
without transferkit gives the calibrated probabilities, and since T > 0 rescales every logit
alike, no image's top class changes.

    result = calibrate(model, val_images, val_labels, n_classes)   # folds T into the model
    metrics["calibration"] = result.as_dict()
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from transferkit.inference.passes import eager_call_size
from transferkit.outputs import is_binary

log = logging.getLogger("transferkit")

HEAD = "head"
OUTPUT = "output"
# Temperatures are searched in [exp(-LOG_T_BOUND), exp(LOG_T_BOUND)], about 0.007 .. 150.
LOG_T_BOUND = 5.0
# Up to this many images the network is called eagerly: ``predict_on_batch`` first traces a
# function of the whole network (a second for ResNet50 on two cores), which pays off only
# over more batches than a small validation split has.
EAGER_UP_TO = 64


@dataclass(frozen=True)
class Calibration:
    """What temperature scaling did on the validation images.

    Attributes:
        temperature: the T folded into the model (1.0: the model was left as it was).
        fitted_temperature: the T that minimises the validation log loss.
        ece_before, ece_after: expected calibration error (15 bins) before and after.
        log_loss_before, log_loss_after: validation log loss before and after.
        n_images: validation images it was fitted on.
    """

    temperature: float
    fitted_temperature: float
    ece_before: float
    ece_after: float
    log_loss_before: float
    log_loss_after: float
    n_images: int

    def as_dict(self) -> dict:
        """The fields as a JSON-ready dict (for the run's metrics.json)."""
        return asdict(self)


def output_layer(model):
    """The classifier's output Dense (the layer named "output" inside the nested "head")."""
    return model.get_layer(HEAD).get_layer(OUTPUT)


def logits_of(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The exact pre-activation outputs of the classifier's output layer, in float64.

    The model is run up to the output Dense's input (called eagerly for up to
    ``EAGER_UP_TO`` images, in calls of up to ``inference.passes.EAGER_PIXELS`` pixels, else
    through ``predict_on_batch`` a batch at a time); x @ W + b is then computed in float64.

    Args:
        model: a transferkit classifier (image -> "preprocessing" -> "backbone" -> "head").
        images: (n, H, W, 3) images as the model takes them (uint8 or float, 0..255).
        batch_size: images per forward pass; default 32.

    Returns:
        (n, units) float64 logits: (n, 1) for a sigmoid unit, (n, k) for a softmax.
    """
    import keras

    from transferkit.model.surgery import readout_at

    readout = readout_at(model)
    penultimate = keras.Model(readout.input, readout.outputs[1], name="penultimate")
    eager = len(images) <= EAGER_UP_TO
    if eager:  # nothing traced: as many images a call as the work after training takes
        batch_size = eager_call_size(batch_size, int(images.shape[1]) * int(images.shape[2]))
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], dtype="float32")
        outputs = penultimate(batch, training=False) if eager else penultimate.predict_on_batch(batch)
        chunks.append(np.asarray(keras.ops.convert_to_numpy(outputs), dtype="float64"))
    return logits_from(model, np.concatenate(chunks) if chunks else np.zeros((0, penultimate.output.shape[-1])))


def logits_from(model, dense_inputs: np.ndarray) -> np.ndarray:
    """(n, units) float64 logits from the output Dense's inputs (``logits_of``'s, or the
    run's ``training.stages.ValidationReadout``): x @ W + b computed in float64."""
    kernel, bias = (np.asarray(weight, dtype="float64") for weight in output_layer(model).get_weights())
    return np.asarray(dense_inputs, dtype="float64") @ kernel + bias


def probabilities_from_logits(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(n, k) class probabilities of logits divided by ``temperature`` (a sigmoid for one
    unit, giving [1 - p, p]; a softmax else), in float64."""
    from scipy.special import expit, softmax

    scaled = np.asarray(logits, dtype="float64") / temperature
    if scaled.shape[1] == 1:
        p = expit(scaled[:, 0])
        return np.stack([1.0 - p, p], axis=1)
    return softmax(scaled, axis=1)


def _log_loss(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the labels, computed stably from the logits."""
    from scipy.special import log_expit, log_softmax

    scaled = logits / temperature
    if scaled.shape[1] == 1:
        z = scaled[:, 0]
        return float(-np.mean(np.where(labels == 1, log_expit(z), log_expit(-z))))
    return float(-np.mean(log_softmax(scaled, axis=1)[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """The temperature T > 0 that minimises the log loss of ``logits / T``.

    Args:
        logits: (n, 1) for two classes (a sigmoid unit) or (n, k) (softmax), from ``logits_of``.
        labels: class index per image.
        n_classes: the number of classes.

    Returns:
        T (1.0 for no images). The log loss is convex in 1 / T, so the bounded search on
        log T finds its minimum.

    Raises:
        ValueError: logits whose width does not fit ``n_classes``.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype="float64")
    labels = np.asarray(labels, dtype="int64")
    units = 1 if is_binary(n_classes) else n_classes
    if logits.ndim != 2 or logits.shape[1] != units:
        raise ValueError(f"logits of shape {logits.shape} do not fit {n_classes} classes ({units} unit(s))")
    if len(labels) == 0:
        return 1.0
    found = minimize_scalar(lambda log_t: _log_loss(logits, labels, math.exp(log_t)),
                            bounds=(-LOG_T_BOUND, LOG_T_BOUND), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


def apply_temperature(model, temperature: float):
    """Fold 1 / T into the output Dense's kernel and bias, in place.

    Args:
        model: a transferkit classifier.
        temperature: T > 0.

    Returns:
        The same model, now giving the probabilities of logits / T.

    Raises:
        ValueError: T is not a positive finite number.
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    dense = output_layer(model)
    kernel, bias = dense.get_weights()
    dense.set_weights([(kernel / temperature).astype(kernel.dtype), (bias / temperature).astype(bias.dtype)])
    return model


def calibrate(model, val_images: np.ndarray, val_labels: np.ndarray, n_classes: int,
              batch_size: int = 32, dense_inputs: np.ndarray | None = None) -> Calibration:
    """Fit a temperature on validation images and fold it into the model (in place).

    The fitted T is kept only when it does not raise the validation ECE (it always lowers
    the log loss, which it minimises; ECE, binned, can rise on a few images): otherwise the
    model is left unchanged and ``temperature`` is 1.0.

    Args:
        model: a transferkit classifier.
        val_images: (n, H, W, 3) validation images, as the model takes them.
        val_labels: their class indices.
        n_classes: the number of classes.
        batch_size: images per forward pass; default 32.
        dense_inputs: the output Dense's inputs on the validation images when already known
            (the run's ``training.stages.ValidationReadout``: no pass over the images);
            default None (``logits_of`` runs the model).

    Returns:
        A ``Calibration`` with the temperatures and ECE / log loss before and after.
    """
    from transferkit.evaluation.metrics import expected_calibration_error

    labels = np.asarray(val_labels, dtype="int64")
    logits = logits_of(model, val_images, batch_size) if dense_inputs is None else logits_from(model, dense_inputs)
    fitted = fit_temperature(logits, labels, n_classes)
    ece_before, _ = expected_calibration_error(labels, probabilities_from_logits(logits))
    ece_fitted, _ = expected_calibration_error(labels, probabilities_from_logits(logits, fitted))
    temperature = fitted if not ece_fitted > ece_before else 1.0
    if temperature != fitted:
        log.info("temperature %.3f would raise the validation ECE (%.4f -> %.4f); the model is left as it was",
                 fitted, ece_before, ece_fitted)
    else:
        apply_temperature(model, temperature)
    return Calibration(
        temperature=temperature,
        fitted_temperature=fitted,
        ece_before=float(ece_before),
        ece_after=float(ece_fitted if temperature == fitted else ece_before),
        log_loss_before=_log_loss(logits, labels, 1.0) if len(labels) else math.nan,
        log_loss_after=_log_loss(logits, labels, temperature) if len(labels) else math.nan,
        n_images=int(len(labels)),
    )
