"""The TensorRT backend: build.py (lowered ONNX → strongly typed plan) and runner.py (plan → numpy).

Importing this package imports neither TensorRT nor cuda-bindings; each is imported where it is
first needed, so `runtimes` stays importable on machines without them.
"""
