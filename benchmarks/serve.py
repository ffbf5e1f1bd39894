"""``transferkit serve`` under concurrent clients against ``predict`` on the same images, in one run.

A classifier with random backbone weights (``benchmarks/predict.py``'s ``make_run``: no
network here for ImageNet's; the speed does not depend on what it learned) is saved as a
run; a folder of generated JPEGs is written. ``predict_folder`` classifies the folder (best
of 3, its default engine and batch size): the baseline, in images/s. Then the run is served
as a user serves it (``transferkit serve RUN --port 0 -q``, its own process, default engine
and --max-batch 32) and C clients (threads, one keep-alive connection each) post the same
images, one image per request, as fast as they get answers: images/s for each C, the
median and 95th-percentile latency, the mean engine batch (from /health), and every label
checked against predict's. Prints one JSON line.

    python benchmarks/serve.py                               # VGG16, 224 px, 256 images, 1/4/16/32 clients
    python benchmarks/serve.py --backbone resnet50 --clients 1,32
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from transferkit.runtime import machine_facts  # noqa: E402


def start_server(run_dir: Path, log: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    """``transferkit serve RUN --port 0 -q`` and its URL, once it answers."""
    handle = open(log, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "transferkit", "serve", str(run_dir), "--port", "0", "-q", "--max-batch",
         str(max_batch)], stdout=handle, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(HERE.parent), "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server ended: {log.read_text()[-2000:]}")
        for line in log.read_text().splitlines():
            if line.startswith("serving ") and " at http://" in line:
                return process, line.rsplit(" at ", 1)[1].strip()
        time.sleep(0.1)
    raise RuntimeError("the server did not start in 600 s")


def body_of(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def health(url: str) -> dict:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("GET", "/health")
    answer = json.loads(connection.getresponse().read())
    connection.close()
    return answer


def load(url: str, files: list[Path], clients: int) -> dict:
    """Every file posted once, by ``clients`` threads at once; images/s, latencies, labels."""
    host, port = url.removeprefix("http://").split(":")
    bodies = [(path.name, *body_of(path.name, path.read_bytes())) for path in files]
    work: queue.SimpleQueue = queue.SimpleQueue()
    for item in bodies:
        work.put(item)
    labels: dict[str, str] = {}
    latencies: list[float] = []
    errors: list[str] = []

    def client() -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        while True:
            try:
                name, body, kind = work.get_nowait()
            except queue.Empty:
                break
            started = time.perf_counter()
            connection.request("POST", "/predict", body=body, headers={"Content-Type": kind})
            response = connection.getresponse()
            data = response.read()
            latencies.append(time.perf_counter() - started)
            if response.status != 200:
                errors.append(f"{name}: {response.status} {data[:200]!r}")
                continue
            labels[name] = json.loads(data)["predictions"][0]["label"]
        connection.close()

    before = health(url)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    after = health(url)
    batches = after["batches"] - before["batches"]
    return {
        "images_per_s": round(len(files) / seconds, 1),
        "latency_ms_median": round(1000 * float(np.median(latencies)), 1),
        "latency_ms_p95": round(1000 * float(np.percentile(latencies, 95)), 1),
        "mean_engine_batch": round((after["images_answered"] - before["images_answered"]) / max(batches, 1), 2),
        "errors": len(errors),
        "labels": labels,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--clients", default="1,4,16,32")
    parser.add_argument("--max-batch", type=int, default=32)
    args = parser.parse_args(argv)

    from predict import make_run, write_images

    from transferkit.data.images import decode_images
    from transferkit.inference.predict import predict_folder
    from transferkit.runs import load_run

    with tempfile.TemporaryDirectory(prefix="tk-serve-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["TRANSFERKIT_CACHE"] = str(tmp / "cache")
        folder = write_images(tmp / "images", args.images, args.size, seed=3)
        files = sorted(folder.iterdir())
        run_dir = tmp / "run"
        make_run(run_dir, args.backbone, args.size, decode_images(files[:32], args.size)[0])
        run = load_run(run_dir)
        predict_folder(run, folder)  # warm-up: the engine converted and cached, as the server finds it
        rates, rows = [], None
        for _ in range(3):
            started = time.perf_counter()
            rows = predict_folder(run, folder).rows
            rates.append(len(rows) / (time.perf_counter() - started))
        predicted = {row.file.name: row.label for row in rows}
        predict_rate = max(rates)
        del run

        process, url = start_server(run_dir, tmp / "server.log", args.max_batch)
        try:
            load(url, files[:32], 4)  # warm-up
            served = {}
            for clients in (int(count) for count in args.clients.split(",")):
                # best of 2 rounds, as predict's best of 3
                best = max((load(url, files, clients) for _ in range(2)), key=lambda figures: figures["images_per_s"])
                agree = sum(best["labels"].get(name) == label for name, label in predicted.items())
                best.pop("labels")
                served[str(clients)] = {**best, "ratio_to_predict": round(best["images_per_s"] / predict_rate, 3),
                                        "labels_equal_to_predict": f"{agree}/{len(predicted)}"}
        finally:
            process.terminate()
            code = process.wait(timeout=120)
        print(json.dumps({
            "benchmark": "serve",
            "machine": machine_facts(),
            "backbone": args.backbone,
            "size": args.size,
            "images": args.images,
            "max_batch": args.max_batch,
            "predict_images_per_s": round(predict_rate, 1),
            "serve_by_concurrent_clients": served,
            "server_exit_code_after_sigterm": code,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
