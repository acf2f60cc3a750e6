"""runtimes/trt/build.py: the parts that are plain Python (options, profiles, parser-error text, the
progress adapter, the inspector summary), tested for real here; the TensorRT calls themselves run
in tests/runtimes/test_trt_fake.py (stand-ins) and tests/runtimes/test_trt.py (real, `trt` marker)."""

import json
import threading

import pytest

from runtimes.errors import MissingDependency, UsageError
from runtimes.manifest import DimRange, IOSpec, TensorSpec
from runtimes.trt.build import (
    BuildProgress,
    ParserProblem,
    TrtBuildOptions,
    build_trt_engine,
    format_size,
    parse_size,
    parser_error_message,
    profile_shapes,
    summarize_layers,
    tensorrt_unavailable,
)


@pytest.mark.parametrize("text, nbytes", [("512MiB", 512 << 20), ("4GiB", 4 << 30), ("1.5G", 3 << 29), ("64", 64 << 20),
                                           ("100 kb", 100 << 10), ("4096B", 4096), ("2gb", 2 << 30)])
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes
    assert parse_size(format_size(nbytes)) == nbytes


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "0", "3 TB", "1..5G"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(UsageError, match="512MiB or 4GiB"):
        parse_size(text)


def test_options_validate_and_reproduce_themselves(tmp_path):
    with pytest.raises(UsageError) as err:
        TrtBuildOptions(opt_level=7, hardware_compat="turing", exclude_lean_runtime=True)
    message = str(err.value)
    assert "--opt-level must be 0..5" in message and "--hardware-compat" in message and "--version-compatible" in message
    assert TrtBuildOptions().is_default() and TrtBuildOptions().cli_args() == []
    opts = TrtBuildOptions(workspace=3 << 29, opt_level=5, hardware_compat="ampere+", version_compatible=True,
                           exclude_lean_runtime=True, timing_cache=tmp_path / "t.cache", tf32=True)
    assert not opts.is_default()
    assert opts.cli_args() == ["--workspace", "1536MiB", "--opt-level", "5", "--hardware-compat", "ampere+",
                               "--version-compatible", "--exclude-lean-runtime", "--timing-cache",
                               str((tmp_path / "t.cache").resolve()), "--tf32"]


def test_profile_per_dynamic_input_from_the_dim_ranges():
    io = IOSpec(
        inputs=[TensorSpec("input_ids", "int64", ("batch", "sequence")),
                TensorSpec("pixel_values", "float32", ("batch", 3, 32, 32)),
                TensorSpec("scale", "float32", (1,))],
        outputs=[TensorSpec("out", "float32", ("batch", 8))],
        dims={"batch": DimRange(1, 4, 16), "sequence": DimRange(1, 128, 512)},
    )
    assert profile_shapes(io) == {
        "input_ids": ((1, 1), (4, 128), (16, 512)),
        "pixel_values": ((1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32)),
    }  # 'scale' is static: no profile entry


def test_parser_errors_name_every_node():
    problems = [ParserProblem(i, f"/layer.{i}/Op", "GridSample", "UNSUPPORTED_NODE", f"no importer {i}\n")
                for i in range(10)] + [ParserProblem(-1, "", "", "INVALID_GRAPH", "dangling output")]
    text = parser_error_message("m.onnx", "10.13.0.35", problems)
    assert "reported 11 error(s)" in text and "node 0 '/layer.0/Op' (GridSample): UNSUPPORTED_NODE: no importer 0" in text
    assert "node 7 '/layer.7/Op'" in text and "/layer.8/Op" not in text and "and 3 more" in text
    assert "unsupported operator (GridSample)" in text and "enginekit inspect m.onnx --layers" in text
    assert "\n" not in text  # one paragraph
    assert str(problems[-1]) == "the graph: INVALID_GRAPH: dangling output"


def test_progress_adapter_shows_the_innermost_phase_with_a_bar():
    seen = []
    progress = BuildProgress(seen.append, interval=0.0)
    progress.phase_start("Building engine", None, 4)
    progress.phase_start("Tactic selection", "Building engine", 10)
    assert progress.step_complete("Tactic selection", 4) is True  # True: do not cancel the build
    progress.phase_finish("Tactic selection")
    progress.step_complete("Building engine", 3)
    progress.phase_finish("Building engine")
    assert seen[1] == "Building engine › Tactic selection [....................] 0/10"
    assert seen[2] == "Building engine › Tactic selection [##########..........] 5/10"
    assert seen[-2] == "Building engine [####################] 4/4"
    assert seen[-1] == "building"


def test_progress_adapter_throttles_steps_and_survives_threads_and_a_broken_display():
    seen = []
    progress = BuildProgress(seen.append, interval=3600)
    progress.phase_start("p", None, 1000)

    def steps(offset: int) -> None:
        for i in range(offset, 999, 4):  # all but the last step, which is always shown
            progress.step_complete("p", i)

    threads = [threading.Thread(target=steps, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 1  # only the phase start got through the hour-long throttle

    def broken(_msg: str) -> None:
        raise RuntimeError("terminal gone")

    quiet = BuildProgress(broken)
    quiet.phase_start("p", None, 1)
    assert quiet.step_complete("p", 0) is True


def test_layer_summary_reads_both_inspector_layouts():
    """The two JSON layouts are written by hand from NVIDIA's documentation of the engine inspector
    (TensorRT 10: 'Format/Datatype' text; TensorRT 11: a 'DataType' field); no engine made them."""
    trt10 = {"Layers": [
        {"Name": "conv", "Outputs": [{"Name": "a", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}]},
        {"Name": "gemm", "Outputs": [{"Name": "b", "Format/Datatype": "Row major linear FP32"}]},
        {"Name": "cast", "Outputs": [{"Name": "c", "Format/Datatype": "Row major linear FP16 format"}]},
        {"Name": "shape", "Outputs": [{"Name": "d", "Format/Datatype": "Row major linear Int64"}]},
    ], "Bindings": ["x", "y"]}
    assert summarize_layers(json.dumps(trt10)) == {"layers": 4, "by_output_type": {"FP16": 2, "FP32": 1, "INT64": 1}}
    trt11 = {"Layers": [{"Name": "q", "Outputs": [{"Name": "a", "DataType": "Int8", "Format": "Row major linear"}]},
                        {"Name": "mm", "Outputs": [{"Name": "b", "DataType": "BF16"}]},
                        {"Name": "odd", "Outputs": []}],
             "I/O Tensors": [{"Name": "x", "IOMode": "Input"}]}
    assert summarize_layers(json.dumps(trt11)) == {"layers": 3, "by_output_type": {"INT8": 1, "BF16": 1, "unknown": 1}}
    names_only = {"Layers": ["conv", "gemm"]}  # profiling verbosity LAYER_NAMES_ONLY
    assert summarize_layers(json.dumps(names_only)) == {"layers": 2, "by_output_type": {"unknown": 2}}


def test_without_tensorrt_the_build_says_what_is_missing(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except (ImportError, OSError):
        pass
    assert "'tensorrt' cannot be imported" in tensorrt_unavailable()
    io = IOSpec(inputs=[TensorSpec("x", "float32", (1,))], outputs=[TensorSpec("y", "float32", (1,))])
    with pytest.raises(MissingDependency, match=r"enginekit\[trt\]"):
        build_trt_engine(tmp_path / "m.onnx", tmp_path, TrtBuildOptions(), io)
