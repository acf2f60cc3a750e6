"""Request decoding: JSON numbers take the manifest's dtypes, .npz bodies are checked before unpacking."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from runtimes.errors import InvalidInput
from runtimes.manifest import TensorSpec
from runtimes.serve.codec import JSON, NPZ, RequestError, decode_inputs, encode_outputs, response_kind

SPECS = [TensorSpec("ids", "int32", ("batch", 4)), TensorSpec("x", "float32", ("batch", 2)),
         TensorSpec("flag", "bool", ("batch",))]


def test_json_numbers_take_the_inputs_dtypes():
    feeds = decode_inputs(b'{"inputs": {"ids": [[1, 2, 3, 4]], "x": [[1, 2.5]], "flag": [true]}}', JSON, SPECS, limit=1 << 20)
    assert {k: v.dtype.name for k, v in feeds.items()} == {"ids": "int32", "x": "float32", "flag": "bool"}


@pytest.mark.parametrize("body, message", [
    (b'{"inputs": {"ids": [[1.5, 2, 3, 4]]}}', "needs int32 values, found fractional numbers"),
    (b'{"inputs": {"ids": [[3000000000, 2, 3, 4]]}}', "outside the int32 range"),
    (b'{"inputs": {"ids": [["a", "b"]]}}', "found strings"),
    (b'{"inputs": {"ids": [[1, 2], [3]]}}', "not a rectangular array"),
    (b'{"inputs": {"x": [[100000000000000000000000, 1]], "ids": [[1e400]]}}', "'ids'"),
    (b'{"inputs": {"flag": [1]}}', "needs bool values"),
])
def test_json_values_that_do_not_fit_are_invalid_input(body, message):
    with pytest.raises(InvalidInput, match=message):
        decode_inputs(body, JSON, SPECS, limit=1 << 20)


@pytest.mark.parametrize("body", [b"{bad", b"[1, 2]", b'{"ids": [1]}', b"", b"[" * 100_000, b"\xff\xfe"])
def test_unreadable_json_is_a_400(body):
    with pytest.raises(RequestError) as err:
        decode_inputs(body, JSON, SPECS, limit=1 << 20)
    assert err.value.status == 400


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_npz_round_trip_keeps_dtypes_and_shapes():
    ids = np.arange(8, dtype=np.int32).reshape(2, 4)
    feeds = decode_inputs(_npz(ids=ids), NPZ, SPECS, limit=1 << 20)
    assert feeds["ids"].dtype == np.int32 and np.array_equal(feeds["ids"], ids)


def test_npz_header_declaring_more_than_it_holds_is_refused_before_allocating():
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    member.write(b"\0" * 16)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", member.getvalue())
    with pytest.raises(RequestError, match="only .* bytes"):
        decode_inputs(buf.getvalue(), NPZ, SPECS, limit=1 << 20)


def test_npz_limits_unpacked_size_and_refuses_pickles_and_garbage():
    big = io.BytesIO()
    np.savez_compressed(big, x=np.zeros((1024, 1024), np.float32))  # 4 MiB of zeros compress to ~4 kB
    with pytest.raises(RequestError) as err:
        decode_inputs(big.getvalue(), NPZ, SPECS, limit=1 << 20)
    assert err.value.status == 413
    with pytest.raises(RequestError, match="cannot be read"):
        decode_inputs(_npz(x=np.array([{"a": 1}], dtype=object)), NPZ, SPECS, limit=1 << 20)
    with pytest.raises(RequestError, match="cannot be read"):
        decode_inputs(b"PK\x03\x04 not really a zip", NPZ, SPECS, limit=1 << 20)


def test_other_content_types_are_415_and_responses_follow_accept():
    with pytest.raises(RequestError) as err:
        decode_inputs(b"x", "text/plain", SPECS, limit=1 << 20)
    assert err.value.status == 415
    assert response_kind(None, NPZ) == NPZ and response_kind("application/json", NPZ) == JSON
    assert response_kind(f"{NPZ}, */*", JSON) == NPZ and response_kind("*/*", JSON) == JSON
    out = np.array([[0.1, 1e-30, -3.4e38]], np.float32)
    import json

    back = np.asarray(json.loads(encode_outputs("m", {"y": out}, JSON))["outputs"]["y"], np.float32)
    assert np.array_equal(back, out)  # float32 survives JSON exactly


@pytest.mark.parametrize("body, found", [
    (b'{"input": {"ids": [[1]]}}', "found no 'inputs' key (keys: input)"),
    (b"{}", "found no 'inputs' key (an empty object)"),
    (b"[1, 2]", "found a JSON array as the body"),
    (b'{"inputs": null}', "found a JSON null under 'inputs'"),
    (b'{"inputs": [[1, 2]]}', "found a JSON array under 'inputs'"),
])
def test_a_body_without_an_inputs_object_says_what_it_found(body, found):
    """Not Python's type names ("found NoneType"): what the client sent, in JSON's terms."""
    with pytest.raises(RequestError) as err:
        decode_inputs(body, JSON, SPECS, limit=1 << 20)
    assert found in str(err.value) and "NoneType" not in str(err.value)
