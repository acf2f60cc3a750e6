"""Stage 2, export: torch → checked ONNX with named dynamic dims (one graph; the prefill/decode
graphs of a causal LM; a VLM's vision engine), enginekit's custom ops, detector outputs."""
