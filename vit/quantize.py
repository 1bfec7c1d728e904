"""int8 inference on the CPU, and a measure of how much it changes the predictions.

- `dynamic_int8(model)`: torch.ao's dynamic quantization, what `vit predict --int8` runs. Every
  nn.Linear gets int8 weights (one scale per output channel), and its input is quantized per batch at
  run time, so no calibration data is needed. The attention's query, key and value, which the model runs
  as one fused matmul, become one int8 (3D, D) Linear. The patch embedding (a convolution), the
  attention's own matmuls, LayerNorm and GELU stay float32.
- `onnx_int8(src, dst)`: onnxruntime's dynamic quantization of an exported graph's matmul weights,
  what `vit export --quantize int8` writes. Static quantization (activations with scales calibrated
  on a folder) is not offered: ViT activations after LayerNorm and GELU have outliers that a fixed
  scale clips, the reported cause of accuracy drops after ViT export and quantization (timm#2463),
  and dynamic quantization needs no data to be right.
- `Agreement`: how often the int8 model's top-1 class is the float32 model's, which both print.

Users report accuracy drops after ViT quantization, so neither path assumes it is harmless: each
counts its top-1 agreement with float32 on the images it is given, and warns below AGREEMENT_TARGET.
"""

import copy
import os
import warnings

import torch
import torch.nn as nn

from vit.model import ViTForImageClassification, ViTSelfAttention

AGREEMENT_TARGET = 0.99  # below this top-1 agreement with float32, int8 warns


class _FusedQKVAttention(ViTSelfAttention):
    """ViTSelfAttention whose fused query/key/value matmul is a (3D, D) Linear module, which dynamic
    quantization then replaces (the float model builds that matmul from three Linear layers' weights)."""

    def project_qkv(self, hidden_states):
        return self.qkv(hidden_states)


def dynamic_int8(model: ViTForImageClassification) -> nn.Module:
    """An int8 copy of `model` for the CPU (torch.ao dynamic quantization of every Linear, per output
    channel); `model` itself is left as it is."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    fused = copy.deepcopy(model).cpu().eval()
    for attention in fused.modules():
        if isinstance(attention, ViTSelfAttention):
            weight, bias = attention.fused_qkv()
            qkv = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            with torch.no_grad():
                qkv.weight.copy_(weight)
                if bias is not None:
                    qkv.bias.copy_(bias)
            del attention.query, attention.key, attention.value
            attention.qkv = qkv
            attention.__class__ = _FusedQKVAttention
    with warnings.catch_warnings():  # torch.ao's quantized tensors are deprecated in favour of torchao; they still run
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*deprecated")
        return quantize_dynamic(fused, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def onnx_int8(src: str, dst: str) -> None:
    """onnxruntime's dynamic int8 quantization of the float32 graph `src` into `dst` (weights int8 per
    output channel, activations quantized at run time), after the shape inference and graph
    optimization onnxruntime asks for first (written beside `src` as <name>.pre.onnx)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = os.path.splitext(src)[0] + ".pre.onnx"
    quant_pre_process(src, pre, save_as_external_data=os.path.exists(src + ".data"))
    quantize_dynamic(pre, dst, weight_type=QuantType.QInt8, per_channel=True)


class Agreement:
    """Top-1 agreement of a quantized model with float32, counted over batches of logits."""

    def __init__(self, what: str):
        self.what, self.same, self.total = what, 0, 0

    def add(self, reference: torch.Tensor, quantized: torch.Tensor) -> None:
        """Count one batch: float32 logits and the quantized model's, both (B, K)."""
        self.same += int((reference.argmax(-1) == quantized.argmax(-1)).sum())
        self.total += len(reference)

    @property
    def rate(self) -> float:
        return self.same / max(self.total, 1)

    def line(self) -> str:
        """`int8 (...) agrees with float32 on the top-1 class of 99 of 100 images (99.0%)`."""
        return (f"{self.what} agrees with float32 on the top-1 class of {self.same:,} of {self.total:,} "
                f"image(s) ({self.rate:.1%})")

    def warning(self) -> str:
        """A warning when agreement is below AGREEMENT_TARGET, else ""."""
        if self.total == 0 or self.rate >= AGREEMENT_TARGET:
            return ""
        return (f"warning: int8 changed the top-1 class of {self.total - self.same:,} of these {self.total:,} image(s), "
                f"below the {AGREEMENT_TARGET:.0%} this project aims for; use float32 (leave out the int8 option) "
                f"where that matters")
