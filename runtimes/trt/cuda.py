"""The few CUDA runtime calls the TensorRT path needs, through cuda-bindings (never torch).

`from cuda.bindings import runtime` is the cuda-bindings ≥ 12.6 spelling; the older
`from cuda import cudart` is gone in 13.x. Every call returns a tuple whose first item is the
cudaError_t, so each goes through `call()`, which raises CudaError with the error's name.
cuda-bindings ships no type information: the calls below are checked by tests on a GPU and by
bench/gpu/trt_lean_check.py, not by mypy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._deps import require


class CudaError(RuntimeError):
    """A CUDA runtime call failed (out of memory, no driver, a failed kernel): not a user error."""


def runtime_api() -> Any:
    return require("cuda.bindings.runtime", extra="trt", purpose="Running TensorRT engines (CUDA memory and streams)")


def call(what: str, result: Any) -> Any:
    """Unpack a cuda-bindings result: raise CudaError unless it succeeded; return the value(s)."""
    cudart = runtime_api()
    err = result[0]
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        text = cudart.cudaGetErrorString(err)[1]
        raise CudaError(f"{what} failed: {name.decode() if name else int(err)} ({text.decode() if text else ''})")
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else tuple(result[1:])


def device_info(device: int = 0) -> dict[str, Any]:
    """Name, compute capability and CUDA versions of `device` (CudaError when there is none)."""
    cudart = runtime_api()
    count = call("cudaGetDeviceCount", cudart.cudaGetDeviceCount())
    if not count:
        raise CudaError("cudaGetDeviceCount found no CUDA device")
    props = call("cudaGetDeviceProperties", cudart.cudaGetDeviceProperties(device))
    name = props.name
    name = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
    return {
        "name": name,
        "compute_capability": [int(props.major), int(props.minor)],
        "cuda_runtime": int(call("cudaRuntimeGetVersion", cudart.cudaRuntimeGetVersion())),
        "cuda_driver": int(call("cudaDriverGetVersion", cudart.cudaDriverGetVersion())),
        "count": int(count),
    }


class Stream:
    """A non-blocking CUDA stream: TensorRT's execute_async_v3 on the legacy default stream adds
    device-wide synchronisation, and graph capture is not allowed on it."""

    def __init__(self) -> None:
        self._cudart = runtime_api()
        self.stream = call("cudaStreamCreateWithFlags",
                           self._cudart.cudaStreamCreateWithFlags(self._cudart.cudaStreamNonBlocking))
        self.handle = int(self.stream)

    def synchronize(self) -> None:
        call("cudaStreamSynchronize", self._cudart.cudaStreamSynchronize(self.stream))

    def destroy(self) -> None:
        if self.stream is not None:
            call("cudaStreamDestroy", self._cudart.cudaStreamDestroy(self.stream))
            self.stream = None


class DeviceBuffer:
    """`nbytes` of device memory (cudaMalloc; at least 1 byte so every tensor gets an address)."""

    def __init__(self, nbytes: int) -> None:
        self._cudart = runtime_api()
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(call("cudaMalloc", self._cudart.cudaMalloc(self.nbytes)))

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        """Copy a C-contiguous host array into the buffer, ordered on `stream`."""
        if array.nbytes > self.nbytes:
            raise CudaError(f"host array of {array.nbytes} bytes does not fit a {self.nbytes}-byte device buffer")
        if array.nbytes:
            kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            call("cudaMemcpyAsync", self._cudart.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes, kind,
                                                                 stream.stream))

    def download(self, array: np.ndarray, stream: Stream) -> None:
        """Copy the buffer's first `array.nbytes` bytes into a C-contiguous host array."""
        if array.nbytes:
            kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            call("cudaMemcpyAsync", self._cudart.cudaMemcpyAsync(array.ctypes.data, self.ptr, array.nbytes, kind,
                                                                 stream.stream))

    def free(self) -> None:
        if self.ptr:
            call("cudaFree", self._cudart.cudaFree(self.ptr))
            self.ptr = 0


class Graph:
    """A CUDA graph captured from the work `enqueue` puts on `stream`, replayed with `launch`.

    The graph keeps the kernels, their arguments and the device addresses of that one run: replay
    it only with the same shapes and buffers it was captured with.
    """

    def __init__(self, stream: Stream, enqueue: Callable[[], bool]) -> None:
        self._cudart = cudart = runtime_api()
        self.graph: Any = None
        self.exec: Any = None
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        call("cudaStreamBeginCapture", cudart.cudaStreamBeginCapture(stream.stream, mode))
        ok = False
        try:
            ok = enqueue()
        finally:
            # End the capture whatever happened, or the stream stays in capture mode and unusable.
            self.graph = call("cudaStreamEndCapture", cudart.cudaStreamEndCapture(stream.stream))
            if not ok:
                self.destroy()
        if not ok:
            raise CudaError("the work enqueued during CUDA graph capture reported failure")
        try:
            self.exec = call("cudaGraphInstantiate", cudart.cudaGraphInstantiate(self.graph, 0))
        except CudaError:
            self.destroy()
            raise

    def launch(self, stream: Stream) -> None:
        call("cudaGraphLaunch", self._cudart.cudaGraphLaunch(self.exec, stream.stream))

    def destroy(self) -> None:
        if self.exec is not None:
            call("cudaGraphExecDestroy", self._cudart.cudaGraphExecDestroy(self.exec))
            self.exec = None
        if self.graph is not None:
            call("cudaGraphDestroy", self._cudart.cudaGraphDestroy(self.graph))
            self.graph = None
