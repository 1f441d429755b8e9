"""The serving engines side by side: eager fp32 torch, the engine with int8 weights (bf16 arithmetic where the CPU
computes it natively, else fp32) and the int8 engine, each in a process of its own.

    python -m benchmarks.serving_speed --model catdog-model --dataset ../shared/data/cats_vs_dogs_mini

- latency: batch 1, a photo already decoded (447×374, the median cats_vs_dogs size) → probabilities, at 1 thread and
  at 2. Every variant runs in a worker process of its own, and the workers take turns, a burst of calls each per
  round, so that none runs beside another (two thread pools on 2 cores starve each other) and a slow spell of a
  shared machine falls on all alike. Reported: the median of the rounds' medians, the range of the rounds' medians,
  and the load average before and after.
- parity: every photo of --dataset through each engine against eager fp32: verdicts, P(dog), the "neither" score and
  the Grad-CAM maps.
- catdog-predict: pictures per second of the command's own code (``predict_files``) on --photos JPEG files, each
  engine in a worker of its own, in turns.
- cold start: a fresh process, from its start to its first answer, files local.
It prints tables and writes --json with the machine: CPU model and flags, cores, threads, load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("int8-weights", "int8")  # load_predictor's int8=False and int8=True
VARIANTS = ("torch-fp32", *ENGINES)


# ---- The worker: one variant, loaded once, timed when asked (stdin: "latency N" or "library FOLDER"; stdout: JSON).

def _worker(variant: str, model: str, threads: int) -> None:
    answers, sys.stdout = sys.stdout, sys.stderr  # what the libraries print stays off the answers' pipe
    from PIL import Image

    from catdog_model import load_predictor
    from catdog_model.predict import _files, predict_files

    if variant == "torch-fp32":
        import torch

        from benchmarks.harness import torch_reference

        torch.set_num_threads(threads)
        predictor = torch_reference(Path(model))
    else:
        predictor = load_predictor(model, threads=threads, int8=variant == "int8")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (374, 447, 3), dtype=np.uint8))
    for _ in range(5):
        predictor.predict([photo])
    print(json.dumps({"engine": predictor.engine_name}), file=answers, flush=True)
    for line in sys.stdin:
        task, _, argument = line.strip().partition(" ")
        if task == "latency":
            times = []
            for _ in range(int(argument)):
                start = time.perf_counter()
                predictor.predict([photo])
                times.append(time.perf_counter() - start)
            print(json.dumps(times), file=answers, flush=True)
        elif task == "library":
            with tempfile.TemporaryDirectory() as temp:
                pictures = list(_files([argument]))
                start = time.perf_counter()
                predict_files(predictor, iter(pictures), Path(temp) / "rows.csv", {"benchmark": variant}, len(pictures))
                print(json.dumps(len(pictures) / (time.perf_counter() - start)), file=answers, flush=True)


class Worker:
    def __init__(self, variant: str, model: str, threads: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.serving_speed", "--worker", variant,
                                         "--model", model, "--threads", str(threads)], cwd=ROOT, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.engine = json.loads(self._answer())["engine"]

    def _answer(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"a worker exited ({self.process.wait()})")
        return line

    def ask(self, task: str):
        self.process.stdin.write(task + "\n")
        self.process.stdin.flush()
        answer = json.loads(self._answer())
        time.sleep(0.3)  # an idle thread pool may spin a moment after its work: let it rest before the next turn
        return answer

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _in_turns(workers: dict, task: str, rounds: int, reduce) -> dict:
    """``task`` asked of each worker in turn, ``rounds`` times (the order rotating), each answer reduced to a number;
    the median, minimum and maximum of those numbers per worker."""
    found = {name: [] for name in workers}
    names = list(workers)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            found[name].append(reduce(workers[name].ask(task)))
    return {name: {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": len(values)}
            for name, values in found.items()}


def latency(model: str, threads: int, rounds: int, calls: int) -> dict:
    workers = {variant: Worker(variant, model, threads) for variant in VARIANTS}
    try:
        load = os.getloadavg()
        found = _in_turns(workers, f"latency {calls}", rounds, lambda times: 1000 * statistics.median(times))
        return {"threads": threads, "ms": found, "engines": {name: worker.engine for name, worker in workers.items()},
                "load_average_before_after": [load[0], os.getloadavg()[0]]}
    finally:
        for worker in workers.values():
            worker.close()


def library(model: str, threads: int, rounds: int, photos: Path) -> dict:
    workers = {variant: Worker(variant, model, threads) for variant in ENGINES}
    try:
        load = os.getloadavg()
        found = _in_turns(workers, f"library {photos}", rounds, float)
        return {"threads": threads, "pictures_per_s": found, "load_average_before_after": [load[0], os.getloadavg()[0]]}
    finally:
        for worker in workers.values():
            worker.close()


# ---- Parity and cold start, in this process and in fresh ones.

def parity(model: str, dataset: str) -> dict:
    """Each engine against eager fp32 on every photo of ``dataset``: the share of verdicts that agree, P(dog)'s
    largest and mean difference, the "neither" score's correlation and the Grad-CAM maps' median correlation."""
    from datasets import load_dataset

    from benchmarks.harness import torch_reference
    from catdog_model import load_predictor
    from catdog_model.serving.detector import ood_score
    from catdog_model.serving.verdict import decide

    rows = load_dataset(dataset, split="train")
    predictors = {"torch-fp32": torch_reference(Path(model)),
                  **{name: load_predictor(model, int8=name == "int8") for name in ENGINES}}
    inputs = [predictors["int8"].model_input(image) for image in rows["image"]]
    answers = {}
    for name, predictor in predictors.items():
        outputs = [predictor.outputs(np.stack(inputs[start : start + 32])) for start in range(0, len(inputs), 32)]
        p = predictor.probabilities(np.concatenate([output.logits for output in outputs]))
        scores = np.concatenate([ood_score(output.features, predictor.detector) for output in outputs])
        verdicts = [decide(dict(zip(predictor.labels, (1 - q, q))), score <= predictor.ood_threshold).answer
                    for q, score in zip(p, scores)]
        answers[name] = p, scores, verdicts, np.concatenate([output.heatmaps for output in outputs])
    p32, scores32, verdicts32, maps32 = answers["torch-fp32"]
    found = {"photos": len(inputs), "fp32_verdicts": {v: verdicts32.count(v) for v in sorted(set(verdicts32))}}
    for name in ENGINES:
        p, scores, verdicts, maps = answers[name]
        heatmap_r = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(maps, maps32) if a.std() > 0 and b.std() > 0]
        found[name] = {"verdicts_agree": float(np.mean([a == b for a, b in zip(verdicts, verdicts32)])),
                       "p_dog_max_diff": float(np.abs(p - p32).max()), "p_dog_mean_diff": float(np.abs(p - p32).mean()),
                       "ood_score_r": float(np.corrcoef(scores, scores32)[0, 1]),
                       "heatmap_median_r": float(np.median(heatmap_r))}
    return found


COLD_START = """
import sys, time
start = float(sys.argv[1])
from PIL import Image
from catdog_model import load_predictor
predictor = load_predictor(sys.argv[2], int8=sys.argv[3] == "int8")
loaded = time.time() - start
predictor.predict([Image.new("RGB", (447, 374))])
print(loaded, time.time() - start)
"""


def cold_start(model: str, threads: int, runs: int) -> dict:
    """Seconds from a fresh process's start to load_predictor's return and to its first answer: the median of
    ``runs``, for each engine."""
    found = {}
    for name in ENGINES:
        env = {**os.environ, "CATDOG_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        times = [[float(value) for value in subprocess.run(
            [sys.executable, "-c", COLD_START, str(time.time()), model, name], env=env, capture_output=True, text=True,
            check=True).stdout.split()] for _ in range(runs)]
        loaded, first = zip(*times)
        found[name] = {"load_predictor_s": statistics.median(loaded), "first_answer_s": statistics.median(first)}
    return found


def _photos(dataset: str, count: int, folder: Path) -> Path:
    from datasets import load_dataset

    rows = load_dataset(dataset, split="train")
    for index in range(0, len(rows), max(1, len(rows) // count))[:count]:
        rows[index]["image"].save(folder / f"{index:05d}.jpg", quality=90)
    return folder


def _print(results: dict) -> None:
    machine = results["machine"]
    print(f"machine: {machine['cpu']} ({', '.join(machine['flags'])}), {machine['cores']} cores; OpenVINO "
          f"{machine['openvino']}, torch {machine.get('torch')}; model {results['model']}")
    for run in results["latency"]:
        ms, engines = run["ms"], run["engines"]
        print(f"\nbatch-1 latency, {run['threads']} thread(s), load average {run['load_average_before_after'][0]:.2f} → "
              f"{run['load_average_before_after'][1]:.2f}")
        print("| variant | ms, median of rounds | range | × eager fp32 | × int8 weights |")
        print("|---|---|---|---|---|")
        for name in VARIANTS:
            row = ms[name]
            print(f"| {engines[name]} | {row['median']:.1f} | {row['min']:.1f}–{row['max']:.1f} | "
                  f"{row['median'] / ms['torch-fp32']['median']:.2f} | {row['median'] / ms['int8-weights']['median']:.2f} |")
    for run in results.get("library", []):
        rate = run["pictures_per_s"]
        print(f"\ncatdog-predict, {run['threads']} thread(s): int8 weights {rate['int8-weights']['median']:.1f} "
              f"({rate['int8-weights']['min']:.1f}–{rate['int8-weights']['max']:.1f}) pictures/s, int8 "
              f"{rate['int8']['median']:.1f} ({rate['int8']['min']:.1f}–{rate['int8']['max']:.1f}): "
              f"**{rate['int8']['median'] / rate['int8-weights']['median']:.2f}×**")
    if "parity" in results:
        parity_ = results["parity"]
        print(f"\nparity against eager fp32 on {parity_['photos']} photos (fp32 says {parity_['fp32_verdicts']})")
        print("| engine | verdicts agree | P(dog) max / mean diff | \"neither\" score r | Grad-CAM median r |")
        print("|---|---|---|---|---|")
        for name in ENGINES:
            row = parity_[name]
            print(f"| {name} | {row['verdicts_agree']:.2%} | {row['p_dog_max_diff']:.4f} / {row['p_dog_mean_diff']:.4f} | "
                  f"{row['ood_score_r']:.4f} | {row['heatmap_median_r']:.3f} |")
    if "cold_start" in results:
        print("\ncold start, fresh process, files local (median): load_predictor returned / first answer")
        for name, row in results["cold_start"].items():
            print(f"| {name} | {row['load_predictor_s']:.2f} s | {row['first_answer_s']:.2f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a folder written by train_accelerate.py, with an int8 engine")
    parser.add_argument("--dataset", default=None, help="photos for parity and catdog-predict (a local folder or Hub id)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10, help="batch-1 calls in each worker's turn")
    parser.add_argument("--photos", type=int, default=320, help="JPEG files for catdog-predict")
    parser.add_argument("--json", default="benchmarks/results/serving_speed.json")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args.worker, args.model, args.threads[0])

    from benchmarks.harness import describe

    model = str(Path(args.model).resolve())
    results = {"machine": describe(), "model": args.model,
               "latency": [latency(model, threads, args.rounds, args.calls) for threads in args.threads]}
    if args.dataset:
        with tempfile.TemporaryDirectory() as temp:
            photos = _photos(args.dataset, args.photos, Path(temp))
            results["library"] = [library(model, threads, max(3, args.rounds // 5), photos) for threads in args.threads]
        results["parity"] = parity(model, args.dataset)
    results["cold_start"] = cold_start(model, max(args.threads), runs=3)
    _print(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
