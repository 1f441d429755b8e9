"""Requests per second through the running app, one API call at a time against several, side by side in one run.

    python -m benchmarks.app_throughput                      # a random-weight 224 px model (speed needs no training)
    python -m benchmarks.app_throughput --model catdog-model --json benchmarks/results/app_throughput.json

Starts `python app.py` twice on loopback: one /predict at a time (CATDOG_CONCURRENCY=1) and as it ships
(up to 4 calls decode side by side, their forward passes taking turns under the predictor's lock). Each
gets the same photos through gradio_client, from 1 client and then from 8, one Client per thread. It
reports requests/s and the p50 latency, and the two ratios that matter: throughput at 8 clients, shipped
over one at a time, and the lone client's latency, shipped over one at a time.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gradio_client import Client, handle_file

from benchmarks.harness import running_app
from benchmarks.harness import complete_folder
from catdog_model import CatDogClassifier
from catdog_model.training.data import load_image_dataset
from benchmarks.harness import describe

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"one at a time": {"CATDOG_CONCURRENCY": "1"}, "as shipped": {}}


def random_model(folder: Path, image_size: int) -> str:
    """A model with random weights, saved as training saves it."""
    folder.mkdir(parents=True)
    return str(complete_folder(CatDogClassifier(image_size=image_size).eval(), folder))


def photos(folder: Path, dataset: str, count: int) -> list[Path]:
    """``count`` real photos as JPEG files: from --dataset if it loads, else the project's examples."""
    try:
        data = load_image_dataset(dataset)
    except Exception:  # any failure to load: the examples still make a fair, if small, mix
        return sorted((ROOT / "examples").glob("*.jpg"))
    paths = []
    for index in range(0, len(data.dataset), max(1, len(data.dataset) // count))[:count]:
        buffer = io.BytesIO()
        data.dataset[index][data.image_column].convert("RGB").save(buffer, format="JPEG", quality=90)
        paths.append(folder / f"photo{index}.jpg")
        paths[-1].write_bytes(buffer.getvalue())
    return paths


def send(url: str, requests: list[Path], clients: int) -> dict:
    """``requests`` from ``clients`` threads; requests/s over the whole round and the p50 latency."""
    local, latencies = threading.local(), []

    def one(path: Path) -> None:
        if not hasattr(local, "client"):
            # Plain HTTP on loopback, so no certificate is ever checked; but httpx builds a verifying SSL
            # context (22 ms of CPU) for each of the several requests a predict makes, and on a 2-core
            # machine that client CPU would be taken from the server being measured.
            local.client = Client(url, verbose=False, ssl_verify=False)
        start = time.perf_counter()
        local.client.predict(handle_file(str(path)), api_name="/predict")
        latencies.append(time.perf_counter() - start)

    with ThreadPoolExecutor(clients) as pool:  # each thread's Client connects before the clock starts
        list(pool.map(one, requests[:clients]))
        latencies.clear()
        start = time.perf_counter()
        list(pool.map(one, requests))
        elapsed = time.perf_counter() - start
    return {"requests_per_s": len(requests) / elapsed, "p50_s": statistics.median(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="folder or Hub id (default: a random-weight model)")
    parser.add_argument("--image-size", type=int, default=224, help="for the random-weight model")
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared/data/cats_vs_dogs_mini"))
    parser.add_argument("--requests", type=int, default=64, help="per client count and app")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    results = {"machine": describe(), "requests": args.requests, "apps": {}}
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        model = args.model or random_model(folder / "model", args.image_size)
        pictures = photos(folder, args.dataset, 16)
        requests = [pictures[i % len(pictures)] for i in range(args.requests)]
        for index, (name, env) in enumerate(VARIANTS.items()):
            log = folder / f"app{index}.log"
            with running_app(model, env, log) as (url, _):
                results["apps"][name] = {clients: send(url, requests, clients) for clients in (1, 8)}

    machine, apps = results["machine"], results["apps"]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, app with {min(2, machine['cores'])} threads; "
          f"model {args.model or f'random weights, {args.image_size} px'}; {args.requests} requests per row")
    print(f"{'app':24}{'1 client req/s':>16}{'p50 ms':>9}{'8 clients req/s':>17}{'p50 ms':>9}")
    for name, rounds in apps.items():
        one, eight = rounds[1], rounds[8]
        print(f"{name:24}{one['requests_per_s']:>16.2f}{one['p50_s'] * 1000:>9.0f}{eight['requests_per_s']:>17.2f}"
              f"{eight['p50_s'] * 1000:>9.0f}")
    single, shipped = apps["one at a time"], apps["as shipped"]
    results["throughput_ratio_8_clients"] = shipped[8]["requests_per_s"] / single[8]["requests_per_s"]
    results["latency_ratio_1_client"] = shipped[1]["p50_s"] / single[1]["p50_s"]
    print(f"8 clients, shipped / one at a time throughput: {results['throughput_ratio_8_clients']:.2f}x; "
          f"1 client, shipped / one at a time p50 latency: {results['latency_ratio_1_client']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
