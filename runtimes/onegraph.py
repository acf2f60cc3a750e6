"""The steps of a one-graph decoder (prefill and decode in ONE session, a VLM decoder written by ONNX Runtime GenAI's
builder; runtimes/decoding.py runs the loop), over a KV cache this module owns, optionally replaying the decode step
as a captured CUDA graph.

- The cache: ONE buffer per cache tensor, [batch, kv_heads, length, head_dim], bound as both past and present, which
  GroupQueryAttention updates in place (its past_present_share_buffer mode), so no step allocates or copies it. Its
  length is the call's prompt + new tokens rounded up to a power of two (256 at least, the engine's maximum at most),
  so calls of similar lengths reuse the buffers, their io_bindings and their captured graph.
- A decode step reads its inputs from fixed device buffers (updated in place each step: a few bytes a row) and writes
  `logits` and `next_token` into preallocated ones; the attention mask is padded with zeros to the cache length (the
  decoder reads only each row's count of ones: its tokens and where the next one goes), so every step has the same
  shapes and addresses. That is what a CUDA graph needs, and on CUDA it is captured (ORT's `enable_cuda_graph`, one
  `gpu_graph_id` per buffer allocation; the prefill runs uncaptured on the same session, gpu_graph_id -1, as ONNX
  Runtime GenAI runs its prompt). On the CPU, and on CUDA with cuda_graph=False, the same steps run uncaptured.
- The prefill binds its host inputs as they come (their length varies) and the same cache buffers.

Measured on the H200 (bench/results/vlm-one-graph/): Qwen3-VL-8B's geometry decoded 73.8 tokens/s with a new cache
per step, 95.1 with the shared buffers bound every step, 127.3 with the binding kept (uncaptured); the captured decode was
measured on tiny models only (bench/results/vlm-one-graph/2026-12-06/: bit-identical logits, 2.8x on a toy).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The cache dtypes a generation bundle's IOSpec names → ONNX element types (OrtValue allocation: numpy has no BF16).
ONNX_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16}

MIN_CACHE = 256


def cache_length(length: int, maximum: int) -> int:
    """The cache buffers' length for a call needing `length` positions (see the module docstring)."""
    return min(maximum, max(MIN_CACHE, 1 << (max(length, 1) - 1).bit_length()))


class OneGraphSteps:
    """Prefill and decode steps of a one-graph decoder over buffers it owns; `graph`: capture the decode step (CUDA,
    a session opened with enable_cuda_graph)."""

    def __init__(self, gen: Any, session: Any, ort: Any, graph: bool = False):
        """gen: the runtimes.decoding.Generator whose loop runs these steps (its io, stages, cache names, device)."""
        self.gen, self.session, self.ort, self.graph = gen, session, ort, graph
        self.where = "cuda" if gen.device == "cuda" else "cpu"
        decode = gen.io[gen.stages["decode"]]
        self.specs = {t.name: t for t in decode.inputs}
        self.logits_type = ONNX_TYPES[next(t.dtype for t in decode.outputs if t.name == "logits")]
        self.cache: dict[str, Any] = {}
        self.key: tuple[int, int] | None = None  # (batch, cache length) of the buffers
        self.binding: Any = None  # the prefill's
        self.fixed: dict[str, Any] = {}  # the decode step's input buffers
        self.outputs: tuple[Any, Any] | None = None  # the decode step's logits [batch, 1, vocab], next_token [batch, 1]
        self.step_binding: Any = None
        self.graph_id = 0  # one captured graph per buffer allocation: a graph holds the addresses it was captured on
        self.prefill_options = self._run_options(-1)
        self.step_options: Any = None
        self.vocab = 0

    def _run_options(self, graph_id: int) -> Any:
        if not self.graph:
            return None
        options = self.ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return options

    def begin(self, batch: int, length: int) -> None:
        """Buffers for `batch` rows of at least `length` positions, reused while they fit."""
        if self.key is not None and self.key[0] == batch and self.key[1] >= length:
            return
        size = cache_length(length, self.gen.max_length)
        # the old bindings hold the old buffers: dropped first, so old and new never coexist
        self.cache.clear()
        self.fixed.clear()
        self.binding = self.step_binding = self.outputs = None
        for name in self.gen.cache_in:
            spec = self.specs[name]
            shape = [batch, int(spec.shape[1]), size, int(spec.shape[3])]
            self.cache[name] = self.ort.OrtValue.ortvalue_from_shape_and_type(shape, ONNX_TYPES[spec.dtype],
                                                                              self.where, 0)
        binding = self.session.io_binding()
        # outputs come back in the order first bound: logits and next_token before the cache
        binding.bind_output("logits", self.where)
        binding.bind_output("next_token", "cpu")
        self._bind_cache(binding)
        self.binding, self.key = binding, (batch, size)
        self.graph_id += 1
        self.step_options = self._run_options(self.graph_id)

    def _bind_cache(self, binding: Any) -> None:
        for past, present in zip(self.gen.cache_in, self.gen.cache_out):
            binding.bind_ortvalue_input(past, self.cache[past])
            binding.bind_ortvalue_output(present, self.cache[past])

    def run(self, host: dict[str, np.ndarray], want_logits: bool, decode: bool) -> tuple[Any, np.ndarray]:
        """One step: (logits [batch, 1, vocab] when wanted, else None; next_token [batch, 1])."""
        if decode:
            return self._decode(host, want_logits)
        binding = self.binding
        for name, arr in host.items():  # binding a name again replaces its earlier value
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        # bound again by device alone, so each prefill's outputs are new values (on the CPU ORT would otherwise write
        # into the arrays handed out for the last one)
        binding.bind_output("logits", "cuda" if self.where == "cuda" and not want_logits else "cpu")
        binding.bind_output("next_token", "cpu")
        self.session.run_with_iobinding(binding, self.prefill_options)
        values = binding.get_outputs()
        self.vocab = int(values[0].shape()[-1])
        return values[0].numpy() if want_logits else None, values[1].numpy()

    def _decode(self, host: dict[str, np.ndarray], want_logits: bool) -> tuple[Any, np.ndarray]:
        assert self.key is not None, "begin() allocates the buffers before a step"
        batch, size = self.key
        if self.step_binding is None:
            self._fix(host, batch, size)
        for name, arr in host.items():
            if name == "attention_mask":
                arr = np.pad(arr, ((0, 0), (0, size - arr.shape[1])))
            self.fixed[name].update_inplace(np.ascontiguousarray(arr))
        self.session.run_with_iobinding(self.step_binding, self.step_options)
        logits, next_token = self.outputs  # type: ignore[misc]
        # copies: a CPU OrtValue's numpy() is a view of the buffer the next step overwrites
        return (np.array(logits.numpy()) if want_logits else None), np.array(next_token.numpy())

    def _fix(self, host: dict[str, np.ndarray], batch: int, size: int) -> None:
        """The decode step's fixed buffers, shaped from its first feeds, and the binding over them and the cache."""
        ov = self.ort.OrtValue
        for name, arr in host.items():
            shape = (batch, size) if name == "attention_mask" else arr.shape
            self.fixed[name] = ov.ortvalue_from_numpy(np.zeros(shape, arr.dtype), self.where, 0)
        self.outputs = (ov.ortvalue_from_shape_and_type([batch, 1, self.vocab], self.logits_type, self.where, 0),
                        ov.ortvalue_from_shape_and_type([batch, 1], np.int64, self.where, 0))
        binding = self.session.io_binding()
        binding.bind_ortvalue_output("logits", self.outputs[0])
        binding.bind_ortvalue_output("next_token", self.outputs[1])
        for name, value in self.fixed.items():
            binding.bind_ortvalue_input(name, value)
        self._bind_cache(binding)
        self.step_binding = binding
