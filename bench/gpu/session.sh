#!/usr/bin/env bash
# One GPU session for the lent H100/H200, step by step (each step is one device `run`, < 10 min).
# Every step writes its results and log under $OUT; commit them to bench/results/ afterwards.
#   bash bench/gpu/session.sh smoke|probe|build|bench-clip|bench-resnet|llm|tests
# First carry the wheels the machine lacks (`bash bench/gpu/wheels.sh` prints the device calls; the last
# one installs them into /tmp/site). `smoke` is what every change to exporter/ or runtimes/ runs before
# its issue is called done (README, "Development").
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
EK="python3 -m exporter"
step=${1:?step}
case "$step" in
smoke)
  python3 bench/gpu/smoke.py --out "$OUT"
  ;;
probe)
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv
  python3 -c "import onnxruntime as o, torch, transformers, onnx; print('ort', o.__version__, o.get_available_providers()); print('torch', torch.__version__, torch.cuda.is_available(), 'transformers', transformers.__version__, 'onnx', onnx.__version__)"
  python3 -c "import modelopt.onnx.autocast, onnx_graphsurgeon, onnxslim, lief; print('autocast ok')"
  $EK doctor
  ;;
build)
  # CLIP ViT-L/14 image tower (issues 3 and 6) and ResNet-50 (issue 6): FP32, FP16, BF16 ORT CUDA engines, each gated.
  python3 bench/gpu/make_models.py /tmp/models
  for p in fp32 fp16 bf16; do
    $EK build hf:/tmp/models/clip-vit-l14-vision --device cuda --precision $p --shapes batch=1:8:32 \
      -o engines/clip-l-vision-ort-$p --force --json > "$OUT/build-clip-$p.json" 2> "$OUT/build-clip-$p.log" \
      && echo "clip $p: $(python3 -c "import json;d=json.load(open('$OUT/build-clip-$p.json'));print(d['parity']['status'], d['timings_s'])")" \
      || { echo "clip $p FAILED"; tail -5 "$OUT/build-clip-$p.log"; }
  done
  for p in fp32 fp16; do
    $EK build timm:resnet50 --device cuda --precision $p --shapes batch=1:8:32 \
      -o engines/resnet50-ort-$p --force --json > "$OUT/build-resnet-$p.json" 2> "$OUT/build-resnet-$p.log" \
      && echo "resnet $p: $(python3 -c "import json;d=json.load(open('$OUT/build-resnet-$p.json'));print(d['parity']['status'], d['timings_s'])")" \
      || { echo "resnet $p FAILED"; tail -5 "$OUT/build-resnet-$p.log"; }
  done
  ;;
bench-clip)
  $EK bench engines/clip-l-vision-ort-fp16 engines/clip-l-vision-ort-fp32 engines/clip-l-vision-ort-bf16 \
    --batch 1,32 --compile-modes default,reduce-overhead,max-autotune --runs 50 --min-seconds 1 --profile \
    -o "$OUT/clip-l-vision.json" 2>&1 | tail -40
  ;;
bench-resnet)
  $EK bench engines/resnet50-ort-fp16 engines/resnet50-ort-fp32 --batch 1,8,32 \
    --compile-modes default,reduce-overhead,max-autotune --runs 100 --min-seconds 1 --profile \
    -o "$OUT/resnet50.json" 2>&1 | tail -40
  ;;
llm)
  # issue 8: Qwen2.5-1.5B-sized causal LM, BF16: build + token gate + decode speed vs transformers eager / compile
  python3 bench/gpu/llm_bench.py --out "$OUT" --budget-s 540 2>&1 | tail -60
  ;;
tests)
  python3 -m pytest -q -m "gpu or trt" -p no:cacheprovider tests 2>&1 | tail -15
  ;;
*) echo "unknown step $step"; exit 2 ;;
esac
