"""Forward-only work: the engines (Keras, OpenVINO, chained 16-bit + float32), the
OpenVINO conversion and its cache, and predicting a folder."""
