"""Stage 1, sources: parse a SOURCE (hf:, py:, timm:, onnx:), read its config, load the model and
its inputs' specs and dim ranges (families), apply --shapes/--dynamic."""
