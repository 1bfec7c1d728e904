"""What a ViT looks at: attention rollout maps and the numbers of the ViT paper's Figure 7.

References:
1) Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (2020): attention rollout.
2) Dosovitskiy et al., "An Image is Worth 16x16 Words" (2020), Figure 7: patch-embedding filters,
   position-embedding similarity and mean attention distance.

Plain torch on tensors and models: no file is read here (the `attention` and `inspect` commands in
vit/commands.py load the checkpoint and the images), and the drawing is in `vit/viz/plots.py`.
Attentions are the model's `output_attentions=True` probabilities: a list with one
(B, heads, 1+N, 1+N) tensor per layer, token 0 being CLS.
"""

import math

import torch
import torch.nn as nn

BATCH_SIZE = 16  # images per forward pass of dataset_attention_distance

# -----------------------------------------------------------------------------
# attention maps


def attention_rollout(attentions):
    """Abnar & Zuidema's rollout: (B, T, T), how much each token's output draws on each input token.

    Per layer: average the heads, add the identity for the residual path, renormalise the rows,
    then multiply through the layers in order, so rollout = A_L @ ... @ A_2 @ A_1.
    """
    rollout = None
    for attn in attentions:
        a = attn.float().mean(dim=1)  # (B, T, T)
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def _grid_shape(num_patches, grid_size):
    """(grid_h, grid_w): the given one, or the square that holds num_patches tokens."""
    if grid_size is not None:
        return tuple(grid_size)
    side = math.isqrt(num_patches)
    assert side * side == num_patches, f"{num_patches} patch tokens are not a square grid; pass grid_size"
    return side, side


def cls_rollout_map(attentions, grid_size=None, num_prefix_tokens=1):
    """The CLS row of the rollout over the patch tokens, as a (B, grid_h, grid_w) map; the patches
    follow the model's num_prefix_tokens (CLS first, then distillation / register tokens)."""
    rollout = attention_rollout(attentions)  # (B, T, T)
    cls_to_patches = rollout[:, 0, num_prefix_tokens:]  # (B, N)
    return cls_to_patches.reshape(-1, *_grid_shape(cls_to_patches.shape[1], grid_size))


def last_layer_cls_attention(attentions, grid_size=None, num_prefix_tokens=1):
    """The last layer's CLS attention to the patches, per head: (B, heads, grid_h, grid_w)."""
    cls_to_patches = attentions[-1][:, :, 0, num_prefix_tokens:].float()  # (B, heads, N)
    B, H, N = cls_to_patches.shape
    return cls_to_patches.reshape(B, H, *_grid_shape(N, grid_size))


def patch_distances(grid_size, patch_size):
    """(N, N) Euclidean distances in pixels between the centres of the patches of a grid."""
    gh, gw = grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    centres = torch.stack((rows.flatten(), cols.flatten()), dim=1).float() * patch_size  # (N, 2)
    return torch.cdist(centres, centres)


def mean_attention_distance(attentions, grid_size, patch_size, num_prefix_tokens=1):
    """The paper's mean attention distance in pixels, a (layers, heads) tensor.

    For each query patch: the distance to every key patch weighted by its attention, averaged
    over query patches and images. CLS (all num_prefix_tokens tokens) is left out on both sides; the
    remaining weights of each query are renormalised to sum to one, so attention paid to CLS doesn't
    count as distance 0.
    """
    dist = patch_distances(grid_size, patch_size)  # (N, N)
    out = []
    for attn in attentions:
        a = attn[:, :, num_prefix_tokens:, num_prefix_tokens:].float()  # (B, heads, N, N), patches only
        a = a / a.sum(dim=-1, keepdim=True)
        per_query = (a * dist.to(a.device)).sum(dim=-1)  # (B, heads, N)
        out.append(per_query.mean(dim=(0, 2)))  # (heads,)
    return torch.stack(out).cpu()


# -----------------------------------------------------------------------------
# Figure 7: weights only


def embedding_filter_components(weight, n=28):
    """The first n principal components of the patch-embedding filters, as (n, p, p, C) arrays.

    weight is the patch conv's (D, C, p, p): D filters, each a point in C*p*p dimensions. The
    components are the directions in which the filters vary most (the paper's Figure 7, left).
    """
    D, C, p, _ = weight.shape
    filters = weight.detach().float().cpu().reshape(D, C * p * p)
    filters = filters - filters.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(filters, full_matrices=False)  # rows of vh: components, by variance
    n = min(n, vh.shape[0])
    return vh[:n].reshape(n, C, p, p).permute(0, 2, 3, 1).numpy()


def position_similarity(position_embeddings, grid_size=None, num_prefix_tokens=1):
    """Cosine similarity between patch position embeddings: (gh, gw, gh, gw); [i, j] is the map of patch (i, j).
    num_prefix_tokens: the positions before the patches' (CLS's; 0 with no_embed_class)."""
    pos = position_embeddings.detach().float().cpu().reshape(-1, position_embeddings.shape[-1])[num_prefix_tokens:]  # (N, D)
    pos = torch.nn.functional.normalize(pos, dim=-1)
    gh, gw = _grid_shape(pos.shape[0], grid_size)
    return (pos @ pos.T).reshape(gh, gw, gh, gw).numpy()


# -----------------------------------------------------------------------------
# running the model


def attentions_and_logits(model, x):
    """One no-grad forward: (attentions, logits or None when the checkpoint has no head)."""
    with torch.no_grad():
        out = model(x, output_attentions=True)
    # a classifier saved with num_labels=0 (e.g. from a bare ViTModel) has an Identity head: no class
    has_head = isinstance(getattr(model, "classifier", None), nn.Linear)
    return out.attentions, out.logits if has_head else None


def dataset_attention_distance(model, images, device):
    """Mean attention distance (layers, heads) in pixels over images (n, C, H, W), in batches."""
    patch = model.config.patch_size
    grid = (images.shape[2] // patch, images.shape[3] // patch)
    total = 0.0
    for x in images.split(BATCH_SIZE):
        attentions, _ = attentions_and_logits(model, x.to(device))
        total = total + mean_attention_distance(attentions, grid, patch, model.config.num_prefix_tokens) * len(x)  # undo the batch mean
    return total / len(images)
