"""`enginekit triton --backend python`: the bundle as a Triton python-backend model run by enginekit's runtime.

    REPO/<name>/config.pbtxt      backend "python" (+ EXECUTION_ENV_PATH with --python-env)
    REPO/<name>/1/model.py        MODEL_PY below: runtimes.load(1/bundle) in initialize, infer in execute
    REPO/<name>/1/bundle/         the bundle: manifest.json and every file it lists, nothing else

Why a python backend: the tritonserver on PyPI (nvidia-pytriton) ships only the python backend, no
onnxruntime or tensorrt one, and a model run by `runtimes` behaves exactly as everywhere else: the
sha256 of every file is checked at load (a copy altered in the repository leaves the model UNAVAILABLE,
enginekit's paragraph in the server log), inputs are validated, errors are enginekit's messages.

The python backend runs model.py in a stub process with the server's Python, and PYTHONPATH is not
passed to it. EXECUTION_ENV_PATH names a virtual environment the stub activates (`source bin/activate`)
before it imports model.py, so numpy, onnxruntime and `runtimes` come from there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from runtimes.choices import Kind
from runtimes.errors import UsageError
from runtimes.manifest import MANIFEST_NAME, Manifest

MODEL_PY = '''"""Triton python-backend model written by `enginekit triton --backend python`.

Runs the engine bundle in bundle/ beside this file with enginekit's thin runtime (runtimes.load checks
every file's sha256, so an altered copy never loads). Triton's dynamic batcher hands execute() several
requests: those whose inputs agree in everything but the batch size (axis 0) are stacked and run once,
then split back; the rest run alone. An enginekit error becomes that request's error.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

import runtimes


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.batched = int(config.get("max_batch_size", 0)) > 0
        bundle = Path(args["model_repository"]) / str(args["model_version"]) / "bundle"
        self.runner = runtimes.load(bundle)
        self.inputs = [s.name for s in self.runner.manifest.io.inputs]

    def execute(self, requests):
        feeds = [self._feeds(request) for request in requests]
        groups = {}
        for i, feed in enumerate(feeds):
            groups.setdefault(self._stack_key(feed, i), []).append(i)
        responses = [None] * len(requests)
        for members in groups.values():
            for i, response in zip(members, self._run([feeds[i] for i in members])):
                responses[i] = response
        return responses

    def finalize(self):
        self.runner.close()

    def _feeds(self, request):
        tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in self.inputs}
        return {name: t.as_numpy() for name, t in tensors.items() if t is not None}

    def _stack_key(self, feed, i):
        """Requests with equal keys stack along axis 0; a unique key runs the request alone."""
        if not self.batched or not feed or len({a.shape[0] if a.ndim else None for a in feed.values()}) != 1:
            return ("alone", i)
        return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(feed.items()))

    def _run(self, feeds):
        if len(feeds) == 1:
            try:
                return [_response(self.runner.infer(feeds[0]))]
            except runtimes.EnginekitError as exc:  # inputs the engine refuses: the client's 400, not a 500
                code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
                error = pb_utils.TritonError(str(exc)) if code is None else pb_utils.TritonError(str(exc), code)
                return [pb_utils.InferenceResponse(error=error)]
        cuts = np.cumsum([len(next(iter(f.values()))) for f in feeds])[:-1]
        try:
            outputs = self.runner.infer({name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]})
        except runtimes.EnginekitError:  # run each alone, so each gets its own error (or result)
            return [r for f in feeds for r in self._run([f])]
        parts = {name: np.split(a, cuts) for name, a in outputs.items()}
        return [_response({name: p[k] for name, p in parts.items()}) for k in range(len(feeds))]


def _response(outputs):
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(a)) for name, a in outputs.items()])
'''


def check_python_bundle(bundle: Path, manifest: Manifest) -> None:
    """Refuse what one Triton model running one engine call per request cannot serve (UsageError): a
    generation bundle's token loop, whatever the backend (the onnxruntime backend would run its first graph
    alone, the python backend one `runner.infer` per batch)."""
    if manifest.kind in (Kind.GENERATION, Kind.VISION_LANGUAGE):
        raise UsageError(
            f"Expected a bundle with one engine for Triton, found the {manifest.kind.value} bundle '{bundle}', whose "
            "engines run inside a token loop with a KV cache (one Triton request/response model cannot run it). Serve "
            f"it with `enginekit serve {bundle}` (an OpenAI-compatible API with continuous batching), or generate with "
            f"`enginekit generate {bundle}` / runtimes.generate in your own service."
        )


def env_parameter(python_env: Path | str) -> str:
    """The config.pbtxt lines that make the python backend's stub activate `python_env` first."""
    env = Path(python_env).expanduser().resolve()
    if not (env / "bin" / "activate").is_file():
        raise UsageError(
            f"Expected --python-env to be a virtual environment (a folder with bin/activate) holding numpy, "
            f"onnxruntime and enginekit's runtime, found '{python_env}' without bin/activate. Make one with "
            "`python3 -m venv VENV && VENV/bin/pip install 'enginekit[cpu]'` (from this checkout), with the "
            "Python version Triton's python backend stub was built for."
        )
    text = str(env).replace("\\", "\\\\").replace('"', '\\"')
    return f'parameters: {{ key: "EXECUTION_ENV_PATH", value: {{ string_value: "{text}" }} }}'


def write_python_model(bundle: Path, manifest: Manifest, version: Path) -> None:
    """version/model.py and version/bundle/ (the manifest and exactly the files it lists)."""
    copy = version / "bundle"
    copy.mkdir(parents=True)
    shutil.copy2(Path(bundle) / MANIFEST_NAME, copy / MANIFEST_NAME)
    for rel in manifest.files:
        target = copy / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(manifest.file(bundle, rel), target)
    (version / "model.py").write_text(MODEL_PY, encoding="utf-8")
