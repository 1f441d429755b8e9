"""hardware.py: precisions chosen from what the machine has."""

import pytest
import torch

from catdog_model.hardware import native_bf16
from catdog_model.training.run_state import default_mixed_precision

AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
AVX2_ONLY = frozenset({"avx2", "fma"})


@pytest.mark.parametrize("flags, expected", [({"avx512_bf16", "avx512f"}, True), ({"amx_bf16", "amx_tile"}, True),
                                             ({"avx2", "avx512f", "avx512_vnni"}, False), (set(), False)])
def test_bf16_is_chosen_by_cpu_flags(flags, expected):
    assert native_bf16(frozenset(flags)) is expected


@pytest.mark.parametrize("flags, expected", [(AVX512_BF16, "bf16"), (AVX2_ONLY, "no")])
def test_cpu_training_defaults_to_bf16_only_where_it_is_native(flags, expected):
    precision, reason = default_mixed_precision(torch.device("cpu"), None, flags)
    assert precision == expected and reason.startswith("default")


@pytest.mark.parametrize("configured, expected", [("fp16", ("fp16", "accelerate config")),
                                                  ("no", ("no", "accelerate config")), (None, ("bf16", "default"))])
def test_accelerate_config_wins_no_included(configured, expected):
    precision, reason = default_mixed_precision(torch.device("cpu"), configured, AVX512_BF16)
    assert (precision, reason.split(":")[0]) == expected


@pytest.mark.parametrize("passed, config_file, expected", [
    (None, "mixed_precision: bf16", None),  # plain python: accelerate launch passed nothing
    ("fp16", None, "fp16"), ("no", "mixed_precision: 'no'\nnum_processes: 1", "no"),
    ("no", "mixed_precision: bf16", "no"),  # the config file said bf16, so "no" came from launch's own flag
    ("no", None, None), ("no", "num_processes: 1", None),  # launch's "no" where nobody named a precision
    ("no", "{not: [yaml", None)])
def test_accelerate_launch_passes_no_by_itself_so_no_counts_only_where_the_config_names_a_precision(
        passed, config_file, expected, tmp_path, monkeypatch):
    from catdog_model.training.run_state import configured_mixed_precision

    path = tmp_path / "default_config.yaml"
    if config_file is not None:
        path.write_text(config_file)
    if passed is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", passed)
    assert configured_mixed_precision(path) == expected
