"""The KServe v2 / Triton HTTP protocol: the JSON and binary-tensor bodies decode to the feeds they
describe and refuse what does not fit with a 4xx, and the real tritonclient.http, unchanged, drives a
real `enginekit serve` (health, metadata, infer with binary and with JSON tensors) to answers equal, bit
for bit, to direct runtime calls."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import runtimes
from bench.loadtest import serve_process
from runtimes.errors import InvalidInput
from runtimes.manifest import TensorSpec
from runtimes.samples import generate_feeds
from runtimes.serve.codec import JSON, RequestError
from runtimes.serve.kserve import KServeRequest, decode_request, encode_response

SPECS = [TensorSpec("ids", "int64", ("batch", 3)), TensorSpec("x", "float32", ("batch", 2)),
         TensorSpec("flag", "bool", ("batch",)), TensorSpec("h", "float16", (2,))]
LIMIT = 1 << 20
ENGINEKIT = str(Path(sys.executable).with_name("enginekit"))


def binary_body(tensors: dict[str, np.ndarray], extra: dict | None = None) -> tuple[bytes, str]:
    """A body as tritonclient builds it: JSON header, then each tensor's raw bytes; and the header length."""
    dts = {"int64": "INT64", "float32": "FP32", "bool": "BOOL", "float16": "FP16", "int32": "INT32"}
    head = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": dts[v.dtype.name],
                        "parameters": {"binary_data_size": v.nbytes}} for k, v in tensors.items()], **(extra or {})}
    text = json.dumps(head).encode()
    return text + b"".join(v.tobytes() for v in tensors.values()), str(len(text))


def test_json_v2_body_round_trip():
    body = json.dumps({"id": "r1", "inputs": [
        {"name": "ids", "shape": [2, 3], "datatype": "INT64", "data": [1, 2, 3, 4, 5, 6]},  # flat
        {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[0.5, 1], [2, 3.25]]},  # nested
        {"name": "flag", "shape": [2], "datatype": "BOOL", "data": [True, False]},
        {"name": "h", "shape": [2], "datatype": "FP16", "data": [0.5, 1.5]}],
        "outputs": [{"name": "y", "parameters": {"binary_data": False}}]}).encode()
    for ctype in (JSON, None):  # tritonclient sends no Content-Type at all
        decoded = decode_request(body, ctype, None, SPECS, limit=LIMIT)
        f = decoded.feeds
        assert f["ids"].dtype == np.int64 and f["ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
        assert f["x"].dtype == np.float32 and f["x"].tolist() == [[0.5, 1], [2, 3.25]]
        assert f["flag"].tolist() == [True, False] and f["h"].dtype == np.float16
        assert decoded.kserve == KServeRequest(id="r1", outputs=["y"], binary={"y": False})
    y = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    answer, head = encode_response("m", {"y": y}, decoded.kserve)
    doc = json.loads(answer)
    assert head is None and doc["model_name"] == "m" and doc["model_version"] == "1" and doc["id"] == "r1"
    out = doc["outputs"][0]
    assert (out["name"], out["datatype"], out["shape"]) == ("y", "FP32", [2, 3])
    assert np.array_equal(np.asarray(out["data"], np.float32).reshape(2, 3), y)  # float32 exactly


def test_binary_body_with_inference_header_content_length():
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    x = np.linspace(-1, 1, 4, dtype=np.float32).reshape(2, 2)
    body, n = binary_body({"ids": ids, "x": x}, {"parameters": {"binary_data_output": True}})
    for ctype in (None, "application/octet-stream", JSON):  # the header decides, whatever the Content-Type
        decoded = decode_request(body, ctype, n, SPECS, limit=LIMIT)
        assert np.array_equal(decoded.feeds["ids"], ids) and np.array_equal(decoded.feeds["x"], x)
        assert decoded.feeds["x"].dtype == np.float32 and decoded.kserve.binary_all
    y = np.arange(12, dtype=np.float32).reshape(3, 4)
    flag = np.array([True, False])
    answer, head = encode_response("m", {"y": y, "flag": flag}, decoded.kserve)
    doc = json.loads(answer[:head])
    assert [o["parameters"]["binary_data_size"] for o in doc["outputs"]] == [48, 2]
    assert "data" not in doc["outputs"][0] and doc["outputs"][1]["datatype"] == "BOOL"
    assert np.array_equal(np.frombuffer(answer[head:head + 48], np.float32).reshape(3, 4), y)
    assert answer[head + 48:] == b"\x01\x00"
    # per output: binary_data picks which ones are raw; the rest stay JSON
    mixed = KServeRequest(outputs=["y", "flag"], binary={"y": True, "flag": False})
    answer, head = encode_response("m", {"y": y, "flag": flag}, mixed)
    assert len(answer) == head + 48 and json.loads(answer[:head])["outputs"][1]["data"] == [True, False]


@pytest.mark.parametrize("entry, expect", [
    ({"name": "ids", "shape": [1, 3], "datatype": "INT32", "data": [1, 2, 3]}, "datatype INT64"),
    ({"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [1, 2]}, "datatype FP32"),
    ({"name": "x", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}, "found BYTES"),
    ({"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [1.5, 2, 3]}, "fractional numbers"),
    ({"name": "flag", "shape": [1], "datatype": "BOOL", "data": [1]}, "needs bool values"),
])
def test_a_datatype_other_than_the_inputs_is_422(entry, expect):
    with pytest.raises(InvalidInput, match=expect):
        decode_request(json.dumps({"inputs": [entry]}).encode(), JSON, None, SPECS, limit=LIMIT)


@pytest.mark.parametrize("entry, expect", [
    ({"name": "ids", "shape": [2, 3], "datatype": "INT64", "data": [1, 2, 3]}, "hold 6 values .* holds 3"),
    ({"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [[1, 2], [3, 4]]}, "holds 4"),
    ({"name": "ids", "shape": [1, -3], "datatype": "INT64", "data": [1, 2, 3]}, "non-negative integers"),
    ({"name": "ids", "shape": "1x3", "datatype": "INT64", "data": [1, 2, 3]}, "non-negative integers"),
    ({"name": "ids", "shape": [1, 3], "datatype": "INT64"}, "Expected 'data'"),
    ({"name": "ids", "shape": [2], "datatype": "INT64", "data": [[1, 2], [3]]}, "rectangular"),
    ({"shape": [1], "datatype": "INT64", "data": [1]}, "with a 'name'"),
])
def test_shape_and_data_that_disagree_are_400(entry, expect):
    with pytest.raises(RequestError, match=expect) as err:
        decode_request(json.dumps({"inputs": [entry]}).encode(), JSON, None, SPECS, limit=LIMIT)
    assert err.value.status == 400


def test_truncated_or_inconsistent_binary_bodies_are_400():
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    body, n = binary_body({"ids": ids})
    cases = [
        (body[:-1], n, "body ends 1 bytes short"),
        (body + b"\0", n, "holds 49"),
        (body, str(len(body) + 1), "Inference-Header-Content-Length"),
        (body, "abc", "Inference-Header-Content-Length"),
        (body, "0", "Inference-Header-Content-Length"),
        (body, str(int(n) - 1), "does not parse"),
        (body.replace(b'"binary_data_size": 48', b'"binary_data_size": 40'), n, "to be 48 bytes"),
        (b"[1, 2]" + body, "6", "an object with an 'inputs' list"),
    ]
    for payload, length, expect in cases:
        with pytest.raises(RequestError, match=expect) as err:
            decode_request(payload, None, length, SPECS, limit=LIMIT)
        assert err.value.status == 400, expect


def test_without_content_type_only_kserve_json_is_read_and_the_rest_is_415():
    for body in (b'{"inputs": {"ids": [[1, 2, 3]]}}', b"not json", b"{broken", b"PK\x03\x04"):
        with pytest.raises(RequestError, match="no Content-Type header") as err:
            decode_request(body, None, None, SPECS, limit=LIMIT)
        assert err.value.status == 415
    short = decode_request(b'{"inputs": {"ids": [[1, 2, 3]]}}', JSON, None, SPECS, limit=LIMIT)
    assert short.kserve is None and short.feeds["ids"].dtype == np.int64


# -- end to end: the real tritonclient.http against the real service ------------------------------------

CLIENT = textwrap.dedent('''
    import json, sys
    import numpy as np
    import tritonclient.http as th

    url, model, feeds_path, out_path = sys.argv[1:5]
    feeds = dict(np.load(feeds_path))
    c = th.InferenceServerClient(url)
    report = {"live": c.is_server_live(), "ready": c.is_server_ready(), "model_ready": c.is_model_ready(model),
              "missing_ready": c.is_model_ready("nope"), "server": c.get_server_metadata(),
              "model": c.get_model_metadata(model)}
    dts = {i["name"]: i["datatype"] for i in report["model"]["inputs"]}
    outs = [o["name"] for o in report["model"]["outputs"]]
    results = {}
    for binary in (True, False):
        inputs = []
        for name, value in feeds.items():
            t = th.InferInput(name, list(value.shape), dts[name])
            t.set_data_from_numpy(value, binary_data=binary)
            inputs.append(t)
        requested = None if binary else [th.InferRequestedOutput(o, binary_data=False) for o in outs]
        r = c.infer(model, inputs, outputs=requested, request_id="req-%d" % binary)
        for o in outs:
            results[("bin_" if binary else "json_") + o] = r.as_numpy(o)
        report["response_%s" % binary] = r.get_response()
    try:
        t = th.InferInput("input_ids", [1, 2], "FP32")
        t.set_data_from_numpy(np.zeros((1, 2), np.float32))
        c.infer(model, [t])
    except th.InferenceServerException as exc:
        report["wrong_datatype"] = [exc.status(), exc.message()]
    np.savez(out_path, **results)
    print(json.dumps(report))
''')


def client_python(request) -> Path:
    """A Python that can import tritonclient.http: this one, or the Triton test venv (geventhttpclient)."""
    if subprocess.run([sys.executable, "-c", "import tritonclient.http"], capture_output=True).returncode == 0:
        return Path(sys.executable)
    return request.getfixturevalue("triton_env")["python"]


@pytest.mark.slow
def test_tritonclient_http_drives_enginekit_serve_bit_for_bit(bert_bundle, tmp_path, request):
    python = client_python(request)
    with runtimes.load(bert_bundle) as r:
        feeds = generate_feeds(r.manifest.io, {"batch": 3, "sequence": 11}, seed=4)
        want = r.infer(feeds)
        version = runtimes.__version__
    np.savez(tmp_path / "feeds.npz", **feeds)
    (tmp_path / "client.py").write_text(CLIENT)
    with serve_process([ENGINEKIT, "serve", str(bert_bundle), "--port", "0"]) as s:
        run = subprocess.run([str(python), str(tmp_path / "client.py"), s.url.removeprefix("http://"), "bert",
                              str(tmp_path / "feeds.npz"), str(tmp_path / "out.npz")],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "Traceback" not in "".join(s.lines)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["live"] and report["ready"] and report["model_ready"] and not report["missing_ready"]
    assert report["server"] == {"name": "enginekit", "version": version, "extensions": ["binary_tensor_data"]}
    meta = report["model"]
    assert meta["name"] == "bert" and meta["versions"] == ["1"] and meta["platform"].startswith("enginekit-")
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        (n, "INT64", [-1, -1]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    assert meta["outputs"][0]["shape"] == [-1, -1, 32] and "batching" in meta  # the extra fields stay
    got = dict(np.load(tmp_path / "out.npz"))
    for name, value in want.items():
        for mode in ("bin_", "json_"):
            assert got[mode + name].dtype == value.dtype and np.array_equal(got[mode + name], value), mode + name
    binary, as_json = report["response_True"], report["response_False"]
    assert binary["id"] == "req-1" and all("binary_data_size" in o["parameters"] for o in binary["outputs"])
    assert as_json["id"] == "req-0" and all("data" in o for o in as_json["outputs"])
    status, message = report["wrong_datatype"]
    assert status == "422" and "datatype INT64" in message
