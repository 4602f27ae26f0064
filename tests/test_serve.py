"""The serving API: real digits in, the eval model's answers out; every bad request a clear 4xx.

Most tests call the app in this process through FastAPI's TestClient; the command itself
(a real `python -m mnist_flax.serve` process, conftest's `served_url`) is tested for its
start-up errors, its warning, and answering concurrent clients without an error.
"""

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mnist_flax
from conftest import PARAMETERS, REPO, load_script, require
from mnist_flax import checkpoint, predict, step
from mnist_flax.cli import run_main

require("fastapi", "pip install 'mnist-flax[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from mnist_flax import api, serve  # noqa: E402

api_errors = load_script("api_error_table")
load_test = load_script("load_test")


@pytest.fixture(scope="module")
def client(trained_checkpoint):
    variables, record = checkpoint.load_checkpoint(trained_checkpoint)
    with TestClient(api.create_app(variables, api.describe(trained_checkpoint, record, variables), checkpoint.network_for(record))) as c:
        yield c


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def post_png(client, data: bytes):
    return client.post("/api/predict", content=data, headers={"content-type": "image/png"})


@pytest.mark.parametrize("case", api_errors.CASES, ids=lambda c: c.what)
def test_a_bad_request_is_a_4xx_with_a_message(client, case):
    response = api_errors.send(client, case)
    assert response.status_code == case.status
    assert response.headers["content-type"] == "application/json"
    assert case.phrase in response.json()["error"]
    assert "Traceback" not in response.text


def test_a_streamed_body_is_cut_off_past_the_limit(client):
    """Without a Content-Length (chunked), the size is counted as the body arrives."""
    def chunks():
        for _ in range(api.MAX_BODY_BYTES // 2**16 + 2):
            yield b"\x00" * 2**16

    response = client.post("/api/predict", content=chunks(), headers={"content-type": "image/png"})
    assert response.status_code == 413 and "send a smaller image" in response.json()["error"]


def test_the_committed_table_lists_every_case():
    table = (REPO / "docs" / "api_errors.md").read_text()
    for case in api_errors.CASES:
        assert f"| {case.what} | {case.status} |" in table, case.what


def test_real_digits_get_the_eval_models_answers(client, trained_checkpoint, test_set):
    images, _ = test_set
    variables, _ = checkpoint.load_checkpoint(trained_checkpoint)
    expected = step.predict_probabilities(variables, images[:20])
    for image, want in zip(images[:20], expected):
        response = post_png(client, png(image[:, :, 0]))
        assert response.status_code == 200
        answer = response.json()
        assert answer["digit"] == int(want.argmax()) and answer["inverted"] is False
        np.testing.assert_allclose(answer["probabilities"], want, atol=1e-6)
        assert abs(sum(answer["probabilities"]) - 1) < 1e-5
        # A 28x28 image is MNIST-formatted already: the model saw exactly these pixels.
        seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["image"]))))
        assert np.array_equal(seen, image[:, :, 0])


def test_the_preprocessing_is_predicts(client, trained_checkpoint, tmp_path, capsys, test_set):
    """A large black-on-white drawing: the API and `mnist_flax.predict` see and answer the same."""
    big = np.asarray(Image.fromarray(255 - test_set[0][3, :, :, 0]).resize((150, 130)))
    path = tmp_path / "drawing.png"
    path.write_bytes(png(big))
    answer = post_png(client, path.read_bytes()).json()
    assert run_main(predict.main, [str(trained_checkpoint), str(path), "--json"]) == 0
    (cli_answer,) = json.loads(capsys.readouterr().out)
    assert (answer["digit"], answer["inverted"]) == (cli_answer["digit"], True) == (cli_answer["digit"],
                                                                                     cli_answer["inverted"])
    np.testing.assert_allclose(answer["probabilities"], cli_answer["probabilities"], atol=1e-6)
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["image"]))))
    assert np.array_equal(seen, predict.prepare(path).image)


def test_a_multipart_upload_answers_as_the_raw_body(client, test_set):
    data = png(test_set[0][5, :, :, 0])
    raw = post_png(client, data).json()
    upload = client.post("/api/predict", files={"file": ("seven.png", data, "image/png")})
    assert upload.status_code == 200 and upload.json() == raw


def test_a_jpeg_is_accepted(client, test_set):
    buf = io.BytesIO()
    Image.fromarray(test_set[0][0, :, :, 0]).resize((112, 112)).save(buf, format="JPEG", quality=95)
    response = client.post("/api/predict", content=buf.getvalue(), headers={"content-type": "image/jpeg"})
    assert response.status_code == 200 and response.json()["digit"] == int(test_set[1][0])


def test_model_health_and_unknown_paths(client, trained_checkpoint):
    info = client.get("/api/model").json()
    record = checkpoint.load_checkpoint(trained_checkpoint)[1]
    assert info["checkpoint"] == trained_checkpoint.name and info["sha256"] == record["sha256"]
    assert info["test_accuracy"] == record["test_accuracy"] and info["parameters"] == PARAMETERS
    assert client.get("/healthz").json() == {"status": "ok"}
    missing = client.get("/etc/passwd")
    assert missing.status_code == 404 and "/api/predict" in missing.json()["error"]
    wrong_method = client.get("/api/predict")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"  # RFC 9110 wants Allow


def test_the_page_is_served_with_a_policy_that_loads_nothing_from_elsewhere(client):
    response = client.get("/")
    assert response.status_code == 200 and "<canvas id=\"pad\"" in response.text
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "http" not in policy


def test_concurrent_clients_get_no_errors(served_url, test_set):
    """The real server under 4 clients for 2 s; the throughput is scripts/load_test.py's to report."""
    summary = load_test.run(served_url, load_test.digit_pngs(*test_set, 20), clients=4, seconds=2)
    assert summary["requests"] > 0 and summary["errors"] == 0, summary


def test_a_bad_checkpoint_fails_at_start_in_one_line(tmp_path):
    bad = tmp_path / "mnist_flax_bad.msgpack"
    bad.write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "mnist_flax.serve", str(bad), "--port", "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("mnist_flax: error: ") and str(bad) in proc.stderr


def test_a_busy_port_is_one_line(trained_checkpoint, capsys):
    taken = serve.listen("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        assert run_main(serve.main, [str(trained_checkpoint), "--port", str(port)]) == 1
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_binding_beyond_loopback_warns(trained_checkpoint, capsys, monkeypatch):
    import uvicorn
    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.extend(sockets))
    assert run_main(serve.main, [str(trained_checkpoint), "--host", "0.0.0.0", "--port", "0"]) == 0
    served[0].close()
    out, err = capsys.readouterr()
    assert "warning: listening on 0.0.0.0" in err and "no authentication" in err and "serving" in out
    assert run_main(serve.main, [str(trained_checkpoint), "--port", "0"]) == 0
    served[1].close()
    assert "warning" not in capsys.readouterr().err


def test_without_the_extra_the_error_says_how_to_install_it(trained_checkpoint, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "mnist_flax.api")
    monkeypatch.delattr(mnist_flax, "api")
    assert run_main(serve.main, [str(trained_checkpoint)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(fastapi is not installed)" in err and "pip install 'mnist-flax[serve]'" in err
