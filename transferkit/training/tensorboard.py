"""TensorBoard logs of a run: one scalar series per metric, one step count across stages.

Keras's own ``TensorBoard`` callback restarts its epoch count with every ``fit`` call, and a
staged run calls ``fit`` once per stage; this callback counts the run's epochs instead, so
the head stage and the fine-tuning stages draw one continuous curve, and a resumed run goes
on where the interrupted one stopped. Written with ``tf.summary`` (TensorBoard's format).
"""

from __future__ import annotations

from pathlib import Path

import keras

from transferkit.errors import TransferkitError
from transferkit.runs import HISTORY_COLUMNS

INSTALL = "pip install 'transferkit[tensorboard]'  (or: pip install tensorboard)"

# The per-epoch figures written, as history.csv names them.
SCALARS = tuple(column for column in HISTORY_COLUMNS if column not in ("epoch", "stage"))


def require_tensorboard() -> None:
    """Fail before training when the TensorBoard package (which writes ``tf.summary``
    scalars) is missing.

    Raises:
        TransferkitError: it is not installed; the message gives the install command.
    """
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise TransferkitError(f"--tensorboard needs the tensorboard package, which is not installed; run: {INSTALL}")


class TensorBoardLog(keras.callbacks.Callback):
    """Writes each epoch's loss, accuracy, validation figures and learning rate.

    Args:
        log_dir: the folder the event files go to (created when needed).
        epochs_done: epochs the run has already completed (a resumed run); default 0.
    """

    def __init__(self, log_dir: str | Path, epochs_done: int = 0):
        super().__init__()
        self.log_dir = Path(log_dir)
        self.epoch = epochs_done
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        self.epoch += 1
        logs = dict(logs or {})
        if "learning_rate" not in logs and getattr(self.model, "optimizer", None) is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        with self._summaries().as_default():
            for name in SCALARS:
                if logs.get(name) is not None:
                    tf.summary.scalar(name, float(logs[name]), step=self.epoch)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _summaries(self):
        if self._writer is None:
            import tensorflow as tf

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        return self._writer
