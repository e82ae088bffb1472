"""The BentoML service end to end: a real `bentoml serve` on a free port, real media, real HTTP.

One server (module fixture) serves a tiny exported bundle from the BentoML model store; the
tests call it with bentoml.SyncHTTPClient and with raw multipart HTTP (httpx) and compare
every answer with offline prediction on the same files.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import BIN, REPO, SETTINGS, make_tiny_run, setting_id, start_server, stop_server, wait_ready, write_sample

UPLOAD_LIMIT_MB = 1          # DIMML_MAX_UPLOAD_MB for the server under test
MAX_DURATION_S = 2.0         # DIMML_MAX_DURATION_S: long.mp4 (3 s) is refused
MODEL_NAME = "dimml-serving-test"

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------
# fixtures: media, bundle, server

def _frames(n: int, seed: int, size: int = 64) -> np.ndarray:
    """Random-coloured blocks, different per seed (so clips get different answers)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, size // 8, size // 8, 3), dtype=np.uint8)
    return blocks.repeat(8, axis=1).repeat(8, axis=2)


def _tone(seconds: float, freq: float, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Real files written with PyAV: good, degraded and broken."""
    from training.synth import write_clip

    d = tmp_path_factory.mktemp("media")
    f = {
        "av": write_clip(d / "av.mp4", _frames(15, 1), 15, _tone(1.0, 440)),
        "av2": write_clip(d / "av2.mp4", _frames(15, 2), 15, _tone(1.5, 1200)),
        "silent": write_clip(d / "silent.mp4", _frames(15, 3), 15, None),
        "wav": write_clip(d / "tone.wav", None, audio=_tone(1.0, 660)),
        "long": write_clip(d / "long.mp4", _frames(45, 4, 32), 15, _tone(3.0, 440)),
        "flv": write_clip(d / "clip.flv", _frames(27, 5, 64), 15, _tone(1.8, 550)),   # flv1 + mp3, as CREMA-D
        "cut_flv": d / "cut.flv",
        "empty": d / "empty.mp4",
        "garbage": d / "garbage.mp4",
        "truncated": d / "truncated.mp4",
        "big": d / "big.mp4",
    }
    rng = np.random.default_rng(0)
    f["empty"].write_bytes(b"")
    f["garbage"].write_bytes(rng.bytes(4096))
    whole = f["av"].read_bytes()
    f["truncated"].write_bytes(whole[: len(whole) // 2])   # mp4 index (moov) is at the end: gone
    flv = f["flv"].read_bytes()
    f["cut_flv"].write_bytes(flv[: len(flv) // 3])          # still decodes: a damaged answer
    f["big"].write_bytes(rng.bytes(int(1.5 * UPLOAD_LIMIT_MB * 2**20)))
    return f


@pytest.fixture(scope="module")
def bentoml_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bentoml_home")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, bentoml_home) -> Path:
    """A tiny audio,visual run with random weights, exported by the real CLI and registered in the model store."""
    root = tmp_path_factory.mktemp("export")
    make_tiny_run(root / "run", "audio,visual", classes=("bark", "chime", "drum"))
    out = root / "bundle"
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home)}
    r = subprocess.run([sys.executable, "-m", "export", "bundle", "--run", str(root / "run"),
                        "--out", str(out), "--register", MODEL_NAME, "--exporter", "torchscript", "--quiet"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def server(bundle, bentoml_home, tmp_path_factory):
    """The server under test, serving the bundle by its model-store tag; yields its base URL."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "DIMML_BUNDLE": f"{MODEL_NAME}:latest",
           "DIMML_MAX_UPLOAD_MB": str(UPLOAD_LIMIT_MB), "DIMML_MAX_DURATION_S": str(MAX_DURATION_S),
           "DIMML_MAX_BATCH_SIZE": "8", "DIMML_MAX_LATENCY_MS": "30000", "DIMML_MAX_BATCH_VIDEOS": "6"}
    proc, url = start_server(env, log_path)
    try:
        wait_ready(proc, url, log_path)
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def offline(bundle):
    """Offline prediction on files: same decoding contract, same bundle, same backend choice."""
    from dimml.bundle import load_bundle
    from dimml.predict import Predictor

    predictor = Predictor(load_bundle(bundle))
    cfg = dataclasses.replace(predictor.preprocess, max_duration_s=MAX_DURATION_S)

    def run(files: Path | dict) -> dict:
        files = files if isinstance(files, dict) else {"video": files}
        return predictor.predict_clips([predictor.decode(files, cfg=cfg)])[0]

    return run


@pytest.fixture(scope="module")
def client(server):
    import bentoml

    with bentoml.SyncHTTPClient(server, timeout=60) as c:
        yield c


def _post(url: str, files, timeout: float = 60) -> httpx.Response:
    return httpx.post(url, files=files, timeout=timeout)


def _file(path: Path, field: str = "video"):
    return (field, (path.name, path.read_bytes(), "application/octet-stream"))


def assert_same_answer(got: dict, want: dict) -> None:
    """Server answer == offline answer (labels, modalities exact; numbers up to the float noise
    of a different batch composition, far below what any preprocessing difference causes)."""
    assert got["label"] == want["label"]
    assert got["modalities_used"] == want["modalities_used"]
    assert got["model"] == want["model"] and got["backend"] == want["backend"]
    assert got["final_output"] == want["final_output"] and got["final_output"]["rule"]
    assert list(got["probabilities"]) == list(want["probabilities"])
    np.testing.assert_allclose(list(got["probabilities"].values()),
                               list(want["probabilities"].values()), rtol=1e-5, atol=1e-6)
    assert set(got["branches"]) == set(want["branches"])
    for b, g in got["branches"].items():
        np.testing.assert_allclose([g["weight"], g["certainty"]],
                                   [want["branches"][b]["weight"], want["branches"][b]["certainty"]],
                                   rtol=1e-5, atol=1e-6)


def assert_well_formed(answer: dict) -> None:
    """Weights sum to 1; probabilities = softmax(sum_i w_i z_i) with z_i recovered from each branch."""
    branches = answer["branches"]
    assert math.isclose(sum(b["weight"] for b in branches.values()), 1.0, abs_tol=1e-9)
    # log-probabilities equal logits up to a per-branch constant, which softmax removes
    z = sum(b["weight"] * np.log(np.clip(list(b["probabilities"].values()), 1e-300, None))
            for b in branches.values())
    p = np.exp(z - z.max())
    np.testing.assert_allclose(list(answer["probabilities"].values()), p / p.sum(), atol=1e-6)
    assert answer["label"] == max(answer["probabilities"], key=answer["probabilities"].get)


# ---------------------------------------------------------------------------------------
# answers

def test_predict_with_typed_client_matches_offline(client, media, offline):
    got = client.predict(video=media["av"])
    assert got["modalities_used"] == ["audio", "visual"]
    assert set(got["branches"]) == {"audio", "visual", "fusion"}
    assert_well_formed(got)
    assert_same_answer(got, offline(media["av"]))


def test_video_plus_own_audio_file_raw_multipart_matches_offline(server, media, offline):
    """A silent video plus a separate audio file (what /predict_av took before): /predict's `audio` field."""
    r = _post(f"{server}/predict", [_file(media["silent"], "video"), _file(media["wav"], "audio")])
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["modalities_used"] == ["audio", "visual"]
    assert_well_formed(got)
    assert_same_answer(got, offline({"video": media["silent"], "audio": media["wav"]}))
    assert _post(f"{server}/predict_av", [_file(media["silent"], "video")]).status_code == 404   # folded into /predict


def test_predict_batch_keeps_order_and_mixes_modalities(client, server, media, offline):
    order = ["av2", "silent", "av", "wav", "av2"]
    got = client.predict_batch(videos=[media[k] for k in order])
    assert len(got) == len(order)
    for k, answer in zip(order, got):
        assert_well_formed(answer)
        assert_same_answer(answer, offline(media[k]))
    # the same request as raw multipart (repeated field) gives the same answers
    r = _post(f"{server}/predict_batch", [_file(media[k], "videos") for k in order])
    assert r.status_code == 200, r.text
    for a, b in zip(r.json(), got):
        assert_same_answer(a, b)


def test_damaged_media_are_answered_with_their_warnings(server, media, offline):
    """A .flv cut to a third decodes (FFmpeg: "illegal dc ... Error at MB"): answered, saying so; clean files never."""
    r = _post(f"{server}/predict", [_file(media["cut_flv"])])
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["warnings"] and all(w.startswith("video 'cut.flv': ") for w in got["warnings"])   # the upload
    assert any("the video stream ends at" in w for w in got["warnings"])
    # the same findings offline (the file's name aside: the server names the upload)
    assert [w.split(": ", 1)[1] for w in offline(media["cut_flv"])["warnings"]] == \
        [w.split(": ", 1)[1] for w in got["warnings"]]
    for key in ("flv", "av", "av2"):
        assert _post(f"{server}/predict", [_file(media[key])]).json()["warnings"] == [], key
    r = _post(f"{server}/predict_batch", [_file(media[k], "videos") for k in ("flv", "cut_flv", "av")])
    assert [bool(a["warnings"]) for a in r.json()] == [False, True, False]


@pytest.mark.parametrize("key,used", [("silent", ["visual"]), ("wav", ["audio"])])
def test_one_modality_is_answered_by_its_branch_alone(server, media, offline, key, used):
    r = _post(f"{server}/predict", [_file(media[key])])
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["modalities_used"] == used
    assert list(got["branches"]) == used and got["branches"][used[0]]["weight"] == 1.0
    np.testing.assert_allclose(list(got["probabilities"].values()),
                               list(got["branches"][used[0]]["probabilities"].values()), rtol=1e-12)
    assert_same_answer(got, offline(media[key]))


def test_64_request_burst_all_succeed(server, media, offline):
    """64 requests at once (64 client threads, one connection each): all 200, all equal to offline."""
    keys = ["av", "av2", "silent", "wav"] * 16
    want = {k: offline(media[k]) for k in set(keys)}
    start = concurrent.futures.thread.threading.Barrier(len(keys))

    def call(k: str) -> tuple[str, httpx.Response]:
        start.wait(timeout=60)   # released together: a burst, not a ramp
        return k, _post(f"{server}/predict", [_file(media[k])], timeout=180)

    with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
        results = list(pool.map(call, keys))
    assert [r.status_code for _, r in results] == [200] * 64, [r.text for _, r in results if r.status_code != 200]
    for k, r in results:
        assert_same_answer(r.json(), want[k])


def test_python_api_equals_the_served_answer(server, bundle, media):
    """dimml.Predictor(...).predict on the same files gives the server's answer (one, a list, by field)."""
    import dimml

    predictor = dimml.Predictor(bundle)
    served = _post(f"{server}/predict", [_file(media["av"])]).json()
    local = predictor.predict(media["av"])
    assert isinstance(local, dimml.Prediction)
    assert_same_answer(served, local.to_dict())
    batch = _post(f"{server}/predict_batch", [_file(media[k], "videos") for k in ("av2", "silent")]).json()
    for got, want in zip(predictor.predict([media["av2"], media["silent"]]), batch):
        assert_same_answer(want, got.to_dict())
    served = _post(f"{server}/predict", [_file(media["silent"], "video"), _file(media["wav"], "audio")]).json()
    assert_same_answer(served, predictor.predict(video=media["silent"], audio=media["wav"]).to_dict())


def test_sustained_load_past_connection_recycling(server, media):
    """150 calls from 8 clients all succeed (BentoML's default recycled the inter-service
    connection every 100 calls and failed the requests in flight)."""
    def call(i: int) -> int:
        return _post(f"{server}/predict", [_file(media["av"])], timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(call, range(150)))
    assert codes == [200] * 150, sorted(set(codes))


# ---------------------------------------------------------------------------------------
# bad input: 4xx JSON naming the cause, and the server keeps serving

@pytest.mark.parametrize("key,cause,words", [
    ("empty", "empty", "empty file"),
    ("garbage", "not_media", "not a decodable media file"),
    ("truncated", "not_media", "not a decodable media file"),
    ("long", "too_long", "exceeds the maximum"),
])
def test_bad_media_is_a_422_naming_file_and_cause(server, media, key, cause, words):
    r = _post(f"{server}/predict", [_file(media[key])])
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["cause"] == cause
    assert words in body["error"] and media[key].name in body["error"]


def test_bad_files_in_a_batch_get_their_error_in_their_slot(server, media, offline):
    """/predict_batch answers per item: the good files their predictions, each bad one its error."""
    order = ("av", "garbage", "av2", "empty")
    r = _post(f"{server}/predict_batch", [_file(media[k], "videos") for k in order])
    assert r.status_code == 200, r.text
    items = r.json()
    assert len(items) == 4
    assert_same_answer(items[0], offline(media["av"]))
    assert_same_answer(items[2], offline(media["av2"]))
    assert items[1] == {"error": items[1]["error"], "cause": "not_media", "status": 422}
    assert "videos[1] 'garbage.mp4'" in items[1]["error"]
    assert items[3]["cause"] == "empty" and items[3]["status"] == 422 and "videos[3] 'empty.mp4'" in items[3]["error"]
    # one bad file alone: still a list, with its error
    r = _post(f"{server}/predict_batch", [_file(media["garbage"], "videos")])
    assert r.status_code == 200 and r.json()[0]["cause"] == "not_media"
    # the typed client raises for the bad slot, with its status
    from clients.http import Client, ServerError
    with Client(server) as c, pytest.raises(ServerError) as e:
        c.predict_batch([media["av"], media["garbage"]])
    assert e.value.status == 422 and "garbage.mp4" in e.value.message


def _raw_multipart(url: str, field: str, filename: bytes, data: bytes) -> httpx.Response:
    """A multipart POST whose filename parameter is these exact bytes (httpx would encode it)."""
    boundary = b"dimmlnameboundary"
    body = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + field.encode() + b"\"; filename=\""
            + filename + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n" + data
            + b"\r\n--" + boundary + b"--\r\n")
    return httpx.post(url, content=body, timeout=60,
                      headers={"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"})


@pytest.mark.parametrize("name,status", [
    (b"x" * 296 + b".mp4", 400),                        # 300 characters: BentoML's temp file name would overflow
    (("\u00e9" * 150 + ".mp4").encode(), 400),       # 154 characters, 304 bytes
    (b"clip\x00.mp4", 400),                             # NUL
    (b"clip\x01\x1f.mp4", 400),                         # control characters
    (b"clip\xff\xfe.mp4", 400),                         # not UTF-8
    (b"../../etc/" + b"d/" * 200 + b"av.mp4", 200),      # path separators: only the last component is used
    (b"C:\\Users\\me\\av.mp4", 200),
    ("caf\u00e9 \u2013 \u97f3.mp4".encode(), 200),          # non-ASCII UTF-8 is fine
])
def test_odd_client_file_names_are_4xx_or_sanitised_never_500(server, media, offline, name, status):
    data = media["av"].read_bytes()
    for endpoint, field in (("/predict", "video"), ("/predict_batch", "videos")):
        r = _raw_multipart(f"{server}{endpoint}", field, name, data)
        assert r.status_code == status, (endpoint, r.status_code, r.text[:500])
        if status == 200:
            answer = r.json() if endpoint == "/predict" else r.json()[0]
            assert_same_answer(answer, offline(media["av"]))
        else:
            assert r.json()["cause"] == "bad_filename" and "rename the file" in r.json()["error"]


def test_too_many_files_in_a_batch_is_413(server, media):
    r = _post(f"{server}/predict_batch", [_file(media["wav"], "videos")] * 7)
    assert r.status_code == 413 and r.json()["cause"] == "too_many_files"
    assert "at most 6" in r.json()["error"]


def test_a_modality_own_file_must_hold_it(server, media):
    """A file sent in a modality's own field must hold that modality (a missing video track is fine)."""
    r = _post(f"{server}/predict", [_file(media["av"], "video"), _file(media["silent"], "audio")])
    assert r.status_code == 422
    assert r.json()["cause"] == "no_audio" and "silent.mp4" in r.json()["error"]


def test_no_file_or_an_unknown_field_is_a_400(server, media):
    r = _post(f"{server}/predict", [("note", (None, b"a text part, no file"))])
    assert r.status_code == 400 and r.json()["cause"] == "bad_request"
    assert "at least one of the fields video, audio, visual" in r.json()["error"]
    r = _post(f"{server}/predict", [_file(media["av"]), _file(media["wav"], "sound")])
    assert r.status_code == 400 and r.json()["cause"] == "unknown_field"
    assert "'sound'" in r.json()["error"] and "video, audio, visual" in r.json()["error"]


def test_oversize_upload_is_413_before_reading(server, media):
    r = _post(f"{server}/predict", [_file(media["big"])])
    assert r.status_code == 413 and r.json()["cause"] == "too_large"
    assert "upload limit" in r.json()["error"]


def test_oversize_chunked_upload_is_cut_off(server, media):
    """No Content-Length: the guard counts the streamed body and stops at the limit."""
    boundary = "dimmltestboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"big.mp4\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    payload = media["big"].read_bytes()

    def body():
        yield head
        for i in range(0, len(payload), 64 * 1024):
            yield payload[i:i + 64 * 1024]
        yield f"\r\n--{boundary}--\r\n".encode()

    r = httpx.post(f"{server}/predict", content=body(), timeout=60,
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413 and r.json()["cause"] == "too_large"


def test_server_side_paths_are_never_opened(server, media):
    """A JSON string (or a text form field) naming a file on the server is refused, not read."""
    secret = str(media["av"])   # a real, decodable file on the server's disk
    r = httpx.post(f"{server}/predict", json={"video": secret}, timeout=30)
    assert 400 <= r.status_code < 500 and "label" not in r.json()
    assert "multipart/form-data" in r.json()["error"]
    r = httpx.post(f"{server}/predict", data={"video": secret}, files=[_file(media["wav"], "other")],
                   timeout=30)
    assert r.status_code == 400 and r.json()["cause"] == "not_a_file"
    r = httpx.post(f"{server}/predict_batch", json={"videos": [secret]}, timeout=30)
    assert 400 <= r.status_code < 500 and isinstance(r.json(), dict) and "label" not in r.text


def test_typed_client_sees_4xx_errors(client, media):
    import bentoml

    with pytest.raises(bentoml.exceptions.BentoMLException) as e:
        client.predict(video=media["garbage"])
    assert e.value.error_code == 422 and "not_media" in str(e.value)


def test_still_serving_after_bad_requests(client, server, media, offline):
    """Runs after the error tests (file order): the same server still answers correctly."""
    assert httpx.get(f"{server}/readyz", timeout=10).status_code == 200
    assert_same_answer(client.predict(video=media["av2"]), offline(media["av2"]))


# ---------------------------------------------------------------------------------------
# metadata, readiness, metrics, build

def test_metadata_reports_model_backend_and_fields(client, bundle, server):
    from dimml.engines import open_engine

    meta = client.metadata()
    assert meta["backend"] == open_engine(str(bundle)).backend
    assert meta["tag"].startswith(f"{MODEL_NAME}:")
    assert meta["classes"] == ["bark", "chime", "drum"]
    assert meta["modalities"] == ["audio", "visual"] and meta["fields"] == ["video"]
    assert meta["upload_fields"] == ["video", "audio", "visual"] and meta["schema_version"] == 2
    assert meta["endpoints"] == ["/predict", "/predict_batch"]
    assert meta["limits"]["max_upload_bytes"] == UPLOAD_LIMIT_MB * 2**20
    assert meta["batching"]["max_batch_size"] == 8
    # the API schema BentoML publishes names the same fields, all optional
    schema = httpx.get(f"{server}/docs.json", timeout=10).json()["paths"]["/predict"]["post"]["requestBody"]
    form = schema["content"]["multipart/form-data"]["schema"]
    assert list(form["properties"]) == ["video", "audio", "visual"] and not form.get("required")


def test_docs_json_documents_answers_and_errors(server, client, media):
    """/docs.json: every field of an answer (with a description), the batch item's two shapes,
    and the 4xx statuses with the error body."""
    doc = httpx.get(f"{server}/docs.json", timeout=10).json()
    schemas = doc["components"]["schemas"]
    paths = doc["paths"]
    answer = paths["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    keys = ["label", "probabilities", "branches", "modalities_used", "model", "backend", "final_output", "warnings"]
    assert list(answer["properties"]) == keys and answer["required"] == keys[:-1]   # warnings: [] when clean
    assert all(answer["properties"][k].get("description") for k in keys)
    assert list(client.predict(video=media["av"])) == keys   # the answer has exactly these, in this order
    branch = schemas["BranchAnswer"]["properties"]
    assert set(branch) == {"probabilities", "certainty", "weight"} and all(v["description"] for v in branch.values())
    final = schemas["FinalOutput"]["properties"]
    assert set(final) == {"rule", "reason"} and all(v["description"] for v in final.values())
    assert set(schemas["ModelInfo"]["properties"]) == {"name", "version", "precision"}
    items = paths["/predict_batch"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert items["type"] == "array"
    assert items["items"]["anyOf"] == [{"$ref": "#/components/schemas/Answer"},
                                       {"$ref": "#/components/schemas/ItemError"}]
    assert set(schemas["ItemError"]["properties"]) == {"error", "cause", "status"}
    assert list(schemas["Answer"]["properties"]) == keys
    for route in ("/predict", "/predict_batch"):
        responses = paths[route]["post"]["responses"]
        for status in ("400", "413", "415", "422"):
            assert responses[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
            assert "`" in responses[status]["description"]   # names the cause codes
    assert set(schemas["ErrorBody"]["properties"]) == {"error", "cause"}


def test_metrics_expose_requests_latency_and_inference_time(server, client, media):
    client.predict(video=media["av"])
    text = httpx.get(f"{server}/metrics", timeout=10).text
    backend = client.metadata()["backend"]
    assert re.search(r'bentoml_service_request_total\{[^}]*endpoint="/predict"[^}]*http_response_code="200"', text)
    assert re.search(r'bentoml_service_request_duration_seconds_bucket\{[^}]*endpoint="/predict"', text)
    m = re.search(rf'dimml_inference_seconds_count\{{backend="{re.escape(backend)}"\}} (\S+)', text)
    assert m and float(m.group(1)) >= 1


def test_bentoml_build_packs_the_registered_model(tmp_path, bundle):
    """The service declares its model (DIMML_MODEL, dimml-model:latest by default): `bentoml build`
    packs the bundle registered under that name, with no edit of bentofile.yaml."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home")}
    env.pop("DIMML_BUNDLE", None)
    env.pop("DIMML_MODEL", None)
    r = subprocess.run([sys.executable, "-m", "export", "register", str(bundle), "--name", "dimml-model"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    tag = r.stdout.strip().splitlines()[-1]
    r = subprocess.run([str(BIN / "bentoml"), "build", "--output", "tag"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    info = next((tmp_path / "home" / "bentos" / "dimml").glob("*/bento.yaml")).read_text()
    assert tag in info, info[-2000:]


def test_bentoml_build_from_repo_root(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home")}
    r = subprocess.run([str(BIN / "bentoml"), "build", "--output", "tag"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    src = next((tmp_path / "home" / "bentos" / "dimml").glob("*/src"))
    assert (src / "serving" / "service.py").is_file() and (src / "dimml" / "media.py").is_file()
    assert not (src / ".venv").exists() and not (src / "tests").exists()
    assert not (src / "training").exists()   # serving needs no training code


def test_never_ready_without_a_model(tmp_path, bentoml_home):
    """A bundle that cannot load: the entry service is alive, /readyz stays 503, the log says why."""
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "DIMML_BUNDLE": str(tmp_path / "no-bundle")}
    log_path = tmp_path / "serve.log"
    proc, url = start_server(env, log_path)
    try:
        deadline = time.monotonic() + 60
        while "no such bundle folder" not in log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.3)
        while True:
            try:
                if httpx.get(f"{url}/livez", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.3)
        for _ in range(3):
            assert httpx.get(f"{url}/readyz", timeout=10).status_code == 503
            time.sleep(0.5)
    finally:
        stop_server(proc)


# ---------------------------------------------------------------------------------------
# every setting: a served round trip with the bundle's fields, and each modality missing

@pytest.mark.parametrize("setting", SETTINGS, ids=setting_id)
def test_served_round_trip_per_setting(tiny_server, tiny_bundle, setting, tmp_path):
    from dimml.predict import Predictor

    url = tiny_server(setting)
    predictor = Predictor(tiny_bundle(setting))
    names, fields = list(predictor.names), list(predictor.fields)
    meta = httpx.post(f"{url}/metadata", json={}, timeout=30).json()
    assert meta["modalities"] == names and meta["fields"] == fields
    assert meta["upload_fields"] == list(dict.fromkeys(fields + names))

    files = write_sample(tmp_path, setting, seed=5)

    def post(sample: dict[str, str]) -> dict:
        r = _post(f"{url}/predict", [_file(Path(p), f) for f, p in sample.items()])
        assert r.status_code == 200, r.text
        return r.json()

    got = post(files)
    assert got["modalities_used"] == names and list(got["branches"]) == [*names, "fusion"]
    assert_well_formed(got)
    assert_same_answer(got, predictor.predict_files(files))

    # each modality alone, from the field named after it (its own file, or the video for it)
    for m in names:
        alone = {m: files.get(m, files.get("video"))}
        got = post(alone)
        assert got["modalities_used"] == [m] and list(got["branches"]) == [m]
        assert got["branches"][m]["weight"] == 1.0
        assert_same_answer(got, predictor.predict_files(alone))
    # one source missing: answered by the rest (no fusion)
    for f in fields:
        if f == "video" or len(fields) == 1:
            continue
        rest = {k: v for k, v in files.items() if k != f}
        got = post(rest)
        assert got["modalities_used"] == [n for n in names if n != f] and "fusion" not in got["branches"]
        assert_same_answer(got, predictor.predict_files(rest))
    if "audio" in names:   # a video without its audio track
        silent = write_sample(tmp_path / "silent", "visual", seed=6)
        got = post(silent)
        assert got["modalities_used"] == [n for n in names if n != "audio"]
        assert_same_answer(got, predictor.predict_files(silent))
    r = _post(f"{url}/predict", [("note", (None, b"no file"))])
    assert r.status_code == 400 and r.json()["cause"] == "bad_request"
