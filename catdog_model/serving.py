"""The fast CPU serving path, which ``load_predictor`` takes unless ``exact=True``.

Two changes to the eager fp32 model, both chosen by what the CPU has:

- **The backbone** runs in bfloat16 with channels-last memory where the CPU computes bf16 natively
  (AVX-512 BF16 or AMX; oneDNN picks the kernels), and in float32 elsewhere.
- **The head's big Linear** (the flattened 2048×7×7 map to 1024 units: 82% of the weights at 224 px)
  keeps its weights in int8, one scale per output unit, and runs torch's weight-only int8 matmul on
  bfloat16 activations. Streaming 103 MB instead of 411 MB per request is most of its cost.

The training script also writes those weights as ``model.serving.safetensors`` (bf16 backbone, int8 big
Linear, the rest in fp32: 0.3× the fp32 file), so that a Space downloads and reads only that file and
config.json. Parity with the exact path is tested on real photos (tests/test_serving.py) and measured by
``benchmarks/predict_speed.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.fx
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .hardware import native_bf16
from .model import CatDogClassifier

__all__ = ["SERVING_FILE", "Int8Linear", "fold_batch_norms", "load_serving_file", "make_fast", "save_serving_file"]

logger = logging.getLogger(__name__)

SERVING_FILE = "model.serving.safetensors"
_FORMAT = "catdog-serving-1"


class Int8Linear(nn.Module):
    """``x @ W.T + b`` with W in int8 and one float scale per output unit (symmetric, per row)."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        # A fresh copy: tensors read from a safetensors file may sit at any byte offset, and the int8
        # matmul kernel's aligned vector loads crash on weights that are not 64-byte aligned.
        self.register_buffer("weight_int8", weight_int8.clone(memory_format=torch.contiguous_format))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.register_buffer("bias", bias.float())
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)
        weight_int8 = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(weight_int8, scales, linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight_int8, self.scales).float() + self.bias

    def pooled_weight(self, channels: int) -> torch.Tensor:
        """The weights summed over each channel's map positions (see ``CatDogClassifier.pooled_head_weight``),
        from the int8 values: summed as integers, then scaled, so that no float copy of W is ever made."""
        summed = self.weight_int8.view(self.out_features, channels, -1).sum(dim=-1, dtype=torch.int32)
        return summed.float() * self.scales.float()[:, None]


def fold_batch_norms(backbone: nn.Module) -> int:
    """Fold each eval-mode BatchNorm2d that only normalises one Conv2d's output into that convolution.

    The pairs come from torch.fx's trace of the backbone, so only a true conv → batch-norm data flow is
    folded; the modules are swapped in place, so timm's own methods (forward_intermediates) still work.
    Returns how many were folded: 0 for a backbone that cannot be traced, which is then served as it is.
    """
    try:
        graph = torch.fx.symbolic_trace(backbone).graph
    except Exception as error:  # tracing runs arbitrary model code; an untraceable backbone is only slower
        logger.info("batch norms not folded: %s cannot be traced (%s)", type(backbone).__name__, type(error).__name__)
        return 0
    modules = dict(backbone.named_modules())
    calls = [node.target for node in graph.nodes if node.op == "call_module"]
    folded = 0
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if (isinstance(modules.get(node.target), nn.BatchNorm2d) and isinstance(source, torch.fx.Node)
                and source.op == "call_module" and isinstance(modules.get(source.target), nn.Conv2d)
                and len(source.users) == 1 and calls.count(source.target) == calls.count(node.target) == 1):
            conv = fuse_conv_bn_eval(modules[source.target], modules[node.target])
            for name, module in ((source.target, conv), (node.target, nn.Identity())):
                parent, _, child = name.rpartition(".")
                setattr(backbone.get_submodule(parent), child, module)
            folded += 1
    return folded


def make_fast(model: CatDogClassifier, bf16_backbone: bool | None = None) -> CatDogClassifier:
    """Turn an eval-mode fp32 model into the serving model, in place (see the module docstring)."""
    model.eval()
    fold_batch_norms(model.backbone)  # one pass over each activation fewer
    model._pooled_head_weight = None  # Grad-CAM then reads the int8 weights the model now computes with
    if not isinstance(model.head[1], Int8Linear):
        model.head[1] = Int8Linear.from_linear(model.head[1])
    bf16 = native_bf16() if bf16_backbone is None else bf16_backbone
    model.compute_dtype = torch.bfloat16 if bf16 else torch.float32
    model.backbone.to(model.compute_dtype, memory_format=torch.channels_last)
    return model


def save_serving_file(model: CatDogClassifier, path: str | Path) -> None:
    """The serving weights of an fp32 model: bf16 backbone, int8 big Linear, the rest in fp32."""
    big = Int8Linear.from_linear(model.head[1]) if isinstance(model.head[1], nn.Linear) else model.head[1]
    tensors = {f"backbone.{name}": tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
               for name, tensor in model.backbone.state_dict().items()}
    tensors.update({"head.1.weight_int8": big.weight_int8, "head.1.scales": big.scales.float(), "head.1.bias": big.bias,
                    "head.4.weight": model.head[4].weight.detach(), "head.4.bias": model.head[4].bias.detach()})
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path), metadata={"format": _FORMAT})


def load_serving_file(config: dict, path: str | Path, bf16_backbone: bool | None = None) -> CatDogClassifier:
    """The serving model from config.json and model.serving.safetensors, without touching model.safetensors.

    Raises ValueError when the file does not fit the config.
    """
    tensors = load_file(str(path))
    with torch.device("meta"):  # no random init of 100 million weights that are replaced at once
        model = CatDogClassifier(**{**config, "pretrained": False})
    model.to_empty(device="cpu")
    model.reset_normalisation()
    expected = model.backbone.state_dict()
    backbone = {name[len("backbone."):]: tensor for name, tensor in tensors.items() if name.startswith("backbone.")}
    for name, tensor in expected.items():
        if name not in backbone or tuple(backbone[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{Path(path).name} does not fit config.json: backbone tensor {name!r}")
    model.backbone.load_state_dict({name: tensor.to(expected[name].dtype) for name, tensor in backbone.items()})
    hidden, flat = model.head[1].out_features, model.head[1].in_features
    if tuple(tensors["head.1.weight_int8"].shape) != (hidden, flat):
        raise ValueError(f"{Path(path).name} does not fit config.json: its head takes "
                         f"{tensors['head.1.weight_int8'].shape[1]} inputs, the config's {flat}")
    model.head[1] = Int8Linear(tensors["head.1.weight_int8"], tensors["head.1.scales"], tensors["head.1.bias"])
    model.head[4].load_state_dict({"weight": tensors["head.4.weight"], "bias": tensors["head.4.bias"]})
    return make_fast(model, bf16_backbone)
