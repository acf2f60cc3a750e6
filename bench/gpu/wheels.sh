#!/usr/bin/env bash
# The wheels a GPU session carries to the lent H200 (it has torch 2.11 and transformers 5.17, no
# onnxruntime-gpu, and nothing can be downloaded there): onnxruntime-gpu, polygraphy and AutoCast's
# modules (../shared/tools/gpu-wheels' defaults), plus the lock's exact versions of the packages whose
# version there differs from lock/requirements.txt or which it lacks, so the GPU smoke runs the versions CI runs.
# torch stays the machine's own (2.11: it cannot be replaced there; pyproject's lower bound).
#   bash bench/gpu/wheels.sh      → .gpuwheels/p1..pN and the device calls to make, one right after another
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
lock=lock/requirements.txt
carry=(transformers huggingface-hub httpx2 httpcore2 truststore hf-xet tokenizers onnx onnx-ir onnxscript
       starlette uvicorn h11)
pins=()
for name in "${carry[@]}"; do
  pin=$(grep -iE "^${name}==" "$lock" | head -1)
  [ -n "$pin" ] || { echo "wheels.sh: $name is not in $lock" >&2; exit 2; }
  pins+=("$pin")
done
# ONNX Runtime GenAI's CUDA build (the lock holds its CPU wheel, onnxruntime-genai, at the same version)
genai=$(grep -iE "^onnxruntime-genai==" "$lock" | head -1 | sed 's/onnxruntime-genai/onnxruntime-genai-cuda/')
[ -n "$genai" ] || { echo "wheels.sh: onnxruntime-genai is not in $lock" >&2; exit 2; }
pins+=("$genai")
echo "carrying, at the lock's versions: ${pins[*]}"
exec ../shared/tools/gpu-wheels "${pins[@]}"
