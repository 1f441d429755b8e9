"""catdog-predict: folders, files, globs or a dataset in, one row per picture out (CSV, JSON Lines or Parquet).

    catdog-predict PATH... --output OUT [--model M]
    catdog-predict --dataset ID_OR_FOLDER [--split S] [--image-column C] --output OUT
    accelerate launch --num_processes 4 -m catdog_model.predict ...

Chunks are written atomically into ``OUT.parts/`` and merged at the end, so a rerun after a kill skips what is done.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import unicodedata
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image
from tqdm.auto import tqdm

from .errors import TRAIN_EXTRA, CatdogError
from .cli import exit_with_error, parse_command
from .hardware import usable_cores
from .images import FORMATS as PICTURE_FORMATS, ImageError
from .predict_dataset import beside_the_split, check_room, dataset_rows, open_split, push_split
from .serving.files import MODEL_ORDER, resolve_model, write_atomically
from .serving.predictor import Predictor, load_predictor

__all__ = ["FORMATS", "classify_chunk", "decode_chunk", "main", "neutralised", "predict_files", "row_columns"]

logger = logging.getLogger(__name__)

FORMATS = (".csv", ".jsonl", ".parquet")
CHUNK = 64  # pictures per chunk: what a kill can lose, and one forward pass at the predictor's batch size or four
EXTENSIONS = {ext for ext, name in Image.registered_extensions().items() if name in PICTURE_FORMATS}


def row_columns(labels: tuple[str, str]) -> list[str]:
    """A row's columns: the picture's name, then what the model says of it."""
    negative, positive = labels
    return ["picture", "verdict", f"p_{negative}", f"p_{positive}", "ood_score", "note"]


def neutralised(cell):
    """A cell a spreadsheet shows as text, on one line: OWASP's leading apostrophe before a formula opener (=, +, -, @,
    tab), found after spaces, a BOM and NFKC."""
    if not isinstance(cell, str):
        return cell
    cell = cell.replace("\r", " ").replace("\n", " ")
    visible = unicodedata.normalize("NFKC", cell).lstrip(" \ufeff\u00a0")  # NFKC makes U+3000 a space
    return "'" + cell if visible.startswith(("=", "+", "-", "@", "\t")) else cell


def _written_name(name: str) -> str:
    """A file name every output format can hold, each picture's distinct: non-UTF-8 bytes (lone surrogates to Python,
    which no UTF-8 writer takes) as \\xNN, line breaks as \\n and \\r, a backslash as \\\\."""
    name = name.replace("\\", "\\\\").encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return name.replace("\r", "\\r").replace("\n", "\\n")


def _regular(path: Path) -> bool:
    """Whether ``path`` is a regular file: a FIFO would block for ever, a device never end."""
    if path.is_file():
        return True
    logger.warning("skipping %s: not a regular file", path)
    return False


def _unreadable(error: OSError) -> None:  # os.walk's onerror: a folder it cannot list
    logger.warning("skipping %s and what it holds: %s", error.filename, error.strerror or error)


def _files(inputs: list[str]) -> Iterator[tuple[str, str]]:
    """(name, path) for each picture, in a fixed order: a folder's by sorted relative path (recursive), a glob's sorted,
    a file as it is. What cannot be read is skipped with a warning."""
    for given in inputs:
        matches = sorted(glob.glob(given, recursive=True)) if glob.has_magic(given) else [given]
        if not matches:
            raise CatdogError(f"{given} matches no file")
        for match in matches:
            root = Path(match)
            if root.is_dir():
                for folder, subfolders, names in os.walk(root, onerror=_unreadable):
                    subfolders.sort()
                    for name in sorted(names):
                        path = Path(folder) / name
                        if path.suffix.lower() in EXTENSIONS and _regular(path):
                            yield _written_name(path.relative_to(root).as_posix()), str(path)
            elif root.exists():
                if _regular(root):
                    yield _written_name(root.name if not glob.has_magic(given) else match), str(root)
            else:
                raise CatdogError(f"No such file or folder: {match}")


def _listing_digest(pictures: list[tuple[str, str]]) -> str:
    """A hash of every picture's name, size and modification time: what a folder run classifies, as of now."""
    digest = hashlib.sha256()
    for name, path in pictures:
        stat = os.stat(path)
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _chunks(pictures: Iterator, size: int) -> Iterator[list]:
    while chunk := list(islice(pictures, size)):
        yield chunk


def decode_chunk(predictor: Predictor, chunk: list[tuple[str, object]], pool: ThreadPoolExecutor) -> list[Future]:
    """Each (name, picture) decoded to the model's input in the pool, as futures: they decode while the model runs on
    the chunk before."""
    return [pool.submit(_decode, predictor, picture) for _, picture in chunk]


def classify_chunk(predictor: Predictor, chunk: list[tuple[str, object]], decoding: list[Future]) -> list[dict]:
    """One row per (name, picture), from its decoded input: the rows of this command and of the Space's batch tab."""
    negative, positive = predictor.labels
    decoded = [future.result() for future in decoding]
    inputs = [value for value in decoded if not isinstance(value, ImageError)]
    explanations = iter(predictor.explain_inputs(inputs) if inputs else [])
    rows = []
    for (name, _), value in zip(chunk, decoded):
        row = {**dict.fromkeys(row_columns(predictor.labels)), "picture": name, "verdict": "error", "note": ""}
        if isinstance(value, ImageError):
            row["note"] = f"{value.title}: {value}"
        else:
            explanation = next(explanations)
            verdict = explanation.verdict
            row.update({"verdict": verdict.answer, f"p_{negative}": explanation.probabilities[negative],
                        f"p_{positive}": explanation.probabilities[positive], "ood_score": explanation.ood_score,
                        "note": "" if verdict.is_confident else verdict.sentence()})
        rows.append(row)
    return rows


def _decode(predictor: Predictor, picture):
    if isinstance(picture, ImageError):  # a dataset row whose file could not be read
        return picture
    try:
        return predictor.model_input(picture)
    except ImageError as error:
        return error


def _write(rows: list[dict], path: Path) -> None:
    """``rows`` into ``path`` in its extension's format, whole or absent."""
    def write(temp: Path) -> None:
        if path.suffix == ".csv":
            with open(temp / path.name, "w", newline="") as out:
                writer = csv.DictWriter(out, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows({key: neutralised(value) for key, value in row.items()} for row in rows)
        elif path.suffix == ".jsonl":
            (temp / path.name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            import pyarrow
            import pyarrow.parquet

            pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), temp / path.name)

    write_atomically(path.parent, write)


def _identity(predictor: Predictor, source: dict) -> dict:
    """What makes the output what it is: what the inputs hold now (the strings that named them read differently from
    another folder, or after pictures were added) and the model's weights."""
    return {**source, "model": predictor.source, "revision": predictor.revision,
            "weights": predictor.weights_sha256, "engine": predictor.engine_name}


def _claim_parts(output: Path, identity: dict) -> Path:
    """OUT.parts/, the chunks written so far; refused if they belong to other inputs or another model."""
    parts = output.with_name(output.name + ".parts")
    record = parts / "run.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        changed = [key for key in identity if saved.get(key) != identity[key]]
        if changed:
            raise CatdogError(f"{parts} holds the rows of another run ({', '.join(changed)} differ): use another --output, "
                             "or delete it to start again")
    else:
        parts.mkdir(exist_ok=True)
        record.write_text(json.dumps(identity, indent=2))
    return parts


def predict_files(predictor: Predictor, pictures: Iterator, output: Path, identity: dict, total: Optional[int] = None,
                  split=None) -> list[dict]:
    """Classify (name, picture) pairs into ``output``, resumably, shared between the processes of an ``accelerate
    launch``; beside the columns of a dataset ``split`` if given. Returns the rows (on the main process)."""
    state = _distributed_state()
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    parts = _claim_parts(output, identity) if rank == 0 else output.with_name(output.name + ".parts")
    if state:
        state.wait_for_everyone()
    written = 0
    bar = tqdm(total=total, unit="picture", desc="classifying", disable=rank != 0, dynamic_ncols=True)
    with ThreadPoolExecutor(_cores_of_this_process()) as pool:
        pending = None  # the chunk decoding while the model runs on the one before
        for index, chunk in enumerate(_chunks(pictures, CHUNK)):
            written += 1
            part = parts / f"{index:08d}.jsonl"  # JSON Lines whatever the output: the rows' types survive the merge
            if index % world != rank or part.is_file():  # another process's chunk, or one written before a kill
                bar.update(len(chunk) if part.is_file() or world == 1 else 0)
                continue
            decoding = decode_chunk(predictor, chunk, pool)
            if pending:
                _finish(predictor, *pending, bar)
            pending = (chunk, decoding, part)
        if pending:
            _finish(predictor, *pending, bar)
    bar.close()
    if state:
        state.wait_for_everyone()
    return _merge(parts, written, output, split) if rank == 0 else []


def _finish(predictor: Predictor, chunk: list, decoding: list[Future], part: Path, bar: tqdm) -> None:
    _write(classify_chunk(predictor, chunk, decoding), part)
    bar.update(len(chunk) * int(os.environ.get("WORLD_SIZE", "1")))


def _merge(parts: Path, chunks: int, output: Path, split=None) -> list[dict]:
    """The chunks in order into OUT, atomically, then OUT.parts/ goes. Returns the rows."""
    rows = [json.loads(line) for index in range(chunks) for line in (parts / f"{index:08d}.jsonl").read_text().splitlines()]
    if not rows:
        raise CatdogError("no picture to classify: the inputs hold none")
    if split is None:
        _write(rows, output)
    elif output.suffix == ".parquet":  # the pictures too, with their datasets features: load_dataset reads it back
        write_atomically(output.parent, lambda temp: beside_the_split(rows, split).to_parquet(temp / output.name))
    else:  # text formats: the row's index, the split's columns but its pictures, the verdict
        import datasets

        pictures = [name for name, feature in split.features.items() if isinstance(feature, datasets.Image)]
        _write([{"picture": row["picture"], **columns, **row}
                for columns, row in zip(split.remove_columns(pictures).to_list(), rows)], output)
    shutil.rmtree(parts)
    return rows


def _cores_of_this_process() -> int:
    """Each process of an ``accelerate launch`` on this machine its share of the cores."""
    return max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _distributed_state():
    """accelerate's PartialState under ``accelerate launch``; None for one plain process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    try:
        from accelerate import PartialState
    except ImportError:
        raise CatdogError(f"several processes {TRAIN_EXTRA}") from None
    return PartialState(cpu=True)


def _in_words(counts: Counter) -> str:
    return ", ".join(f"{count} {verdict}" for verdict, count in counts.most_common())


def _check_push(repo_id: str) -> None:
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise HFValidationError("it has the form user/name")
    except HFValidationError as error:
        raise CatdogError(f"--push-to-hub {repo_id!r} is not a dataset id ({str(error).splitlines()[0]})") from None
    if not get_token():
        raise CatdogError("--push-to-hub needs a token: run `hf auth login` or set $HF_TOKEN")
    if not importlib.util.find_spec("datasets"):
        raise CatdogError(f"--push-to-hub {TRAIN_EXTRA}")


def _card_text(model: str, counts: Counter) -> str:
    return f"# Verdicts by catdog-predict\n\nOne row per picture, classified by `{model}`: {_in_words(counts)}.\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", metavar="PATH", help="folders (recursive), picture files or globs")
    parser.add_argument("--dataset", help="a Hub dataset id or a local dataset folder, instead of PATHs")
    parser.add_argument("--split", default="train", help="the dataset's split (default: train)")
    parser.add_argument("--image-column", help="the dataset's image column (default: its one Image column)")
    parser.add_argument("--output", required=True, help=f"the rows: {', '.join(FORMATS)}, by extension")
    parser.add_argument("--model", help=f"a folder or Hub id (default, as the Space's: {MODEL_ORDER})")
    parser.add_argument("--push-to-hub", metavar="USER/DATASET", help="upload the rows as a Hub dataset (needs [train])")
    args = parse_command(parser, argv)
    try:
        counts = _run(args)
    except (CatdogError, OSError) as error:
        exit_with_error(error)
    except KeyboardInterrupt:
        exit_with_error(f"interrupted: the rows classified so far are kept in {args.output}.parts; run the same "
                        "command again to carry on", status=130)
    if counts is not None:
        logger.info("classified %d pictures: %s", sum(counts.values()), _in_words(counts))


def _run(args) -> Optional[Counter]:
    output = Path(args.output)
    if output.suffix not in FORMATS:
        raise CatdogError(f"--output {output} must end in {', '.join(FORMATS)}")
    if not output.parent.is_dir():
        raise CatdogError(f"--output {output}: no folder {output.parent}")
    if output.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401  (datasets brings it)
        except ImportError:
            raise CatdogError(f"Parquet output {TRAIN_EXTRA}, or write .csv or .jsonl") from None
    if output.exists() and not output.with_name(output.name + ".parts").exists():
        raise CatdogError(f"{output} is already complete: pick another --output, or delete it to classify again")
    if bool(args.inputs) == bool(args.dataset):
        raise CatdogError("pass either PATHs or --dataset")
    if args.push_to_hub is not None:  # before hours of work, not after
        _check_push(args.push_to_hub)
    split = None
    if args.dataset:  # checked before the model loads
        split, column = open_split(args.dataset, args.split, args.image_column)
        local = Path(args.dataset).exists()
        source = {"dataset": os.path.abspath(args.dataset) if local else args.dataset, "split": args.split,
                  "image column": column, "dataset content": split._fingerprint}
        total, pictures = len(split), dataset_rows(split, column)
    else:
        listing = list(_files(args.inputs))  # names and paths only: nothing is decoded
        if not listing:
            raise CatdogError(f"no picture in {' '.join(args.inputs)} (looked for {', '.join(sorted(EXTENSIONS))})")
        source = {"paths": [os.path.abspath(given) for given in args.inputs],
                  "pictures": f"{len(listing)}, sha256 of their names, sizes and times {_listing_digest(listing)}"}
        total, pictures = len(listing), iter(listing)
    model, why = resolve_model(args.model)
    logger.info("classifying with %s (%s)", model, why)
    predictor = load_predictor(model, threads=_cores_of_this_process())
    if split is not None:
        check_room(split, row_columns(predictor.labels)[1:])
    rows = predict_files(predictor, pictures, output, _identity(predictor, source), total, split=split)
    if not rows:  # another process of an accelerate launch (the main one's are never empty): the main one reports
        return None
    counts = Counter(row["verdict"] for row in rows)
    if args.push_to_hub:
        from datasets import Dataset

        labelled = Dataset.from_list(rows) if split is None else beside_the_split(rows, split)
        push_split(labelled, args.push_to_hub, args.split, _card_text(model, counts))
    return counts


if __name__ == "__main__":
    main()
