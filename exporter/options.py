"""What `enginekit build` takes (BuildOptions, validated up front) and the command line that rebuilds
a bundle (build_command, recorded in its manifest)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from calibration.images import ImageOptions
from exporter.lower.precision import check_precision
from exporter.source.spec import model_name, parse_source
from runtimes.choices import Device, Precision
from runtimes.errors import UsageError
from runtimes.manifest import DimRange
from runtimes.trt.build import TrtBuildOptions

TARGETS = ("ort", "trt")
DEVICES = ("cpu", "cuda")


@dataclass
class BuildOptions:
    """Defaults: ORT on the CPU in FP32, output engines/<model>-<target>-<precision>, dims from the
    model family (--shapes/--dynamic narrow them), inputs generated at min/opt/max for the gate.
    trt: TensorRT builder settings (runtimes.trt.build.TrtBuildOptions), for --target trt only."""

    target: str = "ort"
    device: Device = Device.CPU
    precision: Precision = Precision.FP32
    output: Path | None = None
    force: bool = False
    shapes: dict[str, DimRange] = field(default_factory=dict)
    dynamic: list[str] | None = None
    opset: int | None = None
    exporter: str = "auto"
    data: Path | None = None
    tolerances: list[str] = field(default_factory=list)
    skip_parity: bool = False
    seed: int = 0
    # fp16/bf16: forced-FP32 nodes, I/O dtype, the fallback's budget (range data: --calib).
    fp32_nodes: list[str] = field(default_factory=list)
    fp32_ops: list[str] = field(default_factory=list)
    native_io: bool = False
    range_rules: bool = True
    fallback_budget: int = 64
    fallback_rounds: int = 6
    ort_fusions: bool = True  # ORT target: attention / skip-LayerNorm / GELU fusions (exporter/build/ortfuse.py)
    trt: TrtBuildOptions = field(default_factory=TrtBuildOptions)
    # Reduced precision: calibration samples (fp16/bf16: AutoCast's range data; int8/fp8:
    # Q/DQ scales; texts, images, .npz feeds, or random[:N] for smoke tests), the int8/fp8
    # range method (minmax | entropy | percentile | all), the accuracy budget on held-out samples
    # (--data when given, else every 4th --calib sample), and image preprocessing without an HF config.
    calib: str | None = None
    calib_method: str = "percentile"
    accuracy_budget: str | None = "cosine>=0.99"
    image: ImageOptions = field(default_factory=ImageOptions)
    smooth: float | None = None  # SmoothQuant alpha (calibration/smooth.py); None: off
    detector_outputs: str = "nms"  # detectors: NMS in the graph, or the raw head outputs (exporter/export/detector.py)
    # issue 8, causal LMs: fp16/bf16 by AutoCast on the FP32 graphs, or "native" (exported from torch
    # in that dtype: the KV cache too, and the graph ONNX Runtime's GPU fusions match)
    lowering: str = "autocast"

    def __post_init__(self) -> None:
        # Parsed once, where the Python API or the CLI hands the values in; past this point they are typed.
        self.precision = Precision.parse(check_precision(str(self.precision)), "--precision")
        if str(self.device) not in DEVICES:
            raise UsageError(f"Expected --device cpu or cuda, found '{self.device}'.")
        self.device = Device.parse(self.device, "--device")

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise UsageError(
                f"Expected --target to be one of {', '.join(TARGETS)}, found '{self.target}'. 'ort' builds an "
                "ONNX Runtime engine, 'trt' a TensorRT plan."
            )
        if self.target == "trt" and not self.device.gpu:
            self.device = Device.CUDA  # TensorRT only runs on NVIDIA GPUs
        if self.target != "trt" and not self.trt.is_default():
            raise UsageError(
                f"Expected TensorRT options (--workspace, --opt-level, --hardware-compat, --version-compatible, "
                f"--exclude-lean-runtime, --timing-cache, --tf32) only with --target trt, found them with --target "
                f"{self.target}. Drop them, or build with --target trt."
            )
        if self.exporter not in ("auto", "torch", "transformers"):
            raise UsageError(f"Expected --exporter auto, torch or transformers, found '{self.exporter}'.")
        check_precision(self.precision)
        if self.precision is Precision.BF16 and self.target == "ort" and not self.device.gpu:
            raise UsageError(
                "Expected a target that runs BF16, found --target ort --device cpu: ONNX Runtime's CPU provider has "
                "no BF16 kernels. Build BF16 for --device cuda (an NVIDIA GPU with compute capability >= 8.0) or "
                "--target trt, or use --precision fp16 / fp32 for the CPU."
            )
        if self.device.gpu and self.precision in ("bf16", "fp8"):
            from runtimes.device import gpu_info, supports

            gpu = gpu_info()
            need = {"bf16": ("bf16", "8.0 (Ampere)"), "fp8": ("fp8", "8.9 (Ada/Hopper)")}[self.precision]
            if gpu is not None and not supports(need[0], gpu["compute_capability"]):
                cc = ".".join(map(str, gpu["compute_capability"]))
                raise UsageError(
                    f"Expected a GPU with compute capability >= {need[1]} for {self.precision.upper()}, found "
                    f"{gpu['name']} with compute capability {cc}. Use --precision fp16 on this GPU, or build on a "
                    "newer one (`enginekit doctor` shows what this machine supports)."
                )
        self._validate_calibration()

    def _validate_calibration(self) -> None:
        from calibration.budget import parse_budget
        from calibration.quantize import check_method

        quantized = self.precision.quantized
        if quantized and self.calib is None:
            raise UsageError(
                f"Expected --calib DATA with --precision {self.precision}: Q/DQ scales come from real inputs (a .txt/"
                ".jsonl of texts, a folder of images or of .npz feed dicts). --calib random is for smoke tests only."
            )
        if self.calib is not None and not self.precision.reduced:
            raise UsageError(
                "Expected --calib with a reduced precision (fp16/bf16: ranges for the mixed-precision lowering; "
                "int8/fp8: Q/DQ scales), found --precision fp32, which needs no calibration. Use --data for the "
                "gate's real inputs."
            )
        if self.precision is Precision.FP8 and not self.device.gpu:
            raise UsageError(
                "Expected an FP8 build for a GPU (--target trt, or --target ort --device cuda), found --device cpu. "
                "FP8 tensor cores need compute capability >= 8.9 (Ada, Hopper and newer), and ONNX Runtime's CPU "
                "provider has no FP8 kernels (its optimizer rejects FP8 Q/DQ graphs). To inspect FP8 accuracy "
                "here, run `enginekit calibrate MODEL.onnx --precision fp8 --data DATA -o model.fp8.onnx`, "
                "which emulates the Q/DQ on the CPU."
            )
        if self.precision is Precision.FP8:
            from runtimes.device import gpu_info, supports

            gpu = gpu_info()
            if gpu is not None and not supports("fp8", gpu["compute_capability"]):
                cc = ".".join(map(str, gpu["compute_capability"]))
                raise UsageError(
                    f"Expected a GPU of compute capability >= 8.9 for FP8, found {gpu['name']} ({cc}). Build with "
                    "--precision int8 (or fp16) for this GPU, or build FP8 on an Ada/Hopper/Blackwell machine."
                )
        check_method(self.calib_method, allow_all=True)
        parse_budget(self.accuracy_budget)
        if self.smooth is not None and not 0.0 < self.smooth <= 1.0:
            raise UsageError(f"Expected --smooth as a SmoothQuant alpha in (0, 1] (e.g. 0.7), found {self.smooth}.")


def default_output(source_text: str, options: BuildOptions) -> Path:
    return Path("engines") / f"{model_name(parse_source(source_text))}-{options.target}-{options.precision}"


def build_command(source: str, options: BuildOptions, output: Path, dims: dict[str, DimRange]) -> list[str]:
    cmd = ["enginekit", "build", source, "--target", options.target, "--device", options.device,
           "--precision", options.precision]
    if dims:
        cmd += ["--shapes", ",".join(f"{k}={v}" for k, v in dims.items())]
    if options.opset:
        cmd += ["--opset", str(options.opset)]
    if options.exporter != "auto":
        cmd += ["--exporter", options.exporter]
    if options.data:
        cmd += ["--data", str(Path(options.data).resolve())]
    for t in options.tolerances:
        cmd += ["--tolerance", t]
    if options.calib:
        calib = options.calib if str(options.calib).startswith("random") else str(Path(options.calib).resolve())
        cmd += ["--calib", calib]
        if options.precision.quantized:
            cmd += ["--calib-method", options.calib_method, "--accuracy-budget", options.accuracy_budget or "none"]
        if options.smooth:
            cmd += ["--smooth", str(options.smooth)]
        img = options.image
        for flag, value in (("--resize", img.resize), ("--mean", img.mean), ("--std", img.std)):
            if value is not None:
                cmd += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    for n in options.fp32_nodes:
        cmd += ["--fp32-nodes", n]
    if options.fp32_ops:
        cmd += ["--fp32-ops", ",".join(options.fp32_ops)]
    if options.native_io:
        cmd += ["--native-io"]
    if not options.range_rules:
        cmd += ["--no-range-rules"]
    if options.fallback_budget != 64:
        cmd += ["--fallback-budget", str(options.fallback_budget)]
    if options.lowering != "autocast":
        cmd += ["--lowering", options.lowering]
    if not options.ort_fusions:
        cmd += ["--no-ort-fusions"]
    if options.detector_outputs != "nms":
        cmd += ["--detector-outputs", options.detector_outputs]
    if options.target == "trt":
        cmd += options.trt.cli_args()
    return cmd + ["-o", str(output.resolve()), "--force"]
