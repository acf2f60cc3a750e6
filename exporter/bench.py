"""`enginekit bench`: engines against PyTorch eager and torch.compile, measured in the same process.

For every batch size: the same random (seeded, non-zero) inputs for every variant; warm-up; then
latency percentiles over many timed runs (each synchronised before the clock is read), throughput
and device memory. Engines run through the same runner code the service uses, device-resident
(`prepare` once, then `run_prepared`: no host copies in the timed loop, as the torch baselines
keep their tensors on the GPU); CUDA bundles are also timed with CUDA graph replay. Baselines come
from the bundle's recorded source: torch eager in FP32, FP16 and BF16 (`.to(dtype)`, as the
seed articles did) and torch.compile modes at FP16. Speedups are against torch FP32 eager at the
same batch size. Memory is the growth of device memory in use (cudaMemGetInfo) from a clean state,
for every variant alike (weights + activations + workspace); on the CPU, resident-set growth.
"""

from __future__ import annotations

import contextlib
import gc
import json
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import runtimes
from exporter.timing import measure
from runtimes.errors import UsageError
from runtimes.manifest import IOSpec, Manifest
from runtimes.ort.runner import capture_blockers
from runtimes.samples import generate_feeds

DTYPES = ("fp32", "fp16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass
class BenchOptions:
    """batches: batch sizes (every batch-like dim is set to it; other dims at opt).
    baselines: 'eager' (torch in eager_dtypes) and/or 'compile' (torch.compile in compile_modes at
    compile_dtype). cuda_graph: also time CUDA bundles with CUDA graph replay."""

    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    baselines: list[str] = field(default_factory=lambda: ["eager", "compile"])
    eager_dtypes: list[str] = field(default_factory=lambda: list(DTYPES))
    compile_modes: list[str] = field(default_factory=lambda: ["default", "reduce-overhead"])
    compile_dtype: str = "fp16"
    warmup: int = 10
    runs: int = 100
    min_seconds: float = 1.0
    cuda_graph: bool = True
    threads: int | None = None
    profile: bool = False
    seed: int = 0

    def validate(self) -> None:
        bad = [b for b in self.baselines if b not in ("eager", "compile")] + \
              [d for d in self.eager_dtypes if d not in DTYPES] + [m for m in self.compile_modes if m not in COMPILE_MODES]
        if bad or self.compile_dtype not in DTYPES or not self.batches or min(self.batches) < 1:
            raise UsageError(
                f"Expected --baseline eager,compile, dtypes in {DTYPES}, compile modes in {COMPILE_MODES} and "
                f"positive --batch sizes; found {bad or self.batches}."
            )


@dataclass
class Row:
    variant: str
    kind: str  # engine | torch
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float  # samples per second at p50
    memory_mib: float | None
    speedup: float | None = None  # vs torch FP32 eager at the same batch
    vs_compile: float | None = None  # engines: the best torch.compile mode's p50 over this p50, same batch
    note: str = ""
    compile_s: float | None = None  # torch.compile variants: the first call, compilation included


def out_of_range(io: IOSpec, batch: int) -> str | None:
    """Why `batch` cannot run on an engine with these dims (None when it can)."""
    for name, r in io.dims.items():
        if "batch" in name and not r.min <= batch <= r.max:
            return f"outside the engine's {name} range {r.min}..{r.max}"
    return None


def batch_feeds(io: IOSpec, batch: int, seed: int) -> dict[str, np.ndarray] | None:
    """Inputs at `batch` for every batch-like dim (other dims at opt); None if out of range."""
    sizes = {}
    for name, r in io.dims.items():
        if "batch" in name:
            if not r.min <= batch <= r.max:
                return None
            sizes[name] = batch
        else:
            sizes[name] = r.opt
    return generate_feeds(io, sizes, seed=seed)


class _Memory:
    """Device (or host) memory growth while a variant is alive."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def used(self) -> float:
        if self.cuda:
            import torch

            free, total = torch.cuda.mem_get_info()
            return (total - free) / 2**20
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    @contextlib.contextmanager
    def track(self) -> Iterator[Callable[[], float]]:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
        start = self.used()
        yield lambda: max(0.0, self.used() - start)
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()


def _row(variant: str, kind: str, batch: int, stats: dict[str, float], mem: float | None, note: str = "") -> Row:
    return Row(variant, kind, batch, round(stats["p50_ms"], 4), round(stats["p90_ms"], 4), round(stats["p99_ms"], 4),
               round(batch * 1000.0 / stats["p50_ms"], 2), None if mem is None else round(mem, 1), note=note)


def _time(fn: Callable[[], Any], options: BenchOptions) -> dict[str, float]:
    return measure(fn, warmup=options.warmup, runs=options.runs, min_seconds=options.min_seconds)


def bench_engine(bundle: Path, options: BenchOptions, say: Callable[[str], None],
                 on_row: Callable[[Row], None] | None = None,
                 skipped: list[dict[str, Any]] | None = None) -> tuple[list[Row], dict[str, Any]]:
    """Time one bundle at every batch (and with CUDA graph replay where it can be captured; where it cannot,
    one entry in `skipped` says why)."""
    manifest = Manifest.read(bundle)
    cuda = manifest.target.device == "cuda"
    label = f"{manifest.target.backend}-{manifest.target.device} {manifest.precision.get('requested', 'fp32')}"
    rows, profiles = [], {}
    memory = _Memory(cuda)
    for graph in ([False, True] if cuda and options.cuda_graph else [False]):
        variant = label + (" +cuda-graph" if graph else "")
        blockers = capture_blockers(manifest) if graph and manifest.target.backend == "ort" else []
        if blockers:  # e.g. NMS in the graph: the runner refuses cuda_graph=True for it
            if skipped is not None:
                skipped.append({"bundle": str(bundle), "variant": variant, "batch": options.batches[0],
                                "reason": f"no CUDA graph capture: {', '.join(blockers)} output sizes depend on the data"})
            continue
        for batch in options.batches:
            feeds = batch_feeds(manifest.io, batch, options.seed)
            if feeds is None:
                continue
            say(f"Bench {variant}: batch {batch}")
            # A fresh runner per batch: its memory is measured alone (a CUDA graph is one session per shape).
            with memory.track() as grown:
                runner = runtimes.load(bundle, threads=options.threads, cuda_graph=graph)
                try:
                    slot = runner.prepare(feeds)
                    stats = _time(lambda slot=slot, runner=runner: runner.run_prepared(slot), options)
                    rows.append(_row(variant, "engine", batch, stats, grown()))
                    if on_row:
                        on_row(rows[-1])
                finally:
                    runner.close()
    if options.profile and manifest.target.backend == "ort":
        profiles[label] = profile_ort(bundle, manifest, options)
    return rows, profiles


def profile_ort(bundle: Path, manifest: Manifest, options: BenchOptions) -> dict[str, Any]:
    """Where an ORT engine spends its time: ORT's own profiler, per op type, at the largest batch."""
    import onnxruntime as ort

    from runtimes.ort.runner import OrtRunner

    batch = max(b for b in options.batches if batch_feeds(manifest.io, b, 0) is not None)
    feeds = batch_feeds(manifest.io, batch, options.seed)
    runner = OrtRunner(bundle, manifest)
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path("/tmp") / f"enginekit-profile-{manifest.name}")
    providers = runner.session.get_providers()
    opts = runner.session.get_provider_options()
    sess = ort.InferenceSession(str(runner.model_path), so, providers=[(p, opts.get(p, {})) for p in providers])
    for _ in range(20):
        sess.run(None, feeds)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + ev.get("dur", 0) / 1000.0 / 20
    total = sum(by_op.values()) or 1.0
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
    return {"batch": batch, "ms_per_run_by_op": {k: round(v, 4) for k, v in top},
            "share": {k: round(v / total, 3) for k, v in top}}


def bench_torch(manifest: Manifest, options: BenchOptions, say: Callable[[str], None],
                on_row: Callable[[Row], None] | None = None) -> tuple[list[Row], list[str]]:
    """Torch baselines for the bundle's recorded source, in this process and on the same inputs."""
    import torch

    from exporter.source.loading import load_source
    from exporter.source.spec import parse_source

    notes: list[str] = []
    if manifest.source.get("kind") == "onnx":
        return [], ["no torch baseline: the bundle's source is ONNX"]
    cuda = manifest.target.device == "cuda"
    dev = torch.device("cuda" if cuda else "cpu")
    if options.threads and not cuda:
        torch.set_num_threads(options.threads)
    loaded = load_source(parse_source(manifest.source["spec"]))
    base = loaded.module.eval()
    names = [s.name for s in manifest.io.inputs]
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    memory = _Memory(cuda)
    rows: list[Row] = []

    def inputs(batch: int, dtype: Any) -> tuple[Any, ...] | None:
        feeds = batch_feeds(manifest.io, batch, options.seed)
        if feeds is None:
            return None
        t = [torch.from_numpy(np.ascontiguousarray(feeds[n]).astype(np.float32) if feeds[n].dtype.kind == "f" else feeds[n]) for n in names]
        return tuple(x.to(dev, dtype=dtype) if x.is_floating_point() else x.to(dev) for x in t)

    def timed(fn: Callable[[], Any]) -> dict[str, float]:
        def call() -> None:
            fn()
            if cuda:
                torch.cuda.synchronize()

        return _time(call, options)

    variants: list[tuple[str, str, str | None]] = []
    if "eager" in options.baselines:
        variants += [(f"torch eager {d}", d, None) for d in options.eager_dtypes if cuda or d == "fp32"]
    if "compile" in options.baselines:
        variants += [(f"torch.compile {m} {options.compile_dtype if cuda else 'fp32'}", options.compile_dtype if cuda else "fp32", m)
                     for m in options.compile_modes]
    for variant, dname, mode in variants:
        for batch in options.batches:
            args = inputs(batch, dt[dname])
            if args is None:
                continue
            say(f"Bench {variant}: batch {batch}")
            with memory.track() as grown:
                model = _copy_to(base, dev, dt[dname])
                fn, compile_s = model, None
                try:
                    if mode is not None:
                        torch._dynamo.reset()
                        t0 = time.perf_counter()
                        fn = torch.compile(model, mode=mode, dynamic=False)
                        with torch.inference_mode():
                            fn(*args)
                            if cuda:
                                torch.cuda.synchronize()
                        compile_s = round(time.perf_counter() - t0, 2)
                    with torch.inference_mode():
                        stats = timed(lambda fn=fn, args=args: fn(*args))
                    rows.append(_row(variant, "torch", batch, stats, grown()))
                    rows[-1].compile_s = compile_s
                    if on_row:
                        on_row(rows[-1])
                except Exception as exc:
                    notes.append(f"{variant} at batch {batch} failed: {type(exc).__name__}: {str(exc)[:160]}")
                finally:
                    del model, fn
    return rows, notes


def _copy_to(module: Any, dev: Any, dtype: Any) -> Any:
    import copy

    m = copy.deepcopy(module)
    return m.to(device=dev, dtype=dtype).eval()


def run_bench(bundles: list[Path], options: BenchOptions, progress: Callable[[str], None] | None = None,
              checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every baseline and engine. `checkpoint(partial_result)` is called after each row, so
    a run cut short (a time limit, a crash in a late compile mode) keeps what it measured."""
    say = progress or (lambda _m: None)
    options.validate()
    manifests = [Manifest.read(b) for b in bundles]
    rows: list[Row] = []
    profiles: dict[str, Any] = {}
    notes: list[str] = []
    env = environment(manifests)
    # A batch an engine cannot take is a row that says so, not a silent gap (its baselines skip it too).
    skipped = [{"bundle": str(b), "variant": m.name, "batch": batch, "reason": why}
               for b, m in zip(bundles, manifests) for batch in options.batches
               if (why := out_of_range(m.io, batch)) is not None]

    def result(partial: bool) -> dict[str, Any]:
        for batch in options.batches:
            ref = next((r for r in rows if r.batch == batch and r.variant == "torch eager fp32"), None)
            for r in rows:
                if r.batch == batch and ref is not None:
                    r.speedup = round(ref.p50_ms / r.p50_ms, 3)
        best_compile, slower = compile_ratios(rows, options.batches)
        return {"bundles": [str(b) for b in bundles], "environment": env, "options": asdict(options),
                "rows": [asdict(r) for r in rows], "skipped": skipped, "best_compile": best_compile,
                "slower_than_compile": slower, "profiles": profiles, "notes": notes,
                **({"partial": True} if partial else {})}

    def on_row(row: Row) -> None:
        rows.append(row)
        if checkpoint:
            checkpoint(result(partial=True))

    if options.baselines:
        sources = {m.source["spec"]: m for m in manifests}
        for m in sources.values():
            _, n = bench_torch(m, options, say, on_row)
            notes += n
    for b in bundles:
        _, p = bench_engine(b, options, say, on_row, skipped)
        profiles.update(p)
    return result(partial=False)


def compile_ratios(rows: list[Row], batches: list[int]) -> tuple[dict[int, str], list[str]]:
    """Set every engine row's vs_compile (the best torch.compile mode's p50 at that batch over the engine's);
    returns {batch: best compile variant} and one line per engine row slower than it (ratio < 1.0)."""
    best_compile, slower = {}, []
    for batch in batches:
        comp = [r for r in rows if r.batch == batch and r.variant.startswith("torch.compile")]
        if not comp:
            continue
        best = min(comp, key=lambda r: r.p50_ms)
        best_compile[batch] = best.variant
        for r in rows:
            if r.batch == batch and r.kind == "engine":
                r.vs_compile = round(best.p50_ms / r.p50_ms, 3)
                if r.vs_compile < 1.0:
                    slower.append(f"{r.variant} at batch {batch}: {r.p50_ms:.3f} ms, slower than {best.variant} "
                                  f"({best.p50_ms:.3f} ms): {r.vs_compile:.2f}×")
    return best_compile, slower


def environment(manifests: list[Manifest]) -> dict[str, Any]:
    from exporter.doctor import doctor_report

    doc = doctor_report()
    env = {"gpu": doc["gpu"], "python": doc["python"], "platform": platform.platform(),
           "packages": {k: v for k, v in doc["packages"].items() if v}, "cpu_count": __import__("os").cpu_count()}
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    return env


def save(result: dict[str, Any], json_path: Path, png_path: Path | None, command: str) -> None:
    result = dict(result, command=command, created_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(json_path)
    if png_path is not None:
        plot(result, png_path)


def plot(result: dict[str, Any], path: Path) -> None:
    """Grouped bars: p50 latency per variant, one group per batch size (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(batches) * max(1, len(variants)) / 3), 4.5))
    width = 0.8 / max(1, len(variants))
    torch_variants = [v for v in variants if v.startswith("torch")]
    engine_variants = [v for v in variants if not v.startswith("torch")]
    # Baselines in warm greys/oranges, engines in blues/greens: the eye finds the engines first.
    colors = {v: plt.cm.Oranges(0.35 + 0.55 * i / max(1, len(torch_variants) - 1)) for i, v in enumerate(torch_variants)}
    colors.update({v: plt.cm.winter(i / max(1, len(engine_variants) - 1)) for i, v in enumerate(engine_variants)})
    for i, v in enumerate(variants):
        xs, ys = [], []
        for j, b in enumerate(batches):
            r = next((r for r in rows if r["variant"] == v and r["batch"] == b), None)
            if r:
                xs.append(j + i * width)
                ys.append(r["p50_ms"])
        bars = ax.bar(xs, ys, width, label=v, color=colors[v])
        ax.bar_label(bars, fmt="%.3g", fontsize=6, rotation=90, padding=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency (ms, log scale)")
    gpu = (result.get("environment", {}).get("gpu") or {}).get("name", "CPU")
    ax.set_title(f"{', '.join(Path(b).name for b in result['bundles'])} on {gpu}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
