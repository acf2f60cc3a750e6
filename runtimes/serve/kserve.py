"""The KServe v2 / Triton HTTP infer protocol, so that tritonclient.http works unchanged.

JSON     `{"id"?, "inputs": [{"name", "shape", "datatype", "data": flat or nested list}], "outputs"?:
         [{"name", "parameters"?: {"binary_data": bool}}], "parameters"?: {"binary_data_output": bool}}`; told
         apart from the short form by `inputs` being a list. `datatype` must be the input's manifest dtype
         (FP32 float32, FP16 float16, INT64 int64, BOOL bool, ...; see DATATYPES), and `shape` must hold as
         many values as `data`.
binary   the binary tensor extension: with the header `Inference-Header-Content-Length: N` the body's first
         N bytes are that JSON, the rest the raw little-endian tensors, in order, of the inputs whose
         parameters say `binary_data_size: k` (k = the tensor's bytes, no data then). Outputs asked for with
         `binary_data: true` (or the request's `binary_data_output: true`) come back the same way: the
         response carries Inference-Header-Content-Length and each such output `binary_data_size`.

tritonclient.http 2.73 sends no Content-Type at all (geventhttpclient adds none): binary requests carry
only Inference-Header-Content-Length, and all-JSON ones (binary_data=False) nothing, which is why a body
without a Content-Type is read as KServe JSON when it is a JSON object whose `inputs` is a list (and
refused with 415 otherwise, as before). Responses: application/json, or application/octet-stream when
they carry binary outputs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidInput
from ..manifest import TensorSpec
from .codec import (
    JSON,
    RequestError,
    decode_inputs,
    json_to_dtype,
    media_type,
    parse_json,
    short_form_feeds,
    unsupported_media,
)

HEADER = "inference-header-content-length"
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
             "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
             "FP32": "float32", "FP64": "float64"}
TO_DATATYPE = {v: k for k, v in DATATYPES.items()}
SHAPE = "Send [{\"name\", \"shape\": [ints], \"datatype\", \"data\": [...]}] as 'inputs' (KServe v2)."


@dataclass
class KServeRequest:
    """What a KServe request asks of its answer: its id, the outputs it names (None: all), which of
    them come back as binary (binary: per name; binary_all: the request-level binary_data_output)."""

    id: str | None = None
    outputs: list[str] | None = None
    binary: dict[str, bool] = field(default_factory=dict)
    binary_all: bool = False


@dataclass
class Decoded:
    feeds: dict[str, Any]
    kserve: KServeRequest | None = None  # None: the short JSON form or .npz


def datatype(dtype: str) -> str:
    """The KServe datatype of a manifest dtype (bfloat16 inputs take float32, as in the JSON short form)."""
    return TO_DATATYPE.get("float32" if dtype == "bfloat16" else dtype, dtype.upper())


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """KServe tensor metadata (-1 for a named, dynamic dim), plus the named shape."""
    return {"name": spec.name, "datatype": datatype(spec.dtype),
            "shape": [d if isinstance(d, int) else -1 for d in spec.shape], "named_shape": list(spec.shape)}


def decode_request(body: bytes, content_type: str | None, header_length: str | None, specs: list[TensorSpec], *,
                   limit: int) -> Decoded:
    """Feeds from any body the service reads: KServe binary (Inference-Header-Content-Length), KServe
    JSON (with application/json or no Content-Type), or the short JSON form / .npz (codec.py)."""
    by_name = {s.name: s for s in specs}
    if header_length is not None:
        n = header_length.strip()
        if not n.isdigit() or not 0 < int(n) <= len(body):
            raise RequestError(f"Expected Inference-Header-Content-Length to be the byte length of the body's JSON "
                               f"header, at most the body's {len(body)} bytes, found '{header_length[:40]}'.")
        view = memoryview(body)
        return _from_doc(parse_json(view[:int(n)]), view[int(n):], by_name)
    kind = media_type(content_type)
    if kind not in (JSON, ""):
        return Decoded(decode_inputs(body, content_type, specs, limit=limit))
    if not kind and not re.match(rb"\s*\{", body):
        raise unsupported_media(kind)
    try:
        doc = parse_json(body)
    except RequestError:
        if not kind:
            raise unsupported_media(kind) from None
        raise
    if isinstance(doc, dict) and isinstance(doc.get("inputs"), list):
        return _from_doc(doc, memoryview(b""), by_name)
    if not kind:  # the short form keeps requiring its Content-Type
        raise unsupported_media(kind)
    return Decoded(short_form_feeds(doc, by_name))


def _from_doc(doc: Any, rest: memoryview, specs: Mapping[str, TensorSpec]) -> Decoded:
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise RequestError(f"Expected the JSON header of a KServe v2 binary body to be an object with an 'inputs' "
                           f"list. {SHAPE}")
    params = doc.get("parameters") if isinstance(doc.get("parameters"), dict) else {}
    request = KServeRequest(id=str(doc["id"])[:1000] if doc.get("id") is not None else None,
                            binary_all=params.get("binary_data_output") is True)
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list) or not all(
                isinstance(o, dict) and isinstance(o.get("name"), str) for o in doc["outputs"]):
            raise RequestError("Expected 'outputs' to be a list of objects with a 'name' each, e.g. "
                               '[{"name": "logits", "parameters": {"binary_data": true}}].')
        request.outputs = [o["name"] for o in doc["outputs"]]
        request.binary = {o["name"]: (o.get("parameters") or {}).get("binary_data") is True for o in doc["outputs"]
                          if isinstance(o.get("parameters") or {}, dict)}
    feeds: dict[str, Any] = {}
    offset = 0
    for entry in doc["inputs"]:
        name, arr, used = _tensor(entry, rest, offset, specs)
        feeds[name] = arr
        offset += used
    if offset != len(rest):
        raise RequestError(f"Expected the binary part of the body to hold exactly the inputs' binary_data_size bytes "
                           f"({offset} in all), but it holds {len(rest)}. Set binary_data_size on every binary input.")
    return Decoded(feeds, request)


def _tensor(entry: Any, rest: memoryview, offset: int, specs: Mapping[str, TensorSpec]) -> tuple[str, Any, int]:
    """(name, array, bytes of `rest` used) for one entry of 'inputs'."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise RequestError(f"Expected each entry of 'inputs' to be an object with a 'name', found {str(entry)[:100]}. "
                           f"{SHAPE}")
    name, shape, dt = entry["name"], entry.get("shape"), entry.get("datatype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise RequestError(f"Expected 'shape' of input '{name[:100]}' to be a list of non-negative integers, found "
                           f"{str(shape)[:100]}. {SHAPE}")
    spec = specs.get(name)
    want = datatype(spec.dtype) if spec is not None else None
    if dt not in DATATYPES or (want is not None and dt != want):
        expected = f"{want} (its manifest dtype is {spec.dtype})" if spec is not None else f"one of {sorted(DATATYPES)}"
        raise InvalidInput(f"Expected datatype {expected} for input '{name[:100]}', found {str(dt)[:40]}. Send the "
                           "input's own datatype; GET /v2/models/{name} lists them.")
    dtype = np.dtype(DATATYPES[dt]).newbyteorder("<")
    count = math.prod(shape)
    size = ((entry.get("parameters") or {}) if isinstance(entry.get("parameters"), dict) else {}).get(
        "binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != count * dtype.itemsize:
            raise RequestError(f"Expected binary_data_size of input '{name[:100]}' to be {count * dtype.itemsize} "
                               f"bytes (shape {shape} of {dt}), found {str(size)[:40]}.")
        if offset + size > len(rest):
            raise RequestError(f"Expected {size} bytes of binary data for input '{name[:100]}' after the JSON header, "
                               f"but the body ends {offset + size - len(rest)} bytes short (truncated?).")
        return name, np.frombuffer(rest[offset:offset + size], dtype=dtype).reshape(shape), size
    if "data" not in entry:
        raise RequestError(f"Expected 'data' (or binary_data_size) for input '{name[:100]}'. {SHAPE}")
    try:
        arr = np.asarray(entry["data"])
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise RequestError(f"Expected 'data' of input '{name[:100]}' to be a (flat or rectangular) list of numbers "
                           f"({str(exc)[:120]}).") from None
    if arr.size != count:
        raise RequestError(f"Expected input '{name[:100]}' to hold {count} values (shape {shape}), but its 'data' "
                           f"holds {arr.size}. Make 'shape' and 'data' agree.")
    converted = json_to_dtype(arr, spec or TensorSpec(name, DATATYPES[dt], ()))
    if isinstance(converted, str):
        raise InvalidInput(f"Expected JSON values that fit datatype {dt}, but {converted}.")
    return name, converted.reshape(shape), 0


def selected(request: KServeRequest, names: Sequence[str], model: str) -> list[str] | None:
    """The outputs the request's 'outputs' names (None: it names none, so all); 422 for unknown ones."""
    if request.outputs is None:
        return None
    unknown = [w[:100] for w in request.outputs if w not in names][:10]
    if unknown or not request.outputs:
        raise InvalidInput(f"Expected 'outputs' to name outputs of '{model}' ({', '.join(names)}), found "
                           f"{f'unknown ones {unknown}' if unknown else 'an empty list'}. Leave 'outputs' out for all.")
    return list(dict.fromkeys(request.outputs))


def encode_response(model: str, outputs: Mapping[str, np.ndarray], request: KServeRequest) -> tuple[bytes, int | None]:
    """The response body and, when it carries binary outputs, its JSON header's length."""
    entries, blobs = [], []
    for name, value in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": TO_DATATYPE.get(value.dtype.name, value.dtype.name.upper()),
                                 "shape": list(value.shape)}
        if request.binary.get(name, request.binary_all):
            blob = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = value.ravel().tolist()
        entries.append(entry)
    doc = {"model_name": model, "model_version": "1", **({"id": request.id} if request.id is not None else {}),
           "outputs": entries}
    head = json.dumps(doc).encode()
    return (b"".join([head, *blobs]), len(head)) if blobs else (head, None)


__all__ = ["DATATYPES", "HEADER", "Decoded", "KServeRequest", "datatype", "decode_request", "encode_response",
           "selected", "tensor_metadata"]
