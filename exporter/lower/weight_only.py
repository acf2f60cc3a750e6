"""INT8 for causal LMs: weight-only, per block of 32 input channels, in ONNX Runtime's MatMulNBits.

Why weight-only and not the Q/DQ INT8 of calibration/: decoding a token reads every weight once
and does little arithmetic with it, so its speed is bounded by the bytes of weights read (INT8
weights halve them against FP16, quarter them against FP32), not by integer math. Activation
quantization would add the risk (LLM activations have outlier channels that per-tensor scales
clip: the reason SmoothQuant and LLM.int8() exist) without speeding the memory-bound decode, and
it needs calibration data; weight-only scales come from the weights themselves. ONNX Runtime runs
MatMulNBits (8-bit since 1.20) on its CPU and CUDA providers, dequantizing blocks in the kernel.
What it is not: a TensorRT graph (TensorRT takes INT8 from Q/DQ nodes; `--target trt` is refused
for causal LMs in this version).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from runtimes._deps import require
from runtimes.errors import BuildError

BLOCK = 32


def quantize_weights(onnx_path: Path, out_path: Path, *, bits: int = 8, block_size: int = BLOCK,
                     device: str = "cpu") -> dict[str, Any]:
    """MatMuls with constant weights → MatMulNBits (symmetric, `bits`-bit, per block); returns what was done.

    device 'cpu' sets MatMulNBits' accuracy_level 4: the CPU kernel then quantizes each block of 32
    activations to INT8 on the fly and multiplies in integers. Without it, ORT 1.31's x86 kernel for
    8-bit weights dequantizes them at every call: SmolLM2-135M's decode step took 118 ms against
    24 ms in FP32 (2 cores); with it, 14 ms. The CUDA kernel ignores the level (it computes in the
    activations' float type)."""
    import logging

    require("onnxruntime", extra="cpu", purpose="Weight-only INT8 (MatMulNBits)")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # Importing the quantizer calls logging.basicConfig(level=INFO): every library's INFO lines would
    # reach the console from then on. The root logger is put back as it was.
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    root.handlers[:], root.level = handlers, level

    model = onnx.load(str(onnx_path), load_external_data=True)
    before = Counter(n.op_type for n in model.graph.node)
    try:
        level = 4 if device == "cpu" else None
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits,
                                              accuracy_level=level, op_types_to_quantize=("MatMul",))
        quantizer = MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
    except Exception as exc:  # the quantizer raises plain exceptions
        raise BuildError(
            f"Expected ONNX Runtime's MatMulNBits quantizer to quantize the weights of {onnx_path.name} to {bits} bits, "
            f"but it failed: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}. "
            "Build --precision fp16 instead, or report the model."
        ) from None
    quantized = quantizer.model.model
    after = Counter(n.op_type for n in quantized.graph.node)
    big = quantized.ByteSize() > (1 << 30)
    onnx.save(quantized, str(out_path), save_as_external_data=big, location=out_path.name + ".data" if big else None)
    return {"method": f"weight-only int{bits}, symmetric, block {block_size} (com.microsoft.MatMulNBits)"
                      + ("; CPU kernel with INT8 activations per block (accuracy_level 4)" if level else ""),
            "matmuls_quantized": after.get("MatMulNBits", 0), "matmuls_left_float": after.get("MatMul", 0),
            "matmuls_before": before.get("MatMul", 0)}
