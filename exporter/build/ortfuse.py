"""ONNX Runtime's transformer fusions (attention, skip-LayerNorm, bias-GELU) for the ORT target only.

The fusions come from onnxscript's ORT rewriter (`onnxscript.rewriter.ort_fusions`), applied through
transformers' `fuse_for_onnxruntime`, which adds the repairs ONNX Runtime needs for graphs exported
by torch.onnx's dynamo exporter (the form enginekit exports). The fused graph holds com.microsoft
ops, so it feeds only ONNX Runtime: the TensorRT target builds from the unfused lowered ONNX. The
parity gate runs on the fused engine, so a fusion that changed the numerics would fail the build.
Measured on all-MiniLM-L6-v2 (ORT CPU, 2 cores): 1.6x faster at batch 1, 1.35x at 8x128 tokens.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any


def fuse_for_ort(onnx_path: Path, out_path: Path, device: str) -> dict[str, Any]:
    """Write the fused graph to `out_path`; returns what was fused (empty when nothing matched)."""
    import onnx_ir as ir

    try:
        from transformers.exporters.onnxruntime_fusions import fuse_for_onnxruntime
    except ImportError:  # transformers < 5: onnxscript's fusions alone
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        def fuse_for_onnxruntime(model: Any, _provider: str) -> None:
            optimize_for_ort(model)

    model = ir.load(str(onnx_path))
    before = sum(1 for _ in model.graph.all_nodes())
    fuse_for_onnxruntime(model, "cuda" if device == "cuda" else "cpu")
    fused = Counter(n.op_type for n in model.graph.all_nodes() if n.domain == "com.microsoft")
    big = sum(p.stat().st_size for p in Path(onnx_path).parent.glob(Path(onnx_path).name + "*")) > (1 << 30)
    ir.save(model, str(out_path), external_data=(out_path.name + ".data") if big else None)
    return {"fused_ops": dict(fused), "nodes_before": before, "nodes_after": sum(1 for _ in model.graph.all_nodes())}
