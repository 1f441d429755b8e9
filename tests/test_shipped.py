"""What ships, run as a user runs it: the README's Python snippet, as written, in a fresh process."""

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


def test_the_readmes_python_snippet_runs_as_written_and_exits_cleanly(trained_model, mini_dataset, tmp_path):
    snippet = _readme_python_snippet("Load it in Python")
    repo_id = re.search(r'load_predictor\("([^"]+)"\)', snippet).group(1)
    hub_snapshot(tmp_path / "hub", repo_id, trained_model)  # the published model, as a download leaves it
    load_dataset(str(mini_dataset), split="train")[1600]["image"].save(tmp_path / "pet.jpg")  # a dog
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(tmp_path / "car.jpg")
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
