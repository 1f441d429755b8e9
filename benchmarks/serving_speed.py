"""The shipped engine against eager fp32, side by side in one run: latency, parity, download; and the shipped
engine's cold start and memory.

    python -m benchmarks.serving_speed --model catdog-model --dataset ../shared/data/cats_vs_dogs_mini

- latency: batch 1, p50 of --repeats; from a 12-megapixel JPEG file to probabilities (decode and resize
  included: exact decodes in full, the default at the model's scale with Image.draft), and from the median
  cats_vs_dogs photo already decoded. "exact" is the fp32 weights in torch (``harness.torch_reference``),
  "default" what ``load_predictor`` serves (the OpenVINO IR shipped with the model);
- parity: P(dog) of the default against exact on every photo of --dataset;
- download: the files each reads (config.json, ood.safetensors, and model.safetensors or the IR);
- cold start: a fresh `python` process, from its start to its first prediction, weights local (split into
  imports, load_predictor and the first answer), then its resident memory after 100 predictions and 10
  explanations; and the app's: `python app.py` started, to its first /predict answered (gradio_client).
It prints a table and writes --json, with the machine: CPU model and flags, cores, threads.
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

from benchmarks.harness import describe, torch_reference
from catdog_model import load_predictor, open_image
from catdog_model.config import IR_FILES, OOD_FILE

# Run in a fresh process; prints: imports s, load s, first answer s (all from process start), RSS MB.
COLD_START = """
import sys, time
start = float(sys.argv[1])
from catdog_model import load_predictor, open_image
imported = time.time() - start
predictor = load_predictor(sys.argv[2])
loaded = time.time() - start
image = open_image(sys.argv[3], draft_size=predictor.image_size)
predictor.predict([image])
first = time.time() - start
for _ in range(100):
    predictor.predict([image])
for _ in range(10):
    predictor.explain(image)
rss = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024
print(imported, loaded, first, rss)
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
    size = predictor.image_size if draft else None
    return lambda: predictor.predict([open_image(io.BytesIO(data), draft_size=size)])


def _cold_start(folder: str, photo: Path, threads: int, runs: int = 2) -> dict:
    """The fastest of ``runs`` fresh processes (the first may also pay for a cold disk cache)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", COLD_START, str(time.time()), folder, str(photo)],
                             capture_output=True, text=True, env=env, check=True)
        results.append([float(value) for value in out.stdout.strip().splitlines()[-1].split()])
    imported, loaded, first, rss = min(results, key=lambda result: result[2])
    return {"imports_s": imported, "loaded_s": loaded, "first_prediction_s": first, "rss_mb": rss}


def _app_cold_start(folder: str, photo: Path, threads: int) -> float:
    """`python app.py` started → its first /predict answered, through gradio_client, on loopback."""
    from gradio_client import Client, handle_file

    from benchmarks.harness import running_app

    start = time.monotonic()
    with running_app(folder, {"CATDOG_THREADS": str(threads)}, photo.with_name("app.log")) as (url, _):
        Client(url, verbose=False).predict(handle_file(str(photo)), api_name="/predict")
        return time.monotonic() - start


def _parity(exact, default, dataset: str) -> dict:
    from catdog_model.training.data import load_image_dataset

    data = load_image_dataset(dataset)
    images = [row[data.image_column] for row in data.dataset]
    p_exact = np.array([r["dog"] for r in exact.predict(images)])
    p_default = np.array([r["dog"] for r in default.predict(images)])
    difference = np.abs(p_default - p_exact)
    return {"images": len(images), "max_abs_diff": float(difference.max()), "mean_abs_diff": float(difference.mean()),
            "within_0.01": float(np.mean(difference <= 0.01)),
            "labels_agree": float(np.mean((p_default > 0.5) == (p_exact > 0.5)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a folder written by train_accelerate.py")
    parser.add_argument("--dataset", default=None, help="photos for the parity check (a local folder or Hub id)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", default="benchmarks/results/serving_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="catdog-bench-"))
    try:
        folder = work / "model"
        shutil.copytree(args.model, folder, ignore=shutil.ignore_patterns("*.png", "*.html", "checkpoints", ".*"))
        engines = {"exact": torch_reference(folder), "default": load_predictor(str(folder))}
        photo = _phone_photo(work / "phone.jpg")
        photo_bytes, median_photo = photo.read_bytes(), Image.open(photo).resize((447, 374))
        size = {name: (folder / name).stat().st_size / 1e6 for name in ("config.json", OOD_FILE, "model.safetensors", *IR_FILES)}
        shared = size["config.json"] + size[OOD_FILE]
        results = {
            "machine": describe(args.threads),
            "model": {"source": args.model, "image_size": engines["exact"].image_size, "engine": engines["default"].engine_name},
            "latency_ms_p50": _latencies({name: _from_file(predictor, photo_bytes, name != "exact")
                                          for name, predictor in engines.items()}, args.repeats),
            "pil_latency_ms_p50": _latencies({name: (lambda p=predictor: p.predict([median_photo]))
                                              for name, predictor in engines.items()}, args.repeats),
            "download_mb": {"exact": shared + size["model.safetensors"], "default": shared + sum(size[n] for n in IR_FILES),
                            "model.safetensors": size["model.safetensors"]},
            "cold_start": _cold_start(str(folder), photo, args.threads),
            "app_cold_start_s": _app_cold_start(str(folder), photo, args.threads),
        }
        if args.dataset:
            results["parity"] = _parity(engines["exact"], engines["default"], args.dataset)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print(results, args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


def _print(results: dict, args) -> None:
    machine, model = results["machine"], results["model"]
    print(f"machine: {machine['cpu']} ({', '.join(machine['flags'])}), {machine['cores']} cores, {args.threads} threads, "
          f"torch {machine['torch']}")
    print(f"model:   {args.model} at {model['image_size']} px; default engine: {model['engine']}")
    print(f"| | exact (`torch-fp32`) | default (`{model['engine']}`) | default / exact |")
    print("|---|---|---|---|")
    for label, key in (("batch-1 latency, PIL image 447×374 → probabilities (p50)", "pil_latency_ms_p50"),
                       ("batch-1 latency, 12-megapixel JPEG file → probabilities (p50)", "latency_ms_p50")):
        row = results[key]
        print(f"| {label} | {row['exact']:.1f} ms | {row['default']:.1f} ms | **{row['default'] / row['exact']:.2f}×** |")
    files = results["download_mb"]
    print(f"| downloaded by a Space (config, ood.safetensors, weights or IR) | {files['exact']:.0f} MB | "
          f"{files['default']:.0f} MB | {files['default'] / files['exact']:.2f}× "
          f"({files['default'] / files['model.safetensors']:.2f}× model.safetensors) |")
    cold = results["cold_start"]
    for label, key, unit in (("fresh process: imports done", "imports_s", "s"),
                             ("fresh process: load_predictor returned", "loaded_s", "s"),
                             ("fresh process: first prediction (files local)", "first_prediction_s", "s"),
                             ("resident memory after 100 predictions + 10 explanations", "rss_mb", "MB")):
        print(f"| {label} | | {cold[key]:.2f} {unit} | |")
    print(f"| `python app.py` → first /predict answered | | {results['app_cold_start_s']:.1f} s | |")
    if "parity" in results:
        parity = results["parity"]
        print(f"parity on {parity['images']} photos: P(dog) max |diff| {parity['max_abs_diff']:.4f}, mean "
              f"{parity['mean_abs_diff']:.5f}, within 0.01: {parity['within_0.01']:.2%}, labels agree: {parity['labels_agree']:.2%}")


if __name__ == "__main__":
    main()
