"""Stage 3, lowering: precision in the ONNX graph, once, before any engine build: FP16/BF16 mixed
precision (AutoCast) with the parity-driven FP32 fallback and its emulation, INT8/FP8 Q/DQ from
calibration (calibration/), weight-only INT8 for LLMs."""
