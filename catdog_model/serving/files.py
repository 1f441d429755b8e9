"""Where a model's files come from, a folder or huggingface_hub's cache, each checked against the manifest in
config.json."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

from huggingface_hub import constants, get_session, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id

from ..config import DEFAULTS, INT8_IR_FILES, IR_FILES, MANIFEST_KEY, SPACE_FILES, WEIGHTS, check_config
from ..errors import CatdogError

__all__ = ["DEFAULT_MODEL", "HUB_UNREACHABLE", "LOCAL_MODEL", "MODEL_ORDER", "ModelFiles", "ModelLoadError",
           "check_writable", "file_sha256", "first_line", "hub_reachable", "looks_like_a_path", "manifest_of",
           "no_such_folder", "parse_source", "resolve_model", "unreachable_hub_message",
           "write_atomically"]

logger = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"  # where an unfinished training run keeps its state (training/checkpoints.py)
# The published model, pinned to the release the Space serves: named here and in README.md's front matter only.
DEFAULT_MODEL = "catdog-project/catdog-resnet50@v1"
LOCAL_MODEL = "catdog-model"  # train_accelerate.py's default --output-dir, relative to where a command starts
# Where the Space and catdog-predict find their model when no --model names one (resolve_model), in words.
MODEL_ORDER = f"$CATDOG_MODEL, else ./{LOCAL_MODEL} if a training run finished there, else the published {DEFAULT_MODEL}"
REEXPORT = "python -m catdog_model.training.export"
TEMPORARY_PREFIX = ".tmp-catdog-"  # what an interrupted ``write_atomically`` leaves behind


HUB_UNREACHABLE = ("the Hugging Face Hub cannot be reached from here ({endpoint}): connect, use a local folder, or set "
                   "HF_HUB_OFFLINE=1 to use only what the local cache holds")


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers, asked once per process (offline, huggingface_hub would retry each file for 20 s)."""
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)  # any answer will do
    except Exception as error:  # httpx's or requests' connection errors, by version
        logger.info("the Hub at %s does not answer (%s)", constants.ENDPOINT, first_line(error))
        return False
    return True


def unreachable_hub_message(*needs: Optional[str]) -> Optional[str]:
    """The one line for flags (``needs``, None where unused) that need a Hub that does not answer; else None."""
    needs = [need for need in needs if need]
    if not needs or constants.HF_HUB_OFFLINE or hub_reachable():
        return None
    verb = "needs" if len(needs) == 1 else "need"
    return f"{' and '.join(needs)} {verb} the Hub, but " + HUB_UNREACHABLE.format(endpoint=constants.ENDPOINT) + "."


def looks_like_a_path(name: str) -> bool:
    """Whether a name can only be a local path: ./x, /x, ~/x, x\\y or a/b/c."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def no_such_folder(flag: str, name: str) -> Optional[str]:
    """The one line for a local folder that is not there; None otherwise."""
    if looks_like_a_path(name) and not Path(name).expanduser().exists():
        return f"{flag} {name}: no such folder"
    return None


class ModelLoadError(CatdogError):
    """The model could not be loaded; the message says what is missing and how to fix it."""


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def check_writable(folder: Path, flag: str = "--output-dir") -> None:
    """``folder`` made if need be and writable, or a ``CatdogError`` naming ``flag``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise CatdogError(f"{flag} {folder} is not a writable folder ({error.strerror or type(error).__name__})") from None


def write_atomically(folder: Path, write: Callable[[Path], None]) -> list[str]:
    """``write(temporary_folder)``, then each file renamed into ``folder``, config.json last: a kill never leaves a
    half-written file. Returns the names."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=TEMPORARY_PREFIX) as temp:
        write(Path(temp))
        names = sorted(os.listdir(temp), key=lambda name: name == "config.json")
        for name in names:
            os.chmod(Path(temp) / name, 0o644)
            os.replace(Path(temp) / name, Path(folder) / name)
    return names


def manifest_of(folder: Path, names, config: Optional[dict] = None) -> dict:
    """Each file's size and sha256; with ``config``, the values in it that change answers, since config.json cannot
    hash itself."""
    files = {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in names}
    return {"files": files} if config is None else {"files": files, "config": {key: config[key] for key in DEFAULTS}}


def parse_source(source: str) -> tuple[str, Optional[str]]:
    """"user/repo@revision" as ("user/repo", "revision"), or a local folder as (folder, None); else ``ModelLoadError``.
    """
    source = str(source).strip()
    if not source:
        raise ModelLoadError("No model given: pass a folder written by train_accelerate.py or a Hub id like user/repo.")
    path = Path(source).expanduser()
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except OSError as error:  # a name too long for the file system, say
        raise ModelLoadError(f"{source[:80]}…: neither a folder nor a Hub id ({error.strerror or first_line(error)}).") from None
    if is_dir:
        return str(path), None
    if exists:
        raise ModelLoadError(f"{source} is a file; pass the folder that holds config.json and model.safetensors.")
    repo_id, _, revision = source.partition("@")
    if Path(repo_id).expanduser().is_dir():
        raise ModelLoadError(f"{source}: a local folder has no revisions; drop '@{revision}' or pass a Hub id.")
    # Our models always live under a user or organisation, so "name", "./name" or "a/b/c" mean a folder.
    if looks_like_a_path(repo_id) or repo_id.count("/") != 1:
        raise ModelLoadError(f"No such model folder: {source} (a Hub id has the form user/repo).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelLoadError(f"{source!r} is neither a folder nor a valid Hub id (user/repo, optionally @revision).") from None
    if "@" in source and not revision:
        raise ModelLoadError(f"{source!r} ends with '@' but names no revision.")
    return repo_id, revision or None


def resolve_model(given: Optional[str]) -> tuple[str, str]:
    """The model to serve and why: ``given`` (--model), else MODEL_ORDER."""
    if given is not None:
        if not given.strip():
            raise ModelLoadError("--model is empty: pass a model folder or a Hub id like user/repo.")
        return given, "--model"
    if os.environ.get("CATDOG_MODEL", "").strip():
        return os.environ["CATDOG_MODEL"], "$CATDOG_MODEL"
    if (Path(LOCAL_MODEL) / "config.json").is_file():
        return LOCAL_MODEL, f"no --model or $CATDOG_MODEL, and ./{LOCAL_MODEL} (the training script's output) exists"
    return DEFAULT_MODEL, f"no --model, $CATDOG_MODEL or ./{LOCAL_MODEL}: the published model"


def first_line(error: BaseException) -> str:
    """An exception's first non-empty line, or its type's name."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


class ModelFiles:
    """The files of one model, from a folder or the Hub, each checked against config.json's manifest before use."""

    def __init__(self, source: str, repo_id: str, revision: Optional[str]) -> None:
        self.source, self.repo_id, self.revision = source, repo_id, revision
        self.local = Path(repo_id).is_dir()
        self.where = repo_id if self.local else f"{source!r} on the Hub"
        self.manifest: dict = {}
        self._folder: Optional[Path] = Path(repo_id) if self.local else None
        self._commit: Optional[str] = None

    def _download(self, names) -> Optional[Path]:
        """These files, in one snapshot pinned to the commit of the first one: None where the Hub does not answer and
        the cache has none."""
        try:  # the cache alone where the Hub does not answer: a clear line in seconds, not retries
            folder = Path(snapshot_download(self.repo_id, revision=self._commit or self.revision, allow_patterns=list(names),
                                            local_files_only=not hub_reachable()))
        except LocalEntryNotFoundError:
            return None
        except HfHubHTTPError as error:
            raise ModelLoadError(f"The Hub refused {self.source!r}: {first_line(error)}") from None
        except (HTTPError, OSError) as error:  # the connection itself failed, mid-download say
            raise ModelLoadError(f"Could not download {self.source!r}: {first_line(error)}") from None
        self._commit = folder.name  # huggingface_hub names a snapshot's folder by its commit
        return folder

    def path(self, name: str, required: bool = True) -> Optional[Path]:
        """The file's local path, checked; None for a missing file that is not ``required``. From the Hub, an engine
        comes down only when asked for."""
        if self._folder is None:
            self._folder = self._download([file for file in SPACE_FILES if file not in (*IR_FILES, *INT8_IR_FILES)])
        engine = next((pair for pair in (IR_FILES, INT8_IR_FILES) if name in pair), None)
        if engine and self._folder and not self.local and not (self._folder / name).is_file():
            self._download(engine)  # engines come when asked for; what else the first snapshot lacks, the commit lacks
        path = self._folder / name if self._folder else None
        if path is None or not path.is_file():
            if not required:
                return None
            if self.local:
                raise ModelLoadError(f"{self.repo_id}: {name} is missing. Retrain the model, or re-export its engine "
                                     f"with `{REEXPORT} {self.repo_id}` (needs catdog-classifier[train]).")
            if not hub_reachable() and not constants.HF_HUB_OFFLINE:
                raise ModelLoadError(f"Could not load {self.source!r}: it is not in the local cache, and "
                                     + HUB_UNREACHABLE.format(endpoint=constants.ENDPOINT) + ".")
            raise ModelLoadError(f"Could not download {self.source!r} from the Hugging Face Hub "
                                 f"(offline, no access, or {name} is missing).")
        if name != "config.json":
            self.check(name, path)
        return path

    def check(self, name: str, path: Path) -> None:
        """``ModelLoadError`` unless ``path`` is the file the manifest lists as ``name`` (size, then sha256)."""
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise ModelLoadError(f"{self.where}: {name} is not one of the files its training run wrote "
                                 "(not in the manifest of config.json).")
        try:
            same = path.stat().st_size == entry["size"] and file_sha256(path) == entry["sha256"]
        except OSError as error:
            raise ModelLoadError(f"{self.where}: cannot read {name} ({error.strerror or first_line(error)}).") from None
        if not same:
            raise ModelLoadError(f"{self.where}: {name} is not the file its training run wrote (its size or sha256 "
                                 "differs from the manifest in config.json): it was replaced, mixed in from another "
                                 "run, or damaged.")

    def config(self) -> dict:
        """config.json checked (config.py) against the values its manifest vouches for."""
        if self.local and not (Path(self.repo_id) / "config.json").is_file():
            self._not_a_model()
        try:
            config = json.loads(self.path("config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ModelLoadError(f"The config.json of {self.where} is not valid JSON ({first_line(error)}).") from None
        except OSError as error:
            raise ModelLoadError(f"{self.where}: cannot read config.json ({error.strerror or first_line(error)}).") from None
        if not isinstance(config, dict):
            raise ModelLoadError(f"The config.json of {self.where} is a JSON {type(config).__name__}, not an object.")
        try:
            checked = check_config(config)
        except (ValueError, TypeError) as error:
            self.invalid(error)
        self.manifest = _checked_manifest(config.get(MANIFEST_KEY))
        if not self.manifest or checked["ood_threshold"] is None:
            raise ModelLoadError(f"{self.where}: config.json has no complete manifest and calibration, so it is not a "
                                 "finished model of train_accelerate.py. Retrain it with this version.")
        vouched = self.manifest["config"]
        changed = [f"{key} is {checked[key]!r}, its run wrote {vouched[key]!r}"
                   for key in DEFAULTS if checked[key] != vouched[key]]
        if changed:
            raise ModelLoadError(f"{self.where}: config.json was edited after its training run ({'; '.join(changed)}); "
                                 "every answer depends on these values: put them back, or retrain (the \"neither\" "
                                 f"threshold is set with `{REEXPORT} FOLDER --ood-threshold SCORE`).")
        return checked

    def _not_a_model(self) -> None:
        folder = Path(self.repo_id)
        if (folder / CHECKPOINTS).is_dir():
            raise ModelLoadError(f"{folder} holds a training run that has not finished: continue it with "
                                 f"`python train_accelerate.py --output-dir {folder} --resume-from-checkpoint latest` "
                                 "and the flags it was started with.")
        raise ModelLoadError(f"{folder} has no config.json: it is not a folder written by train_accelerate.py.")

    def invalid(self, error: Exception) -> None:
        raise ModelLoadError(f"The files of {self.where} do not form a valid model: {first_line(error)}") from None


def _checked_manifest(manifest) -> dict:
    """The manifest if every entry is well formed and it holds the model's values; else {}."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or WEIGHTS not in files:
        return {}
    for entry in files.values():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
            return {}
    values = manifest.get("config")
    try:
        checked = check_config(values) if isinstance(values, dict) and set(DEFAULTS) <= set(values) else None
    except (ValueError, TypeError):
        checked = None
    return {"files": files, "config": checked} if checked else {}
