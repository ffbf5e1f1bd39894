"""Exports of a run's model to other runtimes: SavedModel, LiteRT, ONNX, OpenVINO, .h5 and
.keras, each checked against the Keras model in a fresh process, optionally quantized with
its accuracy measured, and benchmarked side by side.

    formats.py     the one table of formats (file, runtime, quantizations, how to load)
    exporter.py    export_run: write, check, describe, publish
    keras.py, savedmodel.py, litert.py, onnx.py, openvino.py    one writer per format
    samples.py     the validation / calibration images (the run's split.csv)
    verify.py      the fresh process that loads a file without transferkit
    benchmark.py   benchmark_run: load time, images/s, size and accuracy per format
"""
