"""Stage 4, engine build: ONNX → ONNX Runtime or TensorRT engine (runtimes/*/build.py), ORT fusions,
CUDA provider tuning, the TensorRT hand-off where no builder is installed."""
