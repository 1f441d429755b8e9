"""Serving under load: many gradio_client clients against the running app, on loopback only.

    python -m benchmarks.load_test --model catdog-model              # a trained folder (or a Hub id)
    python -m benchmarks.load_test --requests 300 --clients 16 --rounds 3 --json load.json

Starts `python app.py` twice, side by side: once as it ships (glibc malloc arenas capped by the app) and
once with the cap switched off (CATDOG_MALLOC_ARENAS=0), and sends each the same mix of valid pictures and
bad files. It reports failures, p50/p95 latency, the server's resident memory after warm-up and after every
round, and how fast a client hears "busy" when the queue is full. Bounded: at most --requests per round.
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

import numpy as np
from gradio_client import Client, handle_file
from PIL import Image

from benchmarks.harness import describe
from benchmarks.harness import rss_mb, running_app

ROOT = Path(__file__).resolve().parents[1]
BAD_FILES = {"notes.txt": (b"not a picture", "not an image"), "empty.jpg": (b"", "empty"),
             "truncated.jpg": (None, "damaged or truncated")}


def make_files(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    """Phone-photo-sized JPEGs and PNGs (valid), and the bad files the tests use."""
    rng = np.random.default_rng(0)
    valid = []
    for i, (width, height) in enumerate([(447, 374), (1200, 900), (4032, 3024), (640, 640)]):
        ramp = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None].repeat(height, 0).repeat(3, 2)
        noisy = np.clip(ramp.astype(int) + rng.integers(-30, 30, ramp.shape), 0, 255).astype(np.uint8)
        path = folder / f"photo{i}.{'png' if i == 3 else 'jpg'}"
        Image.fromarray(noisy).save(path)
        valid.append(path)
    buffer = io.BytesIO()
    Image.open(valid[1]).save(buffer, "JPEG")
    bad = {}
    for name, (content, message) in BAD_FILES.items():
        path = folder / name
        path.write_bytes(buffer.getvalue()[:2000] if content is None else content)
        bad[path] = message
    return valid, bad


def send_round(url: str, requests: list[Path], bad: dict[Path, str], clients: int) -> dict:
    """``requests`` sent from ``clients`` threads, each with its own gradio_client.Client."""
    local = threading.local()
    results = []

    def one(path: Path):
        if not hasattr(local, "client"):
            local.client = Client(url, verbose=False)
        start = time.perf_counter()
        try:
            local.client.predict(handle_file(str(path)), api_name="/predict")
            outcome = "ok" if path not in bad else "bad accepted"
        except Exception as error:  # the client raises AppError for the app's own messages
            outcome = "clear error" if path in bad and bad[path] in str(error) else f"failed: {str(error)[:80]}"
        results.append((outcome, time.perf_counter() - start, path in bad))

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, requests))
    latencies = [seconds for outcome, seconds, is_bad in results if not is_bad]
    return {
        "requests": len(results),
        "valid_failed": sum(1 for outcome, _, is_bad in results if not is_bad and outcome != "ok"),
        "bad_without_clear_error": sum(1 for outcome, _, is_bad in results if is_bad and outcome != "clear error"),
        "p50_s": statistics.median(latencies),
        "p95_s": float(np.percentile(latencies, 95)),
    }


def queue_full(url: str, path: Path, flood: int) -> dict:
    """Submit more jobs at once than the queue holds; the ones refused must be refused fast."""
    client = Client(url, verbose=False)
    start, refused = time.perf_counter(), []

    def one(_):
        t0 = time.perf_counter()
        try:
            client.predict(handle_file(str(path)), api_name="/predict")
        except Exception as error:
            if "queue is full" in str(error).lower() or "busy" in str(error).lower():
                refused.append(time.perf_counter() - t0)

    with ThreadPoolExecutor(flood) as pool:
        list(pool.map(one, range(flood)))
    return {"submitted": flood, "refused_busy": len(refused), "slowest_refusal_s": max(refused, default=None),
            "all_done_s": time.perf_counter() - start}


def run(model: str, extra_env: dict, args, folder: Path, label: str) -> dict:
    valid, bad = make_files(folder)
    rng = np.random.default_rng(1)
    mix = [*valid] * 4 + list(bad)  # about one bad file in six
    with running_app(model, extra_env, folder / f"{label}.log") as (url, process):
        send_round(url, [mix[i] for i in rng.integers(0, len(mix), args.clients * 4)], bad, args.clients)  # warm-up
        report = {"rss_after_warmup_mb": rss_mb(process), "rounds": []}
        for _ in range(args.rounds):
            requests = [mix[i] for i in rng.integers(0, len(mix), args.requests)]
            report["rounds"].append({**send_round(url, requests, bad, args.clients), "rss_mb": rss_mb(process)})
        report["rss_growth"] = report["rounds"][-1]["rss_mb"] / report["rss_after_warmup_mb"] - 1
        report["queue_full"] = queue_full(url, valid[2], args.flood)
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder or Hub id the app serves")
    parser.add_argument("--requests", type=int, default=300, help="per round")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flood", type=int, default=64, help="simultaneous jobs for the queue-full check (queue holds 32)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    results = {"machine": describe(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as folder:
        results["as shipped"] = run(args.model, {}, args, Path(folder), "shipped")
        results["arena cap off"] = run(args.model, {"CATDOG_MALLOC_ARENAS": "0"}, args, Path(folder), "uncapped")

    info = results["machine"]
    print(f"machine: {info['cpu']} ({', '.join(info['flags'])}), {info['cores']} cores; model {args.model}")
    print(f"{args.rounds} rounds × {args.requests} requests from {args.clients} clients, one bad file in about six")
    print(f"{'':15}{'RSS warm':>10}{'RSS end':>10}{'growth':>8}{'p50 s':>8}{'p95 s':>8}{'valid failed':>14}{'bad unclear':>13}{'busy in s':>11}")
    for name in ("as shipped", "arena cap off"):
        r = results[name]
        last = r["rounds"][-1]
        slowest = r["queue_full"]["slowest_refusal_s"]
        print(f"{name:15}{r['rss_after_warmup_mb']:>9.0f}M{last['rss_mb']:>9.0f}M{r['rss_growth']:>8.1%}{last['p50_s']:>8.2f}"
              f"{last['p95_s']:>8.2f}{sum(x['valid_failed'] for x in r['rounds']):>14}"
              f"{sum(x['bad_without_clear_error'] for x in r['rounds']):>13}"
              f"{(f'{slowest:.2f}' if slowest is not None else 'none'):>11}")
    growth = (results["arena cap off"]["rss_growth"] + 1) / (results["as shipped"]["rss_growth"] + 1)
    print(f"ratio of end-to-warm RSS, cap off / as shipped: {growth:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
