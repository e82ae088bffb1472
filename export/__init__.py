"""Export: a finished training run -> a verified model bundle (ONNX, optional TensorRT engines).

`python -m export bundle --run RUN --out BUNDLE` and `python -m export verify BUNDLE --data DATA`;
the bundle format itself lives in dimml/bundle.py, the inference side in dimml/engines.py and
dimml/predict.py.
"""
