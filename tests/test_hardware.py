"""hardware.py: precisions chosen from what the machine has."""

import pytest
import torch

from catdog_model.hardware import native_bf16
from catdog_model.training.loop import default_mixed_precision

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
                                                  ("no", ("bf16", "default")), (None, ("bf16", "default"))])
def test_accelerate_config_wins_unless_it_says_no(configured, expected):
    # `accelerate launch` passes "no" when nothing was configured, so "no" cannot mean a choice.
    precision, reason = default_mixed_precision(torch.device("cpu"), configured, AVX512_BF16)
    assert (precision, reason.split(":")[0]) == expected
