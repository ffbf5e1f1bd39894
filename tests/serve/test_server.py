"""``transferkit serve`` as a user runs it: one real server process (uvicorn on a free
loopback port) for the whole module, on the shared tiny run, spoken to over real HTTP, its
page driven in a real headless Chromium, stopped by a real SIGTERM in the last test.

The answers are compared with ``predict_folder`` on the same files in this process.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import forked
from tests.conftest import SUBPROCESS_PATH
from transferkit.inference.predict import predict_folder

LIMIT_MB = 1  # the server's --max-upload-mb here, so that "too large" is cheap to send
GRACE_S = 5  # its --grace: what the last test's stalled upload waits for
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


# --- the files ---------------------------------------------------------------------------


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (a decompression bomb's header) and holds none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def images(shapes_dir, tmp_path_factory) -> Path:
    """Shapes from the training folder and the modes predict converts: grayscale, 16-bit,
    transparency, palette, CMYK, an EXIF-rotated JPEG."""
    folder = tmp_path_factory.mktemp("serve") / "to classify"
    folder.mkdir()
    for class_dir in sorted(p for p in shapes_dir.iterdir() if p.is_dir()):
        for path in sorted(class_dir.iterdir())[:2]:
            shutil.copy(path, folder / f"{class_dir.name}-{path.name}")
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (40, 56, 3), dtype="uint8")
    Image.fromarray(noise[..., 0]).save(folder / "gray.png")
    Image.fromarray(noise[..., 0].astype("uint16") * 257).save(folder / "sixteen.png")
    rgba = np.dstack([noise, np.where(noise[..., 1] > 128, 255, 0).astype("uint8")])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(noise).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.gif")
    (folder / "cmyk.jpg").write_bytes(jpeg_bytes(Image.fromarray(noise).convert("CMYK")))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: predict turns it upright
    (folder / "exif.jpg").write_bytes(jpeg_bytes(Image.fromarray(noise), exif=exif.tobytes()))
    return folder


# --- the server --------------------------------------------------------------------------


class Server:
    """The server process, its URL and its log."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process, self.url, self.log = process, url, log
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 120):
        """(status, content type, body bytes) of one request on a new connection."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {},
                               encode_chunked=headers is not None and "Transfer-Encoding" in headers)
            response = connection.getresponse()
            return response.status, response.getheader("content-type"), response.read()
        finally:
            connection.close()

    def post(self, path: str, files: list[tuple[str, bytes]], field: str = "file"):
        body, content_type = multipart(files, field)
        status, kind, data = self.request("POST", path, body, {"Content-Type": content_type})
        return status, kind, data

    def json(self, method: str, path: str, **options):
        status, kind, data = self.request(method, path, **options)
        assert kind == "application/json", (status, kind, data[:300])
        return status, json.loads(data)

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_in_flight(self, count: int) -> None:
        """Until ``count`` requests are in flight (/health says so): a fixed wait would be too
        short where the server process got no core meanwhile."""
        deadline = time.monotonic() + 60
        while self.json("GET", "/health")[1]["requests_in_flight"] < count:
            assert time.monotonic() < deadline, f"{count} request(s) were never in flight"
            time.sleep(0.05)


def multipart(files: list[tuple[str, bytes]], field: str = "file") -> tuple[bytes, str]:
    """A multipart/form-data body with each file as a field named ``field``."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
        for name, data in files
    ) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def start_server(run: Path, log: Path, *flags: str, popen=forked.Popen) -> subprocess.Popen:
    """``transferkit serve RUN --port 0 FLAGS`` in its own process, writing ``log``: forked from
    the suite's fork server, or (``popen=subprocess.Popen``) a fresh Python, which at its end
    waits for the threads still running as the command does."""
    with open(log, "w") as handle:
        return popen(
            [sys.executable, "-m", "transferkit", "serve", str(run), "--port", "0", *flags],
            stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": SUBPROCESS_PATH,
                                                         "PYTHONUNBUFFERED": "1"})


def serving(process: subprocess.Popen, log: Path) -> Server:
    """The server once it announces its URL."""
    deadline = time.monotonic() + 300
    url = None
    while url is None:
        if process.poll() is not None:
            pytest.fail(f"the server ended before serving:\n{log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"the server did not start in 300 s:\n{log.read_text()[-3000:]}"
        for line in log.read_text().splitlines():
            if line.startswith("serving ") and " at http://" in line:
                url = line.rsplit(" at ", 1)[1].strip()
        time.sleep(0.05)
    return Server(process, url, log)


@pytest.fixture(scope="module")
def server(shapes_run, tmp_path_factory, request):
    """``transferkit serve RUN --port 0`` in its own process, for every test of the module;
    predict's answers are computed here while it starts."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    process = start_server(shapes_run.path, log, "--max-batch", "8", "--max-upload-mb", str(LIMIT_MB),
                           "--grace", str(GRACE_S))
    request.getfixturevalue("expected")
    yield serving(process, log)
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def expected(shapes_run, images):
    """predict's rows for the same files, by file name (computed while the server starts)."""
    return {row.file.name: row for row in predict_folder(shapes_run, images, top_k=3).rows}


# --- the API -----------------------------------------------------------------------------


def test_health_metadata_and_docs(server, shapes_run):
    status, health = server.json("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["engine"] in ("keras", "openvino")
    assert health["requests_in_flight"] == 0  # itself not counted
    status, meta = server.json("GET", "/metadata")
    assert status == 200
    assert meta["classes"] == list(shapes_run.class_names)
    assert (meta["image_size"], meta["backbone"]) == (shapes_run.image_size, shapes_run.backbone)
    assert meta["calibration"]["temperature"] == shapes_run.metrics["calibration"]["temperature"]
    assert meta["rejection_threshold"] == pytest.approx(shapes_run.rejection["threshold"])
    assert meta["max_upload_mb"] == LIMIT_MB
    import transferkit

    assert meta["transferkit_version"] == transferkit.__version__
    status, kind, page = server.request("GET", "/docs")
    assert status == 200 and kind.startswith("text/html") and b"swagger" in page.lower()
    status, schema = server.json("GET", "/openapi.json")
    assert {"/predict", "/explain", "/health", "/metadata"} <= set(schema["paths"])


def test_answers_are_predicts_rows_for_the_same_files(server, images, expected):
    files = sorted(images.iterdir())
    status, kind, data = server.post("/predict?top_k=3", [(path.name, path.read_bytes()) for path in files])
    assert status == 200, data
    answered = json.loads(data)["predictions"]
    assert [row["file"] for row in answered] == [path.name for path in files]
    for row in answered:
        want = expected[row["file"]]
        assert row["label"] == want.label
        assert row["confidence"] == pytest.approx(want.confidence, abs=1e-5)
        assert [item["label"] for item in row["top_k"]] == [name for name, _ in want.top_k]
        assert [item["probability"] for item in row["top_k"]] == pytest.approx([p for _, p in want.top_k], abs=1e-5)


def test_rejection_and_prediction_sets_are_predicts_too(server, images, shapes_run):
    files = sorted(images.iterdir())
    want = {row.file.name: row for row in predict_folder(shapes_run, images, top_k=2, reject=True, sets=0.9).rows}
    status, _, data = server.post("/predict?top_k=2&reject=true&sets=0.9",
                                  [(path.name, path.read_bytes()) for path in files])
    assert status == 200, data
    for row in json.loads(data)["predictions"]:
        expected_row = want[row["file"]]
        assert (row["label"], row["unknown"], row["top_class"]) == (
            expected_row.label, expected_row.unknown, expected_row.top_class)
        assert row["score"] == pytest.approx(expected_row.score, abs=1e-4)
        assert row["set"] == list(expected_row.prediction_set) and row["set_size"] == len(expected_row.prediction_set)
    status, _, data = server.post("/predict", [(files[0].name, files[0].read_bytes())])
    assert status == 200 and "unknown" not in json.loads(data)["predictions"][0]  # only when asked


def test_eight_clients_at_once_are_all_answered_as_predict_answers(server, images, expected):
    files = sorted(images.iterdir())
    _, before = server.json("GET", "/health")
    barrier = threading.Barrier(8)
    answers: dict[int, tuple] = {}

    def client(number: int) -> None:
        chosen = [files[(number * 2 + i) % len(files)] for i in range(2)]
        barrier.wait()
        for round_ in range(2):
            path = chosen[round_]
            status, _, data = server.post("/predict", [(path.name, path.read_bytes())])
            answers[number * 2 + round_] = (path.name, status, json.loads(data))

    threads = [threading.Thread(target=client, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(answers) == 16
    for name, status, body in answers.values():
        assert status == 200, body
        (row,) = body["predictions"]
        assert (row["file"], row["label"]) == (name, expected[name].label)
        assert row["confidence"] == pytest.approx(expected[name].confidence, abs=1e-5)
    _, after = server.json("GET", "/health")
    assert after["images_answered"] - before["images_answered"] == 16
    assert 1 <= after["largest_batch"] <= 8  # --max-batch 8


def chunks(data: bytes, size: int = 65536):
    for start in range(0, len(data), size):
        yield data[start : start + size]


BAD_UPLOADS = {
    # case: (files as (name, bytes), query, status, words the error names)
    "empty": ([("empty.jpg", b"")], "", 400, "empty.jpg is empty"),
    "text": ([("notes.txt", b"these are notes, not pixels\n" * 20)], "", 400, "notes.txt: not a readable image"),
    "truncated jpeg": ([("cut.jpg", None)], "", 400, "cut.jpg: not a readable image (image file is truncated"),
    "truncated png": ([("cut.png", None)], "", 400, "cut.png: not a readable image"),
    "decompression bomb": ([("bomb.png", png_header_only(20000, 20000))], "", 400, "decompression-bomb"),
    "too large": ([("big.jpg", os.urandom(int(1.5 * LIMIT_MB * 1048576)))], "", 413, "over the server's limit"),
    "one bad among good": ([("ok.jpg", None), ("notes.txt", b"text")], "", 400, "notes.txt: not a readable image"),
    "no file field": ([("a.jpg", b"x")], "", 400, "no image in the request"),
    "over 1,000 files": ([(f"{index}.jpg", b"x") for index in range(1001)], "", 400,
                         "Maximum number of files is 1000; send the images in several requests"),
    "top_k below 1": ([("ok.jpg", None)], "?top_k=0", 400, "top_k"),
    "top_k not a number": ([("ok.jpg", None)], "?top_k=many", 400, "top_k"),
    "sets out of range": ([("ok.jpg", None)], "?sets=1.5", 400, "sets"),
    # predict's --tta is not served: asking is told, not answered without it
    "an unknown option": ([("ok.jpg", None)], "?tta=true", 400, "unknown query parameter(s) tta on /predict"),
    # FastAPI would answer with the last of the two
    "an option twice": ([("ok.jpg", None)], "?top_k=1&reject=true&top_k=3", 400,
                        "query parameter(s) top_k given more than once on /predict; give each once"),
    "an option twice, the last invalid": ([("ok.jpg", None)], "?top_k=3&top_k=0", 400,
                                          "query parameter(s) top_k given more than once on /predict"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_a_bad_upload_gets_a_json_error_and_the_server_keeps_answering(server, images, case):
    files, query, status, words = BAD_UPLOADS[case]
    whole = jpeg_bytes(Image.open(sorted(images.glob("*.jpg"))[0]).convert("RGB").resize((300, 300)))
    cut_png = BytesIO()
    Image.open(images / "gray.png").resize((300, 300)).save(cut_png, format="PNG")
    stand_ins = {"cut.jpg": whole[: len(whole) // 2], "cut.png": cut_png.getvalue()[:400], "ok.jpg": whole}
    files = [(name, stand_ins[name] if data is None else data) for name, data in files]
    body, content_type = multipart(files, field="picture" if case == "no file field" else "file")
    got, kind, data = server.request("POST", f"/predict{query}", body, {"Content-Type": content_type})
    assert (got, kind) == (status, "application/json"), data[:500]
    assert words in json.loads(data)["error"]
    assert server.json("GET", "/health")[1]["status"] == "ok"
    good = sorted(images.glob("*.jpg"))[0]
    assert server.post("/predict", [(good.name, good.read_bytes())])[0] == 200


def test_a_large_body_without_a_length_is_stopped_at_the_limit(server):
    body, content_type = multipart([("big.jpg", os.urandom(int(1.5 * LIMIT_MB * 1048576)))])
    status, kind, data = server.request("POST", "/predict", chunks(body),
                                        {"Content-Type": content_type, "Transfer-Encoding": "chunked"})
    assert (status, kind) == (413, "application/json") and "limit" in json.loads(data)["error"]
    assert server.json("GET", "/health")[1]["status"] == "ok"


def test_a_client_waiting_for_100_continue_is_refused_before_it_sends_a_huge_body(server):
    """As curl sends a large upload: headers with ``Expect: 100-continue``, then the body once
    the server says so. A declared 10 GB is answered 413 at once, with no 100 Continue and
    no byte of the body read (before, the server asked for it and read up to 1 GiB first)."""
    with socket.create_connection((server.host, server.port), timeout=30) as client:
        client.sendall(f"POST /predict HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: multipart/form-data; "
                       "boundary=x\r\nContent-Length: 10000000000\r\nExpect: 100-continue\r\n\r\n".encode())
        answer = b""
        while chunk := client.recv(65536):  # to the end: the server closes the connection after it
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large", answer[:500]
    assert b"connection: close" in rest.lower().split(b"\r\n\r\n")[0]  # what follows is not a next request
    assert "9536.7 MB, over the server's limit" in json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
    assert server.json("GET", "/health")[1]["status"] == "ok"


def test_other_routes_and_methods_answer_json_errors(server):
    assert server.json("GET", "/nowhere") == (404, {"error": "no such endpoint: /nowhere; see /docs for the API"})
    status, body = server.json("DELETE", "/predict")
    assert status == 405 and "DELETE" in body["error"]


def test_explain_draws_the_heatmap_over_the_image(server, images, shapes_run):
    path = images / "exif.jpg"
    status, kind, data = server.post("/explain", [(path.name, path.read_bytes())])
    assert (status, kind) == (200, "image/png")
    picture = Image.open(BytesIO(data))
    assert picture.size == (40, 56)  # the upright image's own size (56 x 40 stored, turned by its EXIF tag)
    other = shapes_run.class_names[-1]
    status, kind, data = server.post(f"/explain?class={other}", [(path.name, path.read_bytes())])
    assert status == 200 and Image.open(BytesIO(data)).size == (40, 56)
    status, kind, data = server.post("/explain?class=unicorn", [(path.name, path.read_bytes())])
    assert status == 400 and "unicorn" in json.loads(data)["error"]
    status, kind, data = server.post("/explain", [(path.name, path.read_bytes())] * 2)
    assert status == 400 and "takes one image per request, got 2" in json.loads(data)["error"]
    status, kind, data = server.post("/explain?top=3", [(path.name, path.read_bytes())])
    assert status == 400 and "unknown query parameter(s) top on /explain; it takes class" in json.loads(data)["error"]


# --- the page, in a real browser ---------------------------------------------------------


def test_the_page_is_self_contained(server):
    status, kind, page = server.request("GET", "/")
    assert status == 200 and kind.startswith("text/html")
    text = page.decode("utf-8")
    assert 'type="file"' in text
    # nothing fetched from elsewhere: no script or style file, no font, no absolute URL
    assert "<script src" not in text and "<link" not in text and "@import" not in text and "url(" not in text
    assert "http://" not in text and "https://" not in text


def shown(driver, name: str) -> bool:
    """Whether the page shows the Grad-CAM picture of the file ``name``."""
    picture = driver.find_element("id", "picture")
    return picture.get_attribute("data-file") == name and picture.get_attribute("data-kind") == "gradcam"


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                           ".ci/run installs them)")
def test_the_page_in_headless_chromium_shows_predicts_label_and_the_heatmap(server, images, expected, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                     "--window-size=1000,800", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "classes" in d.find_element(By.ID, "model").text)
        name = "exif.jpg"  # turned upright by its EXIF tag, as predict turns it
        driver.find_element(By.ID, "file").send_keys(str(images / name))
        wait.until(lambda d: shown(d, name) or not d.find_element(By.ID, "error").get_property("hidden"))
        assert driver.find_element(By.ID, "error").get_property("hidden"), driver.find_element(By.ID, "error").text
        assert driver.execute_script("return document.getElementById('picture').naturalWidth") > 0
        assert driver.find_element(By.ID, "label").text == expected[name].label
        assert driver.find_element(By.ID, "confidence").text == f"{100 * expected[name].confidence:.1f}%"
        bars = driver.find_elements(By.CSS_SELECTOR, "#bars li")
        names = [bar.find_element(By.CLASS_NAME, "name").text for bar in bars]
        assert names == [label for label, _ in expected[name].top_k]
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()


# --- the CLI's own refusals, and the stop (last: it ends the module's server) -------------


def test_a_port_in_use_and_bad_flags_are_one_line_each(shapes_run):
    from typer.testing import CliRunner

    from transferkit.cli import app

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(shapes_run.path), "--port", str(port)])
        assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output
        assert "Traceback" not in result.output
    finally:
        taken.close()
    for flags, words in ((["--port", "70000"], "--port"), (["--max-batch", "0"], "--max-batch"),
                         (["--engine", "tpu"], "--engine"), (["--max-upload-mb", "0"], "--max-upload-mb"),
                         (["--max-upload-mb", "nan"], "--max-upload-mb"),
                         (["--max-upload-mb", "inf"], "--max-upload-mb"), (["--grace", "-1"], "--grace"),
                         (["--worker-timeout", "0"], "--worker-timeout"),
                         (["--worker-timeout", "0.01"], "--worker-timeout must be 1 second or more")):
        result = CliRunner().invoke(app, ["serve", str(shapes_run.path), *flags])
        assert result.exit_code == 2 and words in result.output
    missing = shapes_run.path.parent / "no-run"  # the line alone, no "loading ..." before it
    result = CliRunner().invoke(app, ["serve", str(missing)])
    assert result.exit_code == 1 and result.output.splitlines() == [
        f"error: {missing} does not exist; pass a run folder made by 'transferkit finetune'"]


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(server, images, expected):
    """A request in flight is finished; one whose body never comes is answered 503 once the
    grace has passed (it was a traceback in the log and a plain-text 500)."""
    path = sorted(images.glob("*.jpg"))[0]
    body, content_type = multipart([(path.name, path.read_bytes())])
    head = (f"POST /predict HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    stalled = socket.create_connection((server.host, server.port), timeout=120)
    with stalled, socket.create_connection((server.host, server.port), timeout=120) as client:
        stalled.sendall(head)  # and nothing more
        client.sendall(head + body[: len(body) // 2])
        server.wait_in_flight(2)  # both requests (the server has begun answering each) before the signal
        stopped = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:  # once stopping, it takes no new connection
            try:
                socket.create_connection((server.host, server.port), timeout=5).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline, "the server still takes connections 30 s after SIGTERM"
            time.sleep(0.1)
        client.sendall(body[len(body) // 2 :])
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        late = b""
        while chunk := stalled.recv(65536):
            late += chunk
    assert time.monotonic() - stopped >= GRACE_S
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK", answer[:500]
    (row,) = json.loads(rest.split(b"\r\n\r\n", 1)[1])["predictions"]
    assert row["label"] == expected[path.name].label
    status_line, _, rest = late.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 503 Service Unavailable", late[:500]
    assert "send it again" in json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
    assert server.process.wait(timeout=120) == 0
    log = server.text()
    assert "stopped by SIGTERM" in log and "POST /predict: not finished when the server stopped" in log
    assert "Traceback" not in log, log[-3000:]


def test_a_request_still_decoding_after_the_grace_does_not_keep_the_server_alive(shapes_run, tmp_path):
    """Its 503 is sent at the end of the grace; its decoding, in a worker thread, stops at the
    next image (before: the process lived on until all 230 large images were read, 86 s)."""
    log = tmp_path / "server.log"
    # A fresh process: the fork server's children end without waiting for their threads
    server = serving(start_server(shapes_run.path, log, "--grace", "1", "--max-upload-mb", "20",
                                  popen=subprocess.Popen), log)
    try:
        flat = BytesIO()
        Image.new("RGB", (5000, 5000), (120, 30, 200)).save(flat, format="PNG")  # 84 KB, 25 MP to read
        body, content_type = multipart([(f"{index}.png", flat.getvalue()) for index in range(230)])
        answers = []
        sender = threading.Thread(target=lambda: answers.append(
            server.request("POST", "/predict", body, {"Content-Type": content_type})))
        sender.start()
        server.wait_in_flight(1)
        time.sleep(1)  # its decoding has begun
        stopped = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=120) == 0
        assert time.monotonic() - stopped < 30, server.text()[-2000:]
        sender.join(timeout=30)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    [(status, _, data)] = answers
    assert status == 503 and "send it again" in json.loads(data)["error"]
    assert "stopped by SIGTERM" in server.text() and "Traceback" not in server.text()


def worker_processes(pid: int) -> set[int]:
    """The worker processes uvicorn's supervisor ``pid`` runs (multiprocessing's spawned
    children, found in Linux's /proc)."""
    if not any(Path(f"/proc/{pid}/task").glob("*/children")):
        pytest.skip("this kernel's /proc lists no children (CONFIG_PROC_CHILDREN), which the test finds workers by")
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.add(int(child))
    return found


def environment(pid: int) -> dict[str, str]:
    """A process's environment variables (Linux's /proc)."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode(errors="replace").split("=", 1) for entry in entries if b"=" in entry)


@contextmanager
def two_workers(server: Server) -> Iterator[set[int]]:
    """The worker processes of a ``--workers 2`` server once both are running: a set the test
    adds the workers it sees later to. At the end the server, if still running, and every
    worker in the set are killed (a supervisor killed leaves its workers running)."""
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(found := worker_processes(server.process.pid)) < 2:
            assert time.monotonic() < deadline, f"no two workers started:\n{server.text()[-3000:]}"
            time.sleep(0.1)
        workers |= found
        yield workers
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
        for pid in workers:
            with suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_worker_processes_started_after_the_run_was_replaced_answer_with_the_model_served(
        shapes_run, binary_run, images, expected, tmp_path):
    """``--workers 2``: the run is replaced by another (here a two-class run) as soon as the
    server says it serves, before its worker processes (spawned then, each importing
    TensorFlow for seconds) load anything, as when uvicorn starts a crashed worker again
    hours later. Each worker, alone taking connections while the other is stopped (SIGSTOP),
    answers with the model the server started with (before, the workers loaded the run
    anew: answers from another model, and a removed run stopped the server). The snapshot
    they load is gone once the server has stopped."""
    run = tmp_path / "runs" / "served"
    shutil.copytree(shapes_run.path, run)
    log = tmp_path / "server.log"
    server = serving(start_server(run, log, "--workers", "2", "--max-batch", "8"), log)
    shutil.rmtree(run)  # finetune --force put another run there
    shutil.copytree(binary_run.path, run)
    files = [(path.name, path.read_bytes()) for path in sorted(images.iterdir())]
    with two_workers(server) as workers:
        seen: set[int] = set()
        deadline = time.monotonic() + 240
        while seen != workers:
            assert time.monotonic() < deadline, f"workers {workers - seen} never answered:\n{server.text()[-3000:]}"
            seen.add(server.json("GET", "/health")[1]["process"])
        [snapshot] = {environment(pid)["TRANSFERKIT_SERVE_SNAPSHOT"] for pid in workers}
        snapshot = Path(snapshot)
        assert snapshot.is_dir() and not snapshot.is_relative_to(run)
        for answering in workers:
            [other] = workers - {answering}
            os.kill(other, signal.SIGSTOP)  # takes no connection: each goes to the one answering
            try:
                assert server.json("GET", "/health")[1]["process"] == answering
                status, kind, data = server.post("/predict?top_k=3", files)
                assert status == 200, data
                assert {row["file"]: row["label"] for row in json.loads(data)["predictions"]} == {
                    name: row.label for name, row in expected.items()}
                assert server.json("GET", "/metadata")[1]["classes"] == list(shapes_run.class_names)
            finally:
                os.kill(other, signal.SIGCONT)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=120) == 0
    assert not snapshot.exists()
    assert "Traceback" not in server.text(), server.text()[-3000:]


def test_a_worker_that_stops_answering_is_replaced_and_does_not_hold_a_stop(shapes_run, tmp_path):
    """``--workers 2 --worker-timeout 2 --grace 1``: SIGHUP replaces both workers, though each
    takes longer than the timeout to load the run (uvicorn gives a new worker the timeout
    to be ready), and one of them hangs (uvicorn waited for it to end for ever, SIGTERM
    included). A worker that answers no ping (here stopped with SIGSTOP, as a hung one)
    is killed and another started in its place; SIGTERM, sent while a worker hangs, stops
    the server in seconds, the hung worker killed once the grace and the timeout have
    passed. Before, uvicorn's supervisor waited 300 s on a hung worker before it handled
    SIGTERM or Ctrl-C, then for ever for the worker to end."""
    log = tmp_path / "server.log"
    server = serving(start_server(shapes_run.path, log, "--workers", "2", "--worker-timeout", "2", "--grace", "1"), log)
    supervisor = server.process.pid
    with two_workers(server) as workers:
        first = set(workers)
        os.kill(supervisor, signal.SIGHUP)  # handled within 0.5 s, and no ping while it restarts
        os.kill(hung_at_restart := min(first), signal.SIGSTOP)
        deadline = time.monotonic() + 120
        while (now := worker_processes(supervisor)) & first or len(now) < 2:
            assert time.monotonic() < deadline, f"SIGHUP replaced {first - now} only:\n{server.text()[-3000:]}"
            time.sleep(0.1)
        assert "did not load the run" not in server.text()
        assert f"worker process {hung_at_restart} killed: still running 3 s after the stop" in server.text()
        workers |= now
        hung = min(now)
        os.kill(hung, signal.SIGSTOP)
        stopped = time.monotonic()
        while hung in (now := worker_processes(supervisor)) or len(now) < 2:
            assert time.monotonic() < stopped + 60, f"worker {hung} never replaced:\n{server.text()[-3000:]}"
            time.sleep(0.1)
        replaced_after = time.monotonic() - stopped
        workers |= now
        still_hung = min(now)
        stopping = time.monotonic()
        server.process.send_signal(signal.SIGTERM)  # handled within 0.5 s: the worker is stopped first
        os.kill(still_hung, signal.SIGSTOP)
        assert server.process.wait(timeout=60) == 0, server.text()[-3000:]
        stopped_after = time.monotonic() - stopping
    assert replaced_after < 20 and stopped_after < 20, (replaced_after, stopped_after)
    assert not Path(f"/proc/{hung}").exists() and not Path(f"/proc/{still_hung}").exists()
    assert f"worker process {still_hung} killed: still running 3 s after the stop" in server.text()
    assert "Traceback" not in server.text(), server.text()[-3000:]


def test_a_second_ctrl_c_stops_at_once_in_one_line(shapes_run, tmp_path):
    """Ctrl-C, then Ctrl-C again while a request is in flight: the server exits 0 at once,
    without waiting for the grace, with one line saying so (it was Starlette's
    ``CancelledError`` traceback, then "lifespan protocol appears unsupported")."""
    log = tmp_path / "server.log"
    server = serving(start_server(shapes_run.path, log, "--grace", "60"), log)
    try:
        with socket.create_connection((server.host, server.port), timeout=60) as stalled:
            stalled.sendall(f"POST /predict HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: multipart/form-data; "
                            "boundary=x\r\nContent-Length: 1000\r\n\r\n--x".encode())  # and nothing more
            server.wait_in_flight(1)
            stopped = time.monotonic()
            deadline = stopped + 60
            server.process.send_signal(signal.SIGINT)
            while "Waiting for connections to close" not in server.text():
                assert time.monotonic() < deadline, server.text()[-2000:]
                time.sleep(0.05)
            server.process.send_signal(signal.SIGINT)
            assert server.process.wait(timeout=30) == 0
            assert time.monotonic() - stopped < 30
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    log_text = server.text()
    assert "stopped at once (a second Ctrl-C)" in log_text and "stopped by SIGINT" in log_text
    assert "Traceback" not in log_text and "unsupported" not in log_text, log_text[-3000:]
