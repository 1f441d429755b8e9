"""The fast serving path against the exact one, side by side in one run: latency, parity, download, cold start.

    python -m benchmarks.serving_speed --model catdog-model --dataset ../shared/data/cats_vs_dogs_mini

- latency: batch 1, from the JPEG file to probabilities (decode and resize included), p50 of --repeats;
  "exact" is the eager fp32 model on a full decode, "fast" what load_predictor serves by default (OpenVINO,
  compiled before timing), "torch fast" the same weights run by torch (CATDOG_OPENVINO=off);
- parity: P(dog) of both fast paths against exact on every photo of --dataset;
- download: the file each path reads (model.safetensors, or model.serving.safetensors);
- cold start: a fresh `python` process, from start to its first prediction (torch serves while OpenVINO
  compiles in the background) and to OpenVINO serving, weights local; and the app's:
  `python app.py` started, to its first /predict answered through gradio_client.
It prints a table and writes --json, with the machine: CPU model and flags, cores, torch threads.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from catdog_model import CatDogClassifier, load_predictor, open_image
from catdog_model.hardware import describe
from catdog_model.serving import SERVING_FILE, save_serving_file

COLD_START = """
import sys, time
start = float(sys.argv[1])
from catdog_model import load_predictor, open_image
predictor = load_predictor(sys.argv[2], exact=sys.argv[3] == "exact")  # the fast path compiles OpenVINO meanwhile
size = None if sys.argv[3] == "exact" else predictor.image_size
predictor.predict([open_image(sys.argv[4], draft_size=size)])
first = time.time() - start
predictor.wait_for_openvino()
print(first, time.time() - start)
"""


def _phone_photo(path: Path) -> Path:
    """A 4032×3024 JPEG with photo-like detail (a phone camera's size)."""
    y, x = np.mgrid[0:3024, 0:4032]
    pixels = 127 + 90 * np.stack([np.sin(x / 37), np.cos(y / 23), np.sin((x + y) / 51)], -1)
    pixels += np.random.default_rng(0).normal(0, 12, pixels.shape)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def _latencies(calls: dict, repeats: int) -> dict[str, float]:
    """Each call's p50 in ms. The calls take turns within each repeat, so that a slow spell of a shared
    machine falls on all of them alike rather than on whichever ran then."""
    times = {name: [] for name in calls}
    for _ in range(repeats + 2):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples[2:]) * 1000 for name, samples in times.items()}


def _from_file(predictor, data: bytes, draft: bool):
    """From the JPEG's bytes: the exact path decodes in full, the fast ones at the model's scale (Image.draft)."""
    size = predictor.image_size if draft else None
    return lambda: predictor.predict([open_image(io.BytesIO(data), draft_size=size)])


def _cold_start(folder: str, path: str, photo: Path, runs: int = 2) -> tuple[float, float]:
    """Seconds from process start to the first prediction, and to OpenVINO serving (the fast path's default)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "CATDOG_OPENVINO": "background"}
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", COLD_START, str(time.time()), folder, path, str(photo)],
                             capture_output=True, text=True, env=env, check=True)
        first, compiled = out.stdout.strip().splitlines()[-1].split()
        results.append((float(first), float(compiled)))
    return min(results)


def _app_cold_start(folder: str, exact: bool, photo: Path, threads: int) -> float:
    """`python app.py` started → its first /predict answered, through gradio_client, on loopback."""
    from gradio_client import Client, handle_file

    from benchmarks.load_test import running_app

    env = {"CATDOG_EXACT": "1" if exact else "0", "CATDOG_TORCH_THREADS": str(threads), "CATDOG_OPENVINO": "background"}
    start = time.monotonic()
    with running_app(folder, env, photo.with_name(f"app-{exact}.log")) as (url, _):
        Client(url, verbose=False).predict(handle_file(str(photo)), api_name="/predict")
        return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained folder (its model.safetensors)")
    parser.add_argument("--dataset", default=None, help="photos for the parity check (a local folder or Hub id)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", default="benchmarks/results/serving_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="catdog-bench-"))
    try:
        folder = work / "model"
        shutil.copytree(args.model, folder, ignore=shutil.ignore_patterns("*.png", "*.html", "checkpoints"))
        if not (folder / SERVING_FILE).is_file():  # a model trained before the serving file existed
            save_serving_file(CatDogClassifier.from_pretrained(str(folder)).eval(), folder / SERVING_FILE)
        # "fast" is the default: OpenVINO where installed; "torch fast" the same weights run by torch.
        paths = {"exact": load_predictor(str(folder), exact=True),
                 "torch fast": load_predictor(str(folder), openvino="off"),
                 "fast": load_predictor(str(folder), openvino="now")}
        exact, fast = paths["exact"], paths["fast"]
        photo = _phone_photo(work / "phone.jpg")
        photo_bytes, median_photo = photo.read_bytes(), Image.open(photo).resize((447, 374))
        results = {
            "machine": describe(args.threads),
            "model": {"source": args.model, "image_size": exact.image_size, "fast_path": fast.serving_path},
            "latency_ms_p50": _latencies({name: _from_file(predictor, photo_bytes, name != "exact")
                                          for name, predictor in paths.items()}, args.repeats),
            # The median cats_vs_dogs photo, already decoded: the model's part alone, with the resize.
            "pil_latency_ms_p50": _latencies({name: (lambda p=predictor: p.predict([median_photo]))
                                              for name, predictor in paths.items()}, args.repeats),
            "file_mb": {"exact": (folder / "model.safetensors").stat().st_size / 1e6,
                        "fast": (folder / SERVING_FILE).stat().st_size / 1e6},
            "cold_start_s": {"exact": _cold_start(str(folder), "exact", photo)[0]},
            "app_cold_start_s": {"exact": _app_cold_start(str(folder), True, photo, args.threads),
                                 "fast": _app_cold_start(str(folder), False, photo, args.threads)},
        }
        results["cold_start_s"]["fast"], results["cold_start_s"]["openvino_serving"] = _cold_start(str(folder), "fast", photo)
        if args.dataset:
            from catdog_model.data import load_image_dataset

            data = load_image_dataset(args.dataset)
            images = [row[data.image_column] for row in data.dataset]
            p_exact = np.array([r["dog"] for r in exact.predict(images)])
            results["parity"] = {}
            for name in ("torch fast", "fast"):
                p_fast = np.array([r["dog"] for r in paths[name].predict(images)])
                difference = np.abs(p_fast - p_exact)
                results["parity"][name] = {"images": len(images), "max_abs_diff": float(difference.max()),
                                           "mean_abs_diff": float(difference.mean()),
                                           "within_0.01": float(np.mean(difference <= 0.01)),
                                           "labels_agree": float(np.mean((p_fast > 0.5) == (p_exact > 0.5)))}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    machine = results["machine"]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {args.threads} torch threads, torch {machine['torch']}, "
          f"native bf16: {machine['native_bf16']}")
    print(f"model:   {args.model} at {results['model']['image_size']} px; fast path: {results['model']['fast_path']}")
    print("| | exact (eager fp32, full decode) | fast, torch (CATDOG_OPENVINO=off) | fast (default) | default / exact |")
    print("|---|---|---|---|---|")
    for label, key in (("batch-1 latency, JPEG 4032×3024 → probabilities (p50)", "latency_ms_p50"),
                       ("batch-1 latency, PIL image 447×374 → probabilities (p50)", "pil_latency_ms_p50")):
        row = results[key]
        print(f"| {label} | {row['exact']:.1f} ms | {row['torch fast']:.1f} ms | {row['fast']:.1f} ms "
              f"| {row['fast'] / row['exact']:.2f}× |")
    files, cold, app = results["file_mb"], results["cold_start_s"], results["app_cold_start_s"]
    print(f"| file read / downloaded | {files['exact']:.0f} MB | {files['fast']:.0f} MB | {files['fast']:.0f} MB "
          f"| {files['fast'] / files['exact']:.2f}× |")
    print(f"| cold start → first prediction | {cold['exact']:.1f} s | | {cold['fast']:.1f} s (OpenVINO serving at "
          f"{cold['openvino_serving']:.1f} s) | {cold['fast'] / cold['exact']:.2f}× |")
    print(f"| app.py start → first /predict answered | {app['exact']:.1f} s | | {app['fast']:.1f} s "
          f"| {app['fast'] / app['exact']:.2f}× |")
    for name, parity in results.get("parity", {}).items():
        print(f"parity of {name} on {parity['images']} photos: P(dog) max |diff| {parity['max_abs_diff']:.4f}, mean "
              f"{parity['mean_abs_diff']:.5f}, within 0.01: {parity['within_0.01']:.2%}, labels agree: {parity['labels_agree']:.2%}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
