"""What ships, run as a user runs it: the README's Python snippets, as written, in fresh processes."""

import re
import subprocess
import sys

import numpy as np
from datasets import load_dataset
from PIL import Image

from conftest import ROOT, hub_snapshot


def _readme_python_snippet(section: str) -> str:
    text = (ROOT / "README.md").read_text()
    body = text[text.index(f"## {section}"):]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def _pictures(folder, mini_dataset) -> None:
    """The files the snippets name: a dog from the mini set, and noise for the car that is neither."""
    load_dataset(str(mini_dataset), split="train")[1600]["image"].save(folder / "pet.jpg")  # a dog
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    for name in ("car.jpg", "a.jpg", "b.png"):
        noise.save(folder / name)


def test_the_readmes_python_snippet_runs_as_written_and_exits_cleanly(trained_model, mini_dataset, tmp_path):
    snippet = _readme_python_snippet("Load it in Python")
    repo_id = re.search(r'load_predictor\("([^"]+)"\)', snippet).group(1)
    hub_snapshot(tmp_path / "hub", repo_id, trained_model)  # the published model, as a download leaves it
    _pictures(tmp_path, mini_dataset)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr
    engine, prediction, explanation = result.stdout.splitlines()
    assert engine.startswith("openvino-")
    assert re.fullmatch(r"\[\{'cat': [0-9.e-]+, 'dog': [0-9.e-]+\}\]", prediction), prediction
    verdict, score = explanation.rsplit(" ", 1)
    assert verdict in ("cat", "dog", "not sure", "neither") and float(score) > 0


def test_the_readmes_api_snippet_runs_as_written_against_the_running_app(app_url, mini_dataset, tmp_path):
    snippet = _readme_python_snippet("Try it")
    written_url = re.search(r'Client\("([^"]+)"\)', snippet).group(1)
    _pictures(tmp_path, mini_dataset)
    # The one change: the address of this test's app instead of the default port a user's `make demo` serves on.
    result = subprocess.run([sys.executable, "-c", snippet.replace(written_url, app_url)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "GRADIO_ANALYTICS_ENABLED": "False"})
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.strip().splitlines()[-1]  # after gradio_client's own "Loaded as API" line
    assert re.fullmatch(r"(cat|dog|not sure|neither) \[\{'label': '(cat|dog)', 'confidence': .*\}\]", printed), printed


def test_every_readme_section_a_message_names_exists():
    """A message or the Makefile that sends a user to `README.md, "Section"` finds that section."""
    headings = set(re.findall(r"^#+ (.+)$", (ROOT / "README.md").read_text(), re.M))
    shipped = [ROOT / "Makefile", ROOT / "app.py", ROOT / "train_accelerate.py", *(ROOT / "catdog_model").rglob("*.py")]
    named = {(path.name, section) for path in shipped
             for section in re.findall(r'README(?:\.md)?[,:] \\?"([^"\\]+)\\?"', path.read_text())}
    assert ("Makefile", "Set up in two commands") in named
    assert {(name, section) for name, section in named if section not in headings} == set()
