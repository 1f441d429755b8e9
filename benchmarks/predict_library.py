"""Pictures per second on a photo library, side by side in one run: a naive loop, catdog-predict, and the engine alone.

    python -m benchmarks.predict_library                        # a random-weight 224 px model (speed needs no training)
    python -m benchmarks.predict_library --model catdog-model --photos 400

The same photos of the mini set, as JPEG files: (1) a loop of ``predictor.predict`` in batches of 16, decoding
in the loop; (2) the command's own code (``predict_files``: decoding in threads, overlapped with the model,
written chunk by chunk to CSV); (3) the ceiling: the engine alone on inputs already decoded and resized. The three
take turns, --rounds times, the order rotating; each is reported as the median of its rounds and their range.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from datasets import load_dataset

from benchmarks.harness import complete_folder, describe
from catdog_model import CatDogClassifier, load_predictor
from catdog_model.predict import _files, predict_files

ROOT = Path(__file__).resolve().parents[1]


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="folder or Hub id (default: a random-weight model)")
    parser.add_argument("--image-size", type=int, default=224, help="for the random-weight model")
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared/data/cats_vs_dogs_mini"))
    parser.add_argument("--photos", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        if args.model is None:
            torch.manual_seed(0)
            (folder / "model").mkdir()
            complete_folder(CatDogClassifier(image_size=args.image_size).eval(), folder / "model")
        predictor = load_predictor(args.model or str(folder / "model"))
        rows = load_dataset(args.dataset, split="train")
        (folder / "photos").mkdir()
        for index in range(0, len(rows), max(1, len(rows) // args.photos))[: args.photos]:
            rows[index]["image"].save(folder / "photos" / f"{index:05d}.jpg", quality=90)
        paths = [path for _, path in _files([str(folder / "photos")])]
        predictor.predict(paths[:16])  # warm-up

        inputs = [predictor.model_input(path) for path in paths]
        paths_ = {"naive loop of predict, batches of 16": lambda: [predictor.predict(paths[i : i + 16])
                                                                  for i in range(0, len(paths), 16)],
                  "catdog-predict (predict_files)": lambda: predict_files(
                      predictor, _files([str(folder / "photos")]), Path(tempfile.mkdtemp(dir=temp)) / "rows.csv",
                      {"inputs": "benchmark"}, total=len(paths)),
                  "engine alone, inputs decoded beforehand": lambda: predictor.explain_inputs(inputs)}
        rates, names = {name: [] for name in paths_}, list(paths_)
        for round_ in range(args.rounds):
            for name in names[round_ % 3:] + names[: round_ % 3]:
                rates[name].append(len(paths) / _timed(paths_[name]))

    machine = describe()
    print(f"machine: {machine['cpu']} ({', '.join(machine['flags'])}), {machine['cores']} cores, OpenVINO "
          f"{machine['openvino']}; model {args.model or f'random weights, {args.image_size} px'}, engine {predictor.engine_name}; "
          f"{len(paths)} photos, {args.rounds} rounds")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"{name:42}{medians[name]:8.1f} pictures/s ({min(values):.1f}–{max(values):.1f})")
    command, naive, ceiling = (medians[name] for name in ("catdog-predict (predict_files)", names[0], names[2]))
    print(f"catdog-predict / ceiling: {command / ceiling:.2f}; catdog-predict / naive loop: {command / naive:.2f}x")


if __name__ == "__main__":
    main()
