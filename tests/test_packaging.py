"""The package installs with pip and loads a saved model from outside the checkout."""

import ast
import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import ROOT


def _requirements(lines) -> dict[str, str]:
    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            found[requirement.name.lower().replace("_", "-")] = str(requirement.specifier)
    return found


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_space_installs_the_package_serving_side_with_the_same_pins_and_no_torch():
    package = _requirements(PROJECT["dependencies"])
    space = _requirements((ROOT / "requirements.txt").read_text().splitlines())
    assert {name: space.get(name) for name in package} == package
    assert set(space) - set(package) == {"gradio"}  # the app's own dependency, not the library's
    train = _requirements(PROJECT["optional-dependencies"]["train"])
    assert {"torch", "timm", "accelerate", "datasets"} <= set(train) and not set(train) & set(space)


def test_requires_python_is_what_the_code_needs_and_no_dependency_is_capped_without_cause():
    """vermin reads every file that ships and names the oldest Python that runs it (hashlib.file_digest: 3.11)."""
    floor = tuple(int(part) for part in PROJECT["requires-python"].removeprefix(">=").split("."))
    shipped = [str(ROOT / name) for name in ("catdog_model", "app.py", "train_accelerate.py")]
    result = subprocess.run([str(Path(sys.executable).with_name("vermin")), "--no-tips", "--no-parse-comments",
                             "--exclude", "long", *shipped],  # "long": torch's Tensor.long(), not Python 2's type
                            capture_output=True, text=True, timeout=120)
    needed = result.stdout.split("Minimum required versions:")[1].split()[0]
    assert tuple(int(part) for part in needed.split(".")) <= floor, (needed, floor)
    train = _requirements(PROJECT["optional-dependencies"]["train"])
    assert "<" not in train["torch"] and "<" not in train["torchvision"]


@pytest.mark.slow
def test_pip_install_then_load_a_saved_model_from_another_folder(trained_model, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Tests run offline: the dependencies (and setuptools) come from this environment through a .pth file;
    # the package itself is built and installed for real, by this environment's pip into the new one.
    here = next(p for p in sys.path if p.endswith("site-packages"))
    (Path(site) / "test-dependencies.pth").write_text(here + "\n")
    source = tmp_path / "source"  # what `pip install git+...` sees, built away from the checkout (which stays clean)
    shutil.copytree(ROOT / "catdog_model", source / "catdog_model", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    install = subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet", str(source)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120)
    assert "catdog-classifier" not in check.stdout, check.stdout  # its own requirements are all met

    code = ("import sys, catdog_model\nfrom PIL import Image\n"
            "print(catdog_model.__file__)\n"
            "print(catdog_model.load_predictor(sys.argv[1]).predict([Image.new('RGB', (40, 30), 'orange')]))\n")
    result = subprocess.run([str(python), "-c", code, str(trained_model)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    location = next(line for line in result.stdout.splitlines() if line.endswith("__init__.py"))
    prediction = result.stdout.splitlines()[-1]
    assert location.startswith(site) and not location.startswith(str(ROOT))
    assert "'cat':" in prediction and "'dog':" in prediction


SERVING = ("__init__.py", "cli.py", "config.py", "errors.py", "images.py", "hardware.py", "serving/*.py")  # and app.py: no torch
TRAINING = ("model.py", "training/*.py")
COMMANDS = ("predict.py", "predict_dataset.py")  # serving at import; --dataset and several processes import the extra when asked


def _imported(paths, top_level_only: bool = False) -> set[str]:
    distributions, imported = importlib.metadata.packages_distributions(), set()
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in tree.body if top_level_only else ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name not in ("catdog_model", "app")}
    return {distributions[name][0].lower().replace("_", "-") for name in third_party}


def test_serving_imports_only_the_base_dependencies_and_training_its_extra():
    base, train = set(_requirements(PROJECT["dependencies"])), set(_requirements(PROJECT["optional-dependencies"]["train"]))
    serving = [path for pattern in SERVING for path in (ROOT / "catdog_model").glob(pattern)]
    training = [path for pattern in TRAINING for path in (ROOT / "catdog_model").glob(pattern)]
    commands = [ROOT / "catdog_model" / name for name in COMMANDS]
    assert len(serving) + len(training) + len(commands) == len(list((ROOT / "catdog_model").rglob("*.py")))
    assert _imported(commands, top_level_only=True) <= base and _imported(commands) <= base | train
    assert _imported(serving) <= base, f"serving imports what the Space does not install: {_imported(serving) - base}"
    assert _imported([ROOT / "app.py"]) <= base | {"gradio"}
    assert _imported(training) <= base | train, f"imported but not in pyproject.toml: {_imported(training) - base - train}"


def test_the_documents_list_every_test_file_and_only_real_ones():
    """tests/README.md says what each test file checks: none missing, none that is gone."""
    import re

    listed = set(re.findall(r"`tests/(test_\w+\.py)`", (ROOT / "tests" / "README.md").read_text()))
    assert listed == {path.name for path in (ROOT / "tests").glob("test_*.py")}
    modules = set(re.findall(r"`catdog_model/((?:serving/|training/)?\w+\.py)`", (ROOT / "catdog_model" / "README.md").read_text()))
    assert modules == {str(path.relative_to(ROOT / "catdog_model")) for path in (ROOT / "catdog_model").rglob("*.py")
                       if path.name != "__init__.py"}
    for document in ("README.md", "catdog_model/README.md", "benchmarks/README.md"):  # modules named there exist
        for module in re.findall(r"`((?:catdog_model|benchmarks|tests)/[\w/]+\.py)`", (ROOT / document).read_text()):
            assert (ROOT / module).is_file(), (document, module)
