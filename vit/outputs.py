"""What the models return: their output dataclasses (transformers' names), registered with torch.export,
and for forward_intermediates which blocks it returns (`take_indices`) and in what shape (`feature_maps`).

Plumbing kept out of vit/model.py, as transformers keeps its outputs in modeling_outputs.py and timm
its index rule in _features.py, so that the model file reads as modules only.
"""

from dataclasses import dataclass, fields
from typing import Optional, Sequence, Union

import torch

from vit.errors import UserError

Indices = Union[int, Sequence[int], None]  # forward_intermediates' blocks: all, the last n, or these


@dataclass
class ViTModelOutput:
    """The backbone's outputs, named as in transformers' BaseModelOutputWithPooling."""

    last_hidden_state: torch.Tensor  # (B, prefix+N, D), after the final layernorm (none with fc_norm)
    pooler_output: Optional[torch.Tensor] = None  # (B, D), None without a pooler
    hidden_states: Optional[tuple] = None  # embeddings, then each layer's output (before layernorm)
    attentions: Optional[tuple] = None  # each layer's softmax probabilities, (B, heads, prefix+N, prefix+N)

    def to_tuple(self) -> tuple:
        """The fields that are not None, in order: transformers' ModelOutput.to_tuple()."""
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)


@dataclass
class ImageClassifierOutput:
    """The classifier's outputs, named as in transformers' ImageClassifierOutput."""

    logits: torch.Tensor  # (B, num_labels)
    loss: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None

    to_tuple = ViTModelOutput.to_tuple


# torch.export and torch.compile see through the outputs to their tensors (transformers registers its
# ModelOutput the same way). torch.jit.trace takes only tensors and tuples: while tracing, the models
# return to_tuple() instead (what transformers returns with torchscript=True). The names are the ones
# they were first registered under, in vit/model.py, so that exported programs saved then still load.
for _output in (ViTModelOutput, ImageClassifierOutput):
    torch.export.register_dataclass(_output, serialized_type_name=f"vit.model.{_output.__name__}")


def take_indices(depth: int, indices: Indices) -> tuple[list[int], int]:
    """timm's feature_take_indices: None -> every block, an int n -> the last n, a list -> those
    (negative from the end). Returns the absolute indices, in the order given, and the largest."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise UserError(f"indices={indices} asks for the last {indices} blocks but the model has {depth}; pass 1 to {depth}.")
        take = list(range(depth - indices, depth))
    else:
        take = [depth + i if i < 0 else i for i in indices]
        bad = [i for i, t in zip(indices, take) if not 0 <= t < depth]
        if bad or not take:
            raise UserError(f"indices={list(indices)} must name blocks 0 to {depth - 1} (or -{depth} to -1); the model has {depth}.")
    return take, max(take)


def feature_maps(intermediates: list, num_prefix: int, grid: tuple[int, int], output_fmt: str, return_prefix_tokens: bool) -> list:
    """Block outputs (B, prefix+N, D) without their `num_prefix` prefix tokens, as (B, D, h, w) maps on
    the `grid` (h, w) ("NCHW") or as (B, N, D) ("NLC"); with return_prefix_tokens, each paired with its
    (B, num_prefix, D) prefix tokens (as timm: a model without prefix tokens returns the maps alone)."""
    prefix = [y[:, :num_prefix] for y in intermediates]  # (B, n, D) each
    maps = [y[:, num_prefix:] for y in intermediates]  # (B, N, D) each
    if output_fmt == "NCHW":
        maps = [y.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous() for y in maps]  # (B, D, h, w)
    return list(zip(maps, prefix)) if return_prefix_tokens and num_prefix else maps
