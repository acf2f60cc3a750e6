"""What `enginekit build` takes: BuildOptions (validated up front), and its flags, each declared once
in FLAGS (name, help, how the command line's text becomes the option's value and how that value is
written back). The defaults are the dataclasses' own (BuildOptions, TrtBuildOptions, ImageOptions); the
typer command's parameters (exporter/cli/__init__.py: cli_parameters, options_from_cli) and the command
line that rebuilds a bundle (build_command, recorded in its manifest) are derived from the table, so a
new flag is one field and one row. Importing this module imports no torch or onnx (the CLI of a
runtime-only install imports it)."""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibration.images import ImageOptions
from exporter.source.shapes import parse_shapes
from exporter.source.spec import model_name, parse_source
from runtimes.choices import Device, Precision
from runtimes.errors import DataError, UsageError
from runtimes.manifest import DimRange
from runtimes.trt.build import TrtBuildOptions, format_size, parse_size

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
    # int8: "static" (Q/DQ from --calib: TensorRT, ORT CUDA, ORT CPU), "dynamic" (ORT CPU: weights INT8, activation
    # scales computed per call; --calib, if given, only ranks layers for the accuracy budget), "auto": dynamic for
    # --target ort --device cpu without --calib.
    quantization: str = "auto"
    calib_method: str = "percentile"
    accuracy_budget: str | None = "cosine>=0.99"
    image: ImageOptions = field(default_factory=ImageOptions)
    smooth: float | None = None  # SmoothQuant alpha (calibration/smooth.py); None: off (static), 0.7 tried (dynamic)
    detector_outputs: str = "nms"  # detectors: NMS in the graph, or the raw head outputs (exporter/export/detector.py)
    # issue 8, causal LMs: fp16/bf16 by AutoCast on the FP32 graphs, or "native" (exported from torch
    # in that dtype: the KV cache too, and the graph ONNX Runtime's GPU fusions match)
    lowering: str = "autocast"
    # causal LMs: auto (ONNX Runtime GenAI's model builder and generator where the builder supports the
    # architecture, exporter/export/genai.py), genai, or enginekit (its own prefill/decode graphs and loop)
    generator: str = "auto"
    # GenAI on CUDA in fp16/bf16: the decoder's attention. default: GroupQueryAttention (og.Generator and
    # the Engine run it); paged: PagedAttention (the Engine's dynamic batching only: what `serve` runs)
    genai_attention: str = "default"
    # GiB that the dim ranges may need at their max shapes (exporter/export/memory.py); None: the
    # memory available when the build starts.
    memory_limit: float | None = None

    def __post_init__(self) -> None:
        # Parsed once, where the Python API or the CLI hands the values in; past this point they are typed.
        self.precision = Precision.parse(self.precision, "--precision", "fp16/bf16 lower to mixed precision in the "
                                         "graph; int8/fp8 insert Q/DQ nodes from calibration data (--calib).")
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
        if self.generator not in ("auto", "genai", "enginekit"):
            raise UsageError(f"Expected --generator auto, genai or enginekit, found '{self.generator}'.")
        if self.genai_attention not in ("default", "paged"):
            raise UsageError(f"Expected --genai-attention default or paged, found '{self.genai_attention}'.")
        if self.memory_limit is not None and not (math.isfinite(self.memory_limit) and self.memory_limit > 0):
            raise UsageError(f"Expected --memory-limit as a positive number of GiB (e.g. 32), found {self.memory_limit}.")
        self._validate_inputs()
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

    def _validate_inputs(self) -> None:
        """What needs no model, checked before the (possibly long) export: --tolerance syntax and
        values, that --data/--calib exist and can be read, and that the target's backend imports."""
        from exporter.gate.task import check_tolerances

        check_tolerances(self.tolerances)
        check_data_path(self.data, "--data")
        if self.calib is not None and not str(self.calib).startswith("random"):
            check_data_path(self.calib, "--calib")
        if self.target == "ort":
            from runtimes._deps import require

            require("onnxruntime", extra="cpu", purpose="--target ort (building and gating an ONNX Runtime engine)")

    def quantization_mode(self) -> str | None:
        """'static' (Q/DQ from --calib), 'dynamic' (ORT CPU, scales per call) or None (not quantized)."""
        if not self.precision.quantized:
            return None
        if self.quantization == "dynamic" or (self.quantization == "auto" and self.precision is Precision.INT8 and
                                              self.target == "ort" and not self.device.gpu and self.calib is None):
            return "dynamic"
        return "static"

    def _validate_quantization(self) -> None:
        if self.quantization not in ("auto", "static", "dynamic"):
            raise UsageError(f"Expected --quantization auto, static or dynamic, found '{self.quantization}'.")
        if self.quantization != "dynamic":
            return
        if self.precision is not Precision.INT8 or self.target != "ort" or self.device.gpu:
            raise UsageError(
                f"Expected --precision int8 --target ort --device cpu with --quantization dynamic, found --precision "
                f"{self.precision} --target {self.target} --device {self.device}: dynamic quantization (activation scales "
                "computed per call) runs on ONNX Runtime's CPU kernels only; TensorRT and CUDA take static Q/DQ from --calib."
            )

    def _validate_calibration(self) -> None:
        from calibration.budget import parse_budget
        from calibration.quantize import check_method

        self._validate_quantization()
        quantized = self.precision.quantized
        if quantized and self.calib is None and self.quantization_mode() != "dynamic":
            raise UsageError(
                f"Expected --calib DATA with --precision {self.precision} (static Q/DQ for this target): the scales come "
                "from real inputs (a .txt/.jsonl of texts, a folder of images or of .npz feed dicts). --calib random is "
                "for smoke tests only. On --target ort --device cpu, INT8 without --calib is dynamic quantization."
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
        if self.smooth is not None and not 0.0 <= self.smooth <= 1.0:
            raise UsageError(f"Expected --smooth as a SmoothQuant alpha in [0, 1] (e.g. 0.7; 0: off), found {self.smooth}.")


def check_data_path(value: str | Path | None, flag: str) -> None:
    """Refuse a --data/--calib path that does not exist or cannot be read (several comma-separated
    paths, as the zero-shot recipe routes them to its towers, are each checked)."""
    if value is None:
        return
    text = str(value)
    items = [text] if Path(text).exists() else [t.strip() for t in text.split(",") if t.strip()]
    for item in items:
        path = Path(item).expanduser()
        if not path.exists():
            raise DataError(
                f"Expected {flag} to name a data file or folder, found nothing at '{item}'"
                + ("" if path.is_absolute() else f" (read from the current folder, {os.getcwd()})")
                + ". Check the path; nothing was exported."
            )
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise DataError(
                f"Expected {flag} '{item}' to be readable, but this user may not read it"
                f"{' (or list the folder)' if path.is_dir() else ''}. Fix its permissions or copy it somewhere readable; "
                "nothing was exported."
            )


def default_output(source_text: str, options: BuildOptions) -> Path:
    return Path("engines") / f"{model_name(parse_source(source_text))}-{options.target}-{options.precision}"


def parse_floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"Expected {flag} as comma-separated numbers (e.g. 0.485,0.456,0.406), found '{text}'.") from None


def _floats(flag: str) -> Callable[[str | None], tuple[float, ...] | None]:
    return lambda text: parse_floats(text, flag)


def _comma_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_dynamic(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [] if text.strip().lower() == "none" else _comma_list(text)


def shown_path(path: str | Path) -> str:
    """A path as a printed or recorded command writes it: a relative one as the user gave it (never
    expanded: the command is copied to other machines and folders), an absolute one relative to the
    current folder when it lies under it, else as it is."""
    p = Path(path)
    if not p.is_absolute():
        return str(path)
    for here, there in ((Path.cwd(), p), (Path.cwd().resolve(), p.resolve())):
        try:
            return str(there.relative_to(here))
        except ValueError:
            continue
    return str(path)


def command_source(text: str) -> str:
    """SOURCE as a printed or recorded command writes it: the kind prefix made explicit, an hf:/onnx:
    path as shown_path writes it (parse_source resolves it; the user's own text is what is kept)."""
    spec = parse_source(text)
    if spec.kind not in ("hf", "onnx") or not Path(spec.location).exists():
        return text.strip() if spec.kind == "py" else str(spec)
    raw = text.strip()
    kind, sep, rest = raw.partition(":")
    given = rest if sep and kind == spec.kind else raw
    if spec.kind == "hf":
        given = given.partition("#")[0]
    return f"{spec.kind}:{shown_path(Path(given).expanduser())}" + (f"#{spec.task}" if spec.task else "")


def _calib_text(value: Any) -> str:
    text = str(value)
    return text if text.startswith("random") else ",".join(shown_path(v.strip()) for v in text.split(","))


def _with_calib(options: BuildOptions) -> bool:
    return bool(options.calib)


def _quantized_with_calib(options: BuildOptions) -> bool:
    return bool(options.calib) and options.precision.quantized


@dataclass(frozen=True)
class Flag:
    """One option of `enginekit build`. path: the BuildOptions attribute ('trt.workspace' for a nested
    one). cli: the type typer parses; parse: that value → the option's; render: the option's value → the
    rebuild command's text (None: not written back); when: write it back only if this holds."""

    path: str
    names: tuple[str, ...]
    help: str
    cli: Any = str
    parse: Callable[[Any], Any] | None = None
    render: Callable[[Any], str | list[str]] | None = str
    when: Callable[[BuildOptions], bool] | None = None
    panel: str = "Build"
    even_default: bool = False  # written back whenever `when` holds, default or not

    @property
    def param(self) -> str:
        return self.path.replace(".", "_")


FLAGS: tuple[Flag, ...] = (
    Flag("target", ("--target",), "ort (ONNX Runtime) | trt (TensorRT)."),
    Flag("device", ("--device",), "cpu | cuda (for --target ort)."),
    Flag("precision", ("--precision",), "fp32 | fp16 | bf16 | int8 | fp8 | int4 (int4: causal LMs, weight-only)."),
    Flag("output", ("-o", "--output"), "Bundle folder (default engines/<model>-<target>-<precision>).",
         cli=Path | None, render=None),
    Flag("force", ("--force",), "Replace an existing bundle.", cli=bool, render=None),
    Flag("shapes", ("--shapes",), "Dim ranges NAME=MIN:OPT:MAX, comma-separated (e.g. batch=1:8:32,sequence=1:128:512).",
         cli=str | None, parse=parse_shapes, render=None, panel="Export"),
    Flag("dynamic", ("--dynamic",), "Dims to keep dynamic, comma-separated (others fixed at opt); 'none' for static.",
         cli=str | None, parse=parse_dynamic, render=None, panel="Export"),
    Flag("opset", ("--opset",), "ONNX opset (default: the exporter's recommended one).", cli=int | None, panel="Export"),
    Flag("exporter", ("--exporter",), "auto | torch | transformers (auto: torch.onnx, then transformers' exporter for "
         "HF models).", panel="Export"),
    Flag("generator", ("--generator",), "Causal LMs: auto (ONNX Runtime GenAI's model builder and generator where it "
         "supports the architecture, else enginekit's own graphs) | genai | enginekit. Qwen2.5-VL/Qwen3-VL: auto or "
         "genai write the decoder as one graph with GenAI's builder (run by enginekit's loop).", panel="Export"),
    Flag("genai_attention", ("--genai-attention",), "Causal LMs on GenAI, --device cuda, fp16/bf16: default "
         "(GroupQueryAttention) | paged (PagedAttention: GenAI's Engine with dynamic batching only, what `enginekit "
         "serve` runs; no og.Generator, so the gate's logits come from a GroupQueryAttention twin).", panel="Export"),
    Flag("memory_limit", ("--memory-limit",), "GiB the dim ranges may need at their max shapes (default: the memory "
         "available now); a build whose estimate exceeds it is refused before export.", cli=float | None,
         panel="Export"),
    Flag("detector_outputs", ("--detector-outputs",), "Detectors: nms (boxes, scores, classes, count after NMS in the "
         "graph) or raw (the head's pre-NMS boxes and scores).", panel="Export"),
    Flag("data", ("--data",), "Real inputs for the gate: .npz, folder of .npz, .txt or .jsonl texts.",
         cli=Path | None, render=shown_path, panel="Gate"),
    Flag("tolerances", ("--tolerance",), "Override a gate tolerance: [OUTPUT:]METRIC=VALUE (repeatable).",
         cli=list[str], parse=list, render=list, panel="Gate"),
    Flag("skip_parity", ("--skip-parity",), "Do not run the gate (recorded as not checked).", cli=bool, render=None,
         panel="Gate"),
    Flag("calib", ("--calib",), "Calibration data for reduced precision (fp16/bf16: ranges for the lowering; int8/fp8: "
         "Q/DQ scales): .txt/.jsonl texts, a folder of images or .npz feeds, or random[:N] (smoke tests only).",
         cli=str | None, render=_calib_text, panel="Calibration"),
    Flag("quantization", ("--quantization",), "int8: auto | static | dynamic. static: Q/DQ scales from --calib (the "
         "form for TensorRT and CUDA); dynamic: ONNX Runtime CPU, activation scales per call, no calibration; auto: "
         "dynamic for --target ort --device cpu without --calib, else static.",
         when=lambda o: o.precision.quantized, even_default=True, panel="Calibration"),
    Flag("calib_method", ("--calib-method", "--method"), "minmax | entropy | percentile | all (all: compare them, keep "
         "the best).", when=_quantized_with_calib, even_default=True, panel="Calibration"),
    Flag("accuracy_budget", ("--accuracy-budget",), "[OUTPUT:]METRIC>=VALUE on held-out samples, METRIC cosine (worst "
         "sample) or top1; the most sensitive layers stay in float until it holds. 'none': quantize all.",
         render=lambda v: v or "none", when=lambda o: o.precision.quantized, even_default=True, panel="Calibration"),
    Flag("smooth", ("--smooth",), "SmoothQuant alpha in [0,1] (0: off): move activation outliers into the weights before "
         "quantizing (helps transformers; e.g. 0.7). Static INT8/FP8: off by default. Dynamic INT8: alpha 0.7 is "
         "tried when the all-INT8 graph misses the accuracy budget and kept only if it helps; this sets the alpha.",
         cli=float | None, when=lambda o: o.smooth is not None, panel="Calibration"),
    Flag("image.resize", ("--resize",), "Images without a preprocessor_config.json: shortest edge before the center "
         "crop.", cli=int | None, when=_with_calib, panel="Calibration"),
    Flag("image.mean", ("--mean",), "Images without a preprocessor_config.json: per-channel mean of [0,1] pixels, e.g. "
         "0.485,0.456,0.406.", cli=str | None, parse=_floats("--mean"), render=lambda v: ",".join(map(str, v)),
         when=_with_calib, panel="Calibration"),
    Flag("image.std", ("--std",), "Images without a preprocessor_config.json: per-channel std, e.g. 0.229,0.224,0.225.",
         cli=str | None, parse=_floats("--std"), render=lambda v: ",".join(map(str, v)), when=_with_calib,
         panel="Calibration"),
    Flag("fp32_nodes", ("--fp32-nodes",), "fp16/bf16: keep nodes whose name matches this regex in FP32 (repeatable).",
         cli=list[str], parse=list, render=list, panel="Mixed precision"),
    Flag("fp32_ops", ("--fp32-ops",), "fp16/bf16: op types kept in FP32, comma-separated (e.g. "
         "LayerNormalization,Softmax).", cli=str | None, parse=_comma_list, render=",".join, panel="Mixed precision"),
    Flag("native_io", ("--native-io",), "fp16/bf16: graph inputs/outputs in the low precision (faster on GPU) instead "
         "of FP32.", cli=bool, panel="Mixed precision"),
    Flag("range_rules", ("--range-rules/--no-range-rules",), "fp16/bf16: AutoCast's weight/activation range rules (off: "
         "naive cast, repaired only by the fallback).", cli=bool, panel="Mixed precision"),
    Flag("fallback_budget", ("--fallback-budget",), "fp16/bf16: most nodes the parity-driven fallback may keep in FP32 "
         "(0: off).", cli=int, panel="Mixed precision"),
    Flag("lowering", ("--lowering",), "Causal LMs, fp16/bf16: autocast (AutoCast on the FP32 graphs) or native "
         "(exported from torch in that dtype; the fast GPU path).", panel="Mixed precision"),
    Flag("ort_fusions", ("--ort-fusions/--no-ort-fusions",), "ORT target: fuse attention, skip-LayerNorm and GELU into "
         "ORT's own ops.", cli=bool, panel="Engine"),
    Flag("trt.workspace", ("--workspace",), "trt: builder workspace limit, e.g. 512MiB, 4GiB (default: all GPU memory).",
         cli=str | None, parse=lambda t: parse_size(t) if t else None, render=format_size, panel="TensorRT"),
    Flag("trt.opt_level", ("--opt-level",), "trt: builder optimization level 0..5 (default 3; 0 ignores the timing "
         "cache).", cli=int | None, panel="TensorRT"),
    Flag("trt.hardware_compat", ("--hardware-compat",), "trt: none | ampere+ | same-cc (which GPUs the plan runs on).",
         panel="TensorRT"),
    Flag("trt.version_compatible", ("--version-compatible",), "trt: a plan later TensorRT versions and the lean runtime "
         "can run.", cli=bool, panel="TensorRT"),
    Flag("trt.exclude_lean_runtime", ("--exclude-lean-runtime",), "trt: leave the lean runtime out of a "
         "version-compatible plan.", cli=bool, panel="TensorRT"),
    Flag("trt.timing_cache", ("--timing-cache",), "trt: timing cache file, read before and updated after the build.",
         cli=Path | None, render=shown_path, panel="TensorRT"),
    Flag("trt.tf32", ("--tf32",), "trt: allow TF32 in FP32 matmuls and convolutions (off: FP32 means FP32).", cli=bool,
         panel="TensorRT"),
)
_DEFAULTS = BuildOptions()


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _cli_default(flag: Flag) -> Any:
    """The default as the command line shows it (the dataclass default, in its command-line form)."""
    value = _get(_DEFAULTS, flag.path)
    if flag.cli is bool:
        return bool(value)
    if value in (None, [], {}, ()):
        return [] if flag.cli == list[str] else None
    return str(value) if flag.cli in (str, str | None) else value


def cli_parameters() -> list[inspect.Parameter]:
    """The typer parameters of `enginekit build`, one per flag (grouped in --help by panel)."""
    import typer

    kind = inspect.Parameter.KEYWORD_ONLY
    return [inspect.Parameter(f.param, kind, annotation=f.cli,
                              default=typer.Option(_cli_default(f), *f.names, help=f.help, rich_help_panel=f.panel))
            for f in FLAGS]


def options_from_cli(values: Mapping[str, Any]) -> BuildOptions:
    """BuildOptions from the typer values of cli_parameters() (each parsed as its flag says)."""
    flat: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {"trt": {}, "image": {}}
    for f in FLAGS:
        value = values[f.param]
        if f.parse is not None:
            value = f.parse(value)
        head, _, rest = f.path.partition(".")
        if rest:
            nested[head][rest] = value
        else:
            flat[f.path] = value
    return BuildOptions(**flat, trt=TrtBuildOptions(**nested["trt"]), image=ImageOptions(**nested["image"]))


def flag_option(path: str, **overrides: Any) -> Any:
    """The typer Option of one flag of the table, for commands that share it (export, calibrate)."""
    import typer

    f = next(f for f in FLAGS if f.path == path)
    default = overrides.pop("default", _cli_default(f))
    return typer.Option(default, *overrides.pop("names", f.names), help=overrides.pop("help", f.help), **overrides)


def build_command(source: str, options: BuildOptions, output: Path, dims: dict[str, DimRange]) -> list[str]:
    """The `enginekit build` command line that rebuilds this bundle: every flag whose value is not the
    default (and whose `when` holds), the dims the bundle was built with, then -o OUTPUT --force.
    Paths are written as the user gave them, or relative to the current folder (shown_path): this
    command is recorded in the manifest and printed in errors, and read on other machines."""
    cmd = ["enginekit", "build", command_source(source), "--target", str(options.target), "--device", str(options.device),
           "--precision", str(options.precision)]
    if dims:
        cmd += ["--shapes", ",".join(f"{k}={v}" for k, v in dims.items())]
    for f in FLAGS:
        if f.render is None or f.path in ("target", "device", "precision"):
            continue
        if f.path.startswith("trt.") and options.target != "trt":
            continue
        value = _get(options, f.path)
        if f.when is not None and not f.when(options):
            continue
        if value == _get(_DEFAULTS, f.path) and not f.even_default:
            continue
        cmd += _rendered(f, value)
    return cmd + ["-o", shown_path(output), "--force"]


def _rendered(f: Flag, value: Any) -> list[str]:
    name = next(n for n in f.names if n.startswith("--"))
    if f.cli is bool:
        on, _, off = name.partition("/")
        return [on] if value else ([off] if off else [])
    assert f.render is not None
    text = f.render(value)
    if isinstance(text, list):
        return [part for item in text for part in (name, str(item))]
    return [name, text]
