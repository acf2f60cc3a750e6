"""Request bodies to feed dicts and outputs to response bodies: JSON and .npz (numpy only). The
KServe v2 / Triton formats (JSON with an 'inputs' list, the binary tensor extension) are in kserve.py,
whose decode_request picks the format of a request and calls on this module for these two.

JSON   `{"inputs": {"input_ids": [[101, 2023, 102]], "attention_mask": [[1, 1, 1]], ...}}`; JSON has no
       dtypes, so numbers take the input's dtype from the manifest: integers fit any numeric input,
       fractions only float inputs, true/false only bool inputs. Responses are
       `{"model": NAME, "outputs": {NAME: nested lists}}`; float32 values survive the round trip exactly.
.npz   `application/x-npz`: numpy's own container (np.savez), one array per input name, with exact
       dtypes and shapes and no text conversion: the format for large tensors. It is a zip file, so
       the sizes its members declare are checked against the body limit before anything is
       unpacked, and pickled object arrays are refused (allow_pickle=False). application/octet-stream
       without an Inference-Header-Content-Length header is read as .npz too.
"""

from __future__ import annotations

import io
import json
import math
import threading
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import EnginekitError, InvalidInput
from ..manifest import TensorSpec

JSON = "application/json"
NPZ = "application/x-npz"


class RequestError(EnginekitError):
    """A request the service cannot read; `status` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


def decode_inputs(body: bytes, content_type: str | None, specs: list[TensorSpec], *, limit: int) -> dict[str, Any]:
    """Feeds from a request body (JSON or .npz); RequestError when the body cannot be read.

    Names, ranks and shapes are not checked here: Runner.validate does that, in one message. The
    Content-Type is required: a body without one is not guessed to be JSON (an .npz body taken for
    JSON would get a misleading "does not parse")."""
    kind = media_type(content_type)
    if kind in (NPZ, "application/octet-stream"):
        return _decode_npz(body, limit)
    if kind == JSON:
        return short_form_feeds(parse_json(body), {s.name: s for s in specs})
    raise unsupported_media(kind)


def unsupported_media(kind: str) -> RequestError:
    found = f"'{kind[:100]}'" if kind else "no Content-Type header"
    return RequestError(f"Expected Content-Type {JSON} or {NPZ}, found {found}. Send JSON "
                        f'({{"inputs": {{name: nested list}}}} or a KServe v2 body) as {JSON}, an np.savez body as '
                        f"{NPZ}, or a KServe v2 binary body with an Inference-Header-Content-Length header.", status=415)


def parse_json(body: bytes | memoryview) -> Any:
    try:
        return json.loads(bytes(body) if isinstance(body, memoryview) else body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(f"Expected a JSON body, but it does not parse ({str(exc)[:200]}). Send "
                           '{"inputs": {"input_name": [[...]], ...}} or a KServe v2 body.') from None


def short_form_feeds(doc: Any, specs: Mapping[str, TensorSpec]) -> dict[str, Any]:
    """Feeds from the short JSON form {"inputs": {name: nested list}}, already parsed."""
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(inputs, dict):
        if not isinstance(doc, dict):
            found = f"a JSON {_json_kind(doc)} as the body"
        elif "inputs" not in doc:
            found = "no 'inputs' key (" + (f"keys: {', '.join(sorted(map(str, doc))[:5])}" if doc else "an empty object") + ")"
        else:
            found = f"a JSON {_json_kind(inputs)} under 'inputs'"
        raise RequestError('Expected a JSON object {"inputs": {name: nested list, ...}}, found '
                           f"{found[:300]}. The engine's inputs are {sorted(specs)}.")
    feeds: dict[str, Any] = {}
    problems = []
    for name, value in inputs.items():
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # ragged lists, too deep
            problems.append(f"'{name}' is not a rectangular array of numbers ({str(exc)[:120]})")
            continue
        spec = specs.get(name)
        if spec is None:  # leave it to Runner.validate, which names the expected inputs
            feeds[name] = arr
            continue
        converted = json_to_dtype(arr, spec)
        if isinstance(converted, str):
            problems.append(converted)
        else:
            feeds[name] = converted
    if problems:
        raise InvalidInput(f"Expected JSON numbers that fit each input's dtype, but {'; '.join(problems)}. "
                           f"The engine expects {'; '.join(s.describe() for s in specs.values())}.")
    return feeds


def _json_kind(value: Any) -> str:
    """JSON's own name for a decoded value's type (a client knows 'array', not Python's 'list')."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def json_to_dtype(arr: np.ndarray, spec: TensorSpec) -> np.ndarray | str:
    """The array in the spec's dtype, or a sentence saying why JSON's values cannot be that dtype."""
    want = np.dtype(spec.dtype) if spec.dtype != "bfloat16" else np.dtype("float32")
    kind = arr.dtype.kind
    if arr.size == 0:
        return arr.astype(want)
    if want.kind == "f" and kind in "iuf":
        return arr.astype(want)
    if want.kind in "iu" and kind in "iu":
        info = np.iinfo(want)
        if arr.min() < info.min or arr.max() > info.max:
            return f"'{spec.name}' has values outside the {spec.dtype} range {info.min}..{info.max}"
        return arr.astype(want)
    if want.kind == "b" and kind == "b":
        return arr
    found = {"f": "fractional numbers", "b": "true/false", "U": "strings", "O": "mixed or huge values"}.get(
        kind, f"values of kind '{kind}'")
    return f"'{spec.name}' needs {spec.dtype} values, found {found}"


# numpy parses .npy headers with ast.literal_eval, and CPython 3.11's AST constructor is not safe across threads:
# one of 1,000 concurrent valid requests was refused with "SystemError: AST constructor recursion depth mismatch"
# in a fresh-clone CI run (2026-12-02). Bodies are decoded one at a time.
_NPY_LOCK = threading.Lock()


def _decode_npz(body: bytes, limit: int) -> dict[str, Any]:
    with _NPY_LOCK:
        return _decode_npz_locked(body, limit)


def _decode_npz_locked(body: bytes, limit: int) -> dict[str, Any]:
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            members = zf.infolist()
            unpacked = sum(m.file_size for m in members)
            if unpacked > limit:
                raise RequestError(f"Expected an .npz body that unpacks to at most {limit} bytes, but its members "
                                   f"declare {unpacked}. Send smaller requests.", status=413)
            feeds = {}
            for m in members:
                with zf.open(m) as f:
                    _check_declared_size(f, m)
                with zf.open(m) as f:
                    feeds[m.filename.removesuffix(".npy")] = np.lib.format.read_array(f, allow_pickle=False)
            return feeds
    except RequestError:
        raise
    except Exception as exc:
        raise RequestError(f"Expected an .npz body (np.savez of named arrays, no object arrays), but it cannot "
                           f"be read ({type(exc).__name__}: {str(exc)[:200]}).") from None


def _check_declared_size(f: Any, member: zipfile.ZipInfo) -> None:
    """numpy allocates the shape an .npy header declares before reading the data, so a 1 kB member
    could ask for terabytes: the header must not declare more than the member holds."""
    fmt = np.lib.format
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    version = fmt.read_magic(f)
    if version not in readers:
        raise RequestError(f"Expected .npy members of format 1.0 or 2.0 (what np.savez writes), found {version} "
                           f"in '{member.filename}'.")
    shape, _fortran, dtype = readers[version](f)
    if math.prod(shape) * dtype.itemsize > member.file_size:
        raise RequestError(f"Expected '{member.filename}' to hold the data its header declares ({shape} of "
                           f"{dtype}), but it is only {member.file_size} bytes.")


def encode_outputs(model: str, outputs: Mapping[str, np.ndarray], kind: str) -> bytes:
    if kind == NPZ:
        buf = io.BytesIO()
        np.savez(buf, **outputs)  # type: ignore[arg-type]  # numpy's stub reads **kwds as allow_pickle
        return buf.getvalue()
    return json.dumps({"model": model, "outputs": {k: v.tolist() for k, v in outputs.items()}}).encode()


def response_kind(accept: str | None, request_kind: str | None) -> str:
    """The response format: what Accept asks for; without a preference, the request's own format."""
    wanted = [media_type(part) for part in (accept or "").split(",")]
    if NPZ in wanted:
        return NPZ
    if JSON in wanted:
        return JSON
    return NPZ if media_type(request_kind) in (NPZ, "application/octet-stream") else JSON
