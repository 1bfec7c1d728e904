"""A Vision Transformer written from scratch in plain PyTorch.

References:
1) "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2020), the model and its sizes.
2) Hugging Face transformers, models/vit/modeling_vit.py: our module names and nesting, so that
   `state_dict()` keys are exactly the keys of an HF checkpoint file.
3) timm, models/vision_transformer.py: the forward split (`forward_features` / `forward_head`)
   and the numerics (LayerNorm eps 1e-6 for timm and Google checkpoints).

The file reads top to bottom: the modules from the patch embedding up, then the two models. The
plumbing lives beside it: the config and the paper's presets in `vit/config.py`, the output classes in
`vit/outputs.py`, loading, saving and the generic layer init in `vit/pretrained.py` (checkpoint
formats in `vit/loading/`).
"""

import math
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vit.config import ViTConfig
from vit.errors import UserError
from vit.layers import ACT2FN, PatchDropout, drop_path
from vit.outputs import ImageClassifierOutput, Indices, ViTModelOutput, feature_maps, take_indices
from vit.pretrained import PreTrainedModel
from vit.resize import resample_pos_embed

# -----------------------------------------------------------------------------
# modules, from the pixels up


class PatchEmbeddings(nn.Module):
    """Image to patch tokens with one strided conv; timm's PatchEmbed."""

    def __init__(self, config):
        super().__init__()
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(  # CLIP's (pre_norm) has no bias: the LayerNorm after it would cancel it
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size,
            bias=not config.pre_norm,
        )

    def forward(self, pixel_values, interpolate_pos_encoding=False):
        B, C, H, W = pixel_values.shape
        if C != self.num_channels:
            raise UserError(f"the images have {C} channels but the model expects num_channels={self.num_channels}; "
                            f"convert the images or set num_channels={C}.")
        if not interpolate_pos_encoding and (H != self.image_size or W != self.image_size):
            raise UserError(f"input image size {H}x{W} doesn't match the model's image_size={self.image_size}; "
                            f"resize the images or pass interpolate_pos_encoding=True.")
        if H % self.patch_size or W % self.patch_size:
            raise UserError(f"input image size {H}x{W} is not divisible by patch_size={self.patch_size}; "
                            f"resize the images to a multiple of {self.patch_size}.")
        x = self.projection(pixel_values)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


def prefix_tokens(config, count):
    """`count` learned tokens, a (1, count, D) parameter; None for none, so no state-dict key."""
    return nn.Parameter(torch.zeros(1, count, config.hidden_size)) if count else None


class ViTEmbeddings(nn.Module):
    """Prefix tokens + patch tokens + learned position embeddings; the front of timm's VisionTransformer.

    The prefix is the class token (HF's cls_token), DeiT's distillation token (HF DeiT's
    distillation_token) and DINOv2's registers (HF Dinov2WithRegisters' register_tokens), each where
    its switch is on; config.num_prefix_tokens counts them. The position embeddings cover the prefix
    and the patches, or with no_embed_class (DeiT III, DINOv2 with registers) the patches only.
    """

    def __init__(self, config):
        super().__init__()
        self.cls_token = prefix_tokens(config, int(config.class_token))
        self.distillation_token = prefix_tokens(config, int(config.distilled))
        self.register_tokens = prefix_tokens(config, config.num_register_tokens)
        self.patch_embeddings = PatchEmbeddings(config)
        self.num_pos_prefix_tokens = config.num_pos_prefix_tokens  # prefix tokens with a position embedding
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, self.num_pos_prefix_tokens + config.num_patches, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, num_patches, height, width):
        """Position embeddings for a height x width input, resampled as transformers does it (no antialias)."""
        num_positions = self.position_embeddings.shape[1] - self.num_pos_prefix_tokens
        if num_patches == num_positions and height == width:
            return self.position_embeddings
        p = self.patch_embeddings.patch_size
        return resample_pos_embed(self.position_embeddings, (height // p, width // p), antialias=False,
                                  num_prefix_tokens=self.num_pos_prefix_tokens)

    def forward(self, pixel_values, interpolate_pos_encoding=False):
        B, _, H, W = pixel_values.shape
        x = self.patch_embeddings(pixel_values, interpolate_pos_encoding)  # (B, N, D)
        pos = self.interpolate_pos_encoding(x.shape[1], H, W) if interpolate_pos_encoding else self.position_embeddings
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.distillation_token, self.register_tokens) if t is not None]
        if self.num_pos_prefix_tokens:
            x = torch.cat(prefix + [x], dim=1) + pos  # (B, prefix+N, D)
        else:  # positions for the patches only: add them, then the prefix joins (timm's no_embed_class)
            x = torch.cat(prefix + [x + pos], dim=1)  # (B, prefix+N, D)
        return self.dropout(x)


class ViTSelfAttention(nn.Module):
    """Multi-head self-attention without the output projection; the first half of timm's Attention.

    The checkpoint keeps query, key and value as three Linear layers (HF's keys), but forward runs
    them as one fused matmul: one (D -> 3D) GEMM is faster than three (D -> D) ones.
    """

    def __init__(self, config):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.dropout_prob = config.attention_probs_dropout_prob

    def fused_qkv(self):
        """The (3D, D) weight and (3D,) bias that compute query, key and value in one matmul."""
        w = torch.cat((self.query.weight, self.key.weight, self.value.weight))
        b = None if self.query.bias is None else torch.cat((self.query.bias, self.key.bias, self.value.bias))
        return w, b

    def project_qkv(self, hidden_states):
        """(B, N, 3D): query, key and value in one matmul (vit/quantize.py's int8 copy runs one int8 Linear)."""
        return F.linear(hidden_states, *self.fused_qkv())

    def forward(self, hidden_states, output_attentions=False):
        B, N, D = hidden_states.shape
        qkv = self.project_qkv(hidden_states)  # (B, N, 3D)
        qkv = qkv.view(B, N, 3, self.num_attention_heads, self.attention_head_size).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        dropout_p = self.dropout_prob if self.training else 0.0
        # the explicit path when the probabilities are wanted, and for bf16 on a CPU: there SDPA's flash
        # kernel is 2.5-5x slower than the three ops below (forward + backward, (128, 3, 50, 32): 24 vs 4 ms)
        if output_attentions or (q.dtype == torch.bfloat16 and q.device.type == "cpu"):
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.attention_head_size)  # (B, heads, N, N)
            probs = scores.softmax(dim=-1)
            context = F.dropout(probs, dropout_p, self.training) @ v  # (B, heads, N, head_dim)
        else:
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        context = context.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return context, (probs if output_attentions else None)


class ViTSelfOutput(nn.Module):
    """Output projection of attention; timm's Attention.proj (the residual is added in ViTLayer)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states):
        return self.dropout(self.dense(hidden_states))


class ViTAttention(nn.Module):
    """Self-attention plus its output projection; timm's Attention."""

    def __init__(self, config):
        super().__init__()
        self.attention = ViTSelfAttention(config)
        self.output = ViTSelfOutput(config)

    def forward(self, hidden_states, output_attentions=False):
        context, probs = self.attention(hidden_states, output_attentions)
        return self.output(context), probs


class ViTIntermediate(nn.Module):
    """First MLP layer and activation; timm's Mlp.fc1 + act."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]()

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))  # (B, N, intermediate_size)


class ViTOutput(nn.Module):
    """Second MLP layer; timm's Mlp.fc2 (the residual is added in ViTLayer)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states):
        return self.dropout(self.dense(hidden_states))  # (B, N, D)


class LayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (CaiT; DeiT III, DINOv2); HF Dinov2's
    Dinov2LayerScale, timm's LayerScale (whose parameter is `gamma`)."""

    def __init__(self, config):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layer_scale_init)))

    def forward(self, hidden_states):
        return hidden_states * self.lambda1  # (B, N, D) * (D,)


def layer_scale(config):
    """LayerScale where config.layer_scale_init is set; else Identity, which has no state-dict key."""
    return LayerScale(config) if config.layer_scale_init is not None else nn.Identity()


class ViTLayer(nn.Module):
    """One pre-norm transformer block; timm's Block (layer_scale1/2: its ls1/ls2)."""

    def __init__(self, config, drop_path_rate=0.0):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ViTAttention(config)
        self.layer_scale1 = layer_scale(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = ViTIntermediate(config)
        self.output = ViTOutput(config)
        self.layer_scale2 = layer_scale(config)
        self.drop_path_rate = drop_path_rate

    def forward(self, hidden_states, output_attentions=False):
        attn, probs = self.attention(self.layernorm_before(hidden_states), output_attentions)
        hidden_states = hidden_states + drop_path(self.layer_scale1(attn), self.drop_path_rate, self.training)
        mlp = self.output(self.intermediate(self.layernorm_after(hidden_states)))
        hidden_states = hidden_states + drop_path(self.layer_scale2(mlp), self.drop_path_rate, self.training)
        return hidden_states, probs


class ViTEncoder(nn.Module):
    """The stack of blocks; timm's VisionTransformer.blocks."""

    def __init__(self, config):
        super().__init__()
        # plain python, not torch.linspace, so the model can be built on the meta device
        depth = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layer = nn.ModuleList(ViTLayer(config, r) for r in rates)
        self.gradient_checkpointing = False  # set through the model's gradient_checkpointing_enable()
        self._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def run_block(self, block, hidden_states, output_attentions=False):
        """One block, recomputed in the backward pass instead of keeping its activations when
        gradient checkpointing is on (the RNG state is replayed, so dropout and drop path agree)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, hidden_states, output_attentions)
        return block(hidden_states, output_attentions)

    def forward(self, hidden_states, output_attentions=False, output_hidden_states=False):
        all_hidden = [hidden_states] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        for block in self.layer:
            hidden_states, probs = self.run_block(block, hidden_states, output_attentions)
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if output_attentions:
                all_attn.append(probs)
        return hidden_states, all_hidden, all_attn


class ViTPooler(nn.Module):
    """Dense + tanh on the pooled token (the CLS token in HF's ViT); the 'pre_logits' layer of the first in21k release."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, pooled):
        return self.activation(self.dense(pooled))  # (B, D)


# -----------------------------------------------------------------------------
# the models


class ViTModel(PreTrainedModel):
    """The backbone with a final layernorm and an optional pooler; timm's VisionTransformer minus its head."""

    def __init__(self, config: ViTConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = ViTEmbeddings(config)
        # CLIP normalises the embeddings before the first block (timm's norm_pre)
        self.norm_pre = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_norm else nn.Identity()
        self.patch_drop = PatchDropout(config.num_prefix_tokens)  # off until training sets its prob (timm's patch_drop)
        self.encoder = ViTEncoder(config)
        # with fc_norm the final norm moves behind the pooling (timm's fc_norm): one or the other has weights
        self.layernorm = nn.Identity() if config.fc_norm else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.fc_norm else nn.Identity()
        self.pooler = ViTPooler(config) if add_pooling_layer else None
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """The learned position embeddings and prefix tokens: truncated normal (HF's and timm's); every
        other layer as vit/pretrained.py inits it (weight_init: HF's or the original JAX code's)."""
        if not isinstance(module, ViTEmbeddings):
            return super()._init_weights(module)
        nn.init.trunc_normal_(module.position_embeddings, std=self.config.initializer_range)
        for token in (module.cls_token, module.distillation_token, module.register_tokens):
            if token is not None:
                nn.init.trunc_normal_(token, std=self.config.initializer_range)

    def pool(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, D), what a head reads: the class token, or with global_pool='avg' the mean of the patch
        tokens (prefix tokens left out); then fc_norm where the model has one. timm's pool + fc_norm."""
        if self.config.global_pool == "avg":
            x = hidden_states[:, self.config.num_prefix_tokens:].mean(dim=1)
        else:
            x = hidden_states[:, 0]
        return self.fc_norm(x)

    def forward_features(self, pixel_values: torch.Tensor, output_attentions: bool = False, output_hidden_states: bool = False,
                         interpolate_pos_encoding: bool = False) -> ViTModelOutput:
        """The outputs as a ViTModelOutput, always (forward returns a tuple while torch.jit.trace runs)."""
        x = self.patch_drop(self.embeddings(pixel_values, interpolate_pos_encoding))  # (B, prefix+N, D)
        x, hidden, attn = self.encoder(self.norm_pre(x), output_attentions, output_hidden_states)
        x = self.layernorm(x)
        return ViTModelOutput(
            last_hidden_state=x,
            pooler_output=self.pooler(self.pool(x)) if self.pooler is not None else None,
            hidden_states=tuple(hidden) if hidden is not None else None,
            attentions=tuple(attn) if attn is not None else None,
        )

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False, output_hidden_states: bool = False,
                interpolate_pos_encoding: bool = False) -> ViTModelOutput:
        out = self.forward_features(pixel_values, output_attentions, output_hidden_states, interpolate_pos_encoding)
        return out.to_tuple() if torch.jit.is_tracing() else out

    def forward_intermediates(self, pixel_values: torch.Tensor, indices: Indices = None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, interpolate_pos_encoding: bool = False):
        """timm's VisionTransformer.forward_intermediates: the outputs of the blocks `indices` names
        (None: all; an int n: the last n; a list: those, negative from the end), with the prefix
        tokens (class, distillation, registers) removed, as (B, D, H/p, W/p) maps ("NCHW") or (B, N, D) ("NLC").

        norm=True passes each through the final layernorm; return_prefix_tokens=True pairs each map
        with its (B, num_prefix_tokens, D) prefix tokens; stop_early=True runs no block past the last
        one asked for. Returns the list of maps, or (the final normed (B, prefix+N, D) tokens, the list)
        unless intermediates_only. timm's output_dict and attention masks are not offered.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise UserError(f"output_fmt={output_fmt!r} is not known; pass 'NCHW' (maps) or 'NLC' (token lists).")
        blocks = self.encoder.layer
        take, last = take_indices(len(blocks), indices)
        x = self.norm_pre(self.embeddings(pixel_values, interpolate_pos_encoding))  # (B, prefix+N, D)
        intermediates = []
        for i, block in enumerate(blocks[: last + 1] if stop_early else blocks):
            x, _ = self.encoder.run_block(block, x)
            if i in take:
                intermediates.append(self.layernorm(x) if norm else x)
        grid = (pixel_values.shape[2] // self.config.patch_size, pixel_values.shape[3] // self.config.patch_size)
        maps = feature_maps(intermediates, self.config.num_prefix_tokens, grid, output_fmt, return_prefix_tokens)
        return maps if intermediates_only else (self.layernorm(x), maps)

    def prune_intermediate_layers(self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """timm's: drop the blocks after the last one `indices` names (and the final layernorm when
        prune_norm, the pooler and fc_norm when prune_head), for a feature extractor. Returns the kept indices."""
        take, last = take_indices(len(self.encoder.layer), indices)
        self.encoder.layer = self.encoder.layer[: last + 1]
        self.config.num_hidden_layers = last + 1
        if prune_norm:
            self.layernorm = nn.Identity()
        if prune_head:
            self.pooler, self.fc_norm = None, nn.Identity()
        return take


class ViTForImageClassification(PreTrainedModel):
    """Backbone + linear head on the pooled token; timm's VisionTransformer. Distilled (DeiT), a second
    head on the distillation token, HF DeiT's distillation_classifier; the two heads' logits are averaged."""

    is_classifier = True

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        # a pooler only for the first in21k release, whose head sits on its pre_logits layer
        self.vit = ViTModel(config, add_pooling_layer=config.use_pre_logits)
        self.reset_classifier(config.num_labels, config.id2label)

    def reset_classifier(self, num_labels: int, id2label: Optional[dict] = None) -> None:
        """A fresh head: zero-initialised, as big_vision does for fine-tuning, so training starts at uniform.
        It lands on the backbone's device and dtype, so it can be called on a model already moved."""
        self.config.num_labels = num_labels
        self.config.id2label = id2label
        like = self.vit.embeddings.position_embeddings
        self.classifier = self._fresh_head(num_labels, like)
        self.distillation_classifier = self._fresh_head(num_labels, like) if self.config.distilled else None

    def _fresh_head(self, num_labels, like):
        head = nn.Linear(self.config.hidden_size, num_labels, device=like.device, dtype=like.dtype) if num_labels > 0 else nn.Identity()
        if isinstance(head, nn.Linear):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        return head

    def forward_features(self, pixel_values: torch.Tensor, output_attentions: bool = False, output_hidden_states: bool = False,
                         interpolate_pos_encoding: bool = False) -> ViTModelOutput:
        """The backbone's output object; `last_hidden_state` is (B, prefix+N, D) after the final layernorm."""
        return self.vit.forward_features(pixel_values, output_attentions, output_hidden_states, interpolate_pos_encoding)

    def forward_head(self, features: ViTModelOutput, pre_logits: bool = False) -> torch.Tensor:
        """Logits from the backbone's output; with pre_logits=True, the (B, D) vector the head sees."""
        x = features.pooler_output if self.vit.pooler is not None else self.vit.pool(features.last_hidden_state)
        if self.distillation_classifier is None:
            return x if pre_logits else self.classifier(x)
        # DeiT: the distillation token (after the class token) has its own head; inference averages the two
        dist = features.last_hidden_state[:, 1]  # (B, D)
        return (x + dist) / 2 if pre_logits else (self.classifier(x) + self.distillation_classifier(dist)) / 2

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None, output_attentions: bool = False,
                output_hidden_states: bool = False, interpolate_pos_encoding: bool = False) -> ImageClassifierOutput:
        features = self.forward_features(pixel_values, output_attentions, output_hidden_states, interpolate_pos_encoding)
        logits = self.forward_head(features)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        out = ImageClassifierOutput(logits=logits, loss=loss, hidden_states=features.hidden_states, attentions=features.attentions)
        return out.to_tuple() if torch.jit.is_tracing() else out

    def forward_intermediates(self, pixel_values: torch.Tensor, indices: Indices = None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, interpolate_pos_encoding: bool = False):
        """The backbone's block outputs as maps; see ViTModel.forward_intermediates (timm's)."""
        return self.vit.forward_intermediates(pixel_values, indices, return_prefix_tokens, norm, stop_early, output_fmt,
                                              intermediates_only, interpolate_pos_encoding)

    def prune_intermediate_layers(self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """timm's: keep the blocks up to the last one `indices` names; prune_head also drops the head
        (and the in21k pre_logits layer), so the model returns the (B, D) class-token features."""
        take = self.vit.prune_intermediate_layers(indices, prune_norm, prune_head)
        if prune_head:
            self.config.use_pre_logits = False
            self.reset_classifier(0)
        return take
