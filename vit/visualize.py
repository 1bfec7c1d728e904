"""What a ViT looks at: attention rollout maps and the ViT paper's Figure 7, from any checkpoint.

References:
1) Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (2020): attention rollout.
2) Dosovitskiy et al., "An Image is Worth 16x16 Words" (2020), Figure 7: patch-embedding filters,
   position-embedding similarity and mean attention distance.

The computations here are plain torch/numpy; the drawing is in `vit/plots.py`. The two commands
at the bottom (`attention_command`, `inspect_command`) are what `python main.py attention|inspect`
run. Attentions are the model's `output_attentions=True` probabilities: a list with one
(B, heads, 1+N, 1+N) tensor per layer, token 0 being CLS.
"""

import math
import os

import torch
import torch.nn as nn

from vit import plots
from vit.errors import UserError

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


def cls_rollout_map(attentions, grid_size=None):
    """The CLS row of the rollout over the patch tokens, as a (B, grid_h, grid_w) map."""
    rollout = attention_rollout(attentions)  # (B, T, T)
    cls_to_patches = rollout[:, 0, 1:]  # (B, N)
    return cls_to_patches.reshape(-1, *_grid_shape(cls_to_patches.shape[1], grid_size))


def last_layer_cls_attention(attentions, grid_size=None):
    """The last layer's CLS attention to the patches, per head: (B, heads, grid_h, grid_w)."""
    cls_to_patches = attentions[-1][:, :, 0, 1:].float()  # (B, heads, N)
    B, H, N = cls_to_patches.shape
    return cls_to_patches.reshape(B, H, *_grid_shape(N, grid_size))


def patch_distances(grid_size, patch_size):
    """(N, N) Euclidean distances in pixels between the centres of the patches of a grid."""
    gh, gw = grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    centres = torch.stack((rows.flatten(), cols.flatten()), dim=1).float() * patch_size  # (N, 2)
    return torch.cdist(centres, centres)


def mean_attention_distance(attentions, grid_size, patch_size):
    """The paper's mean attention distance in pixels, a (layers, heads) tensor.

    For each query patch: the distance to every key patch weighted by its attention, averaged
    over query patches and images. CLS is left out on both sides; the remaining weights of each
    query are renormalised to sum to one, so attention paid to CLS doesn't count as distance 0.
    """
    dist = patch_distances(grid_size, patch_size)  # (N, N)
    out = []
    for attn in attentions:
        a = attn[:, :, 1:, 1:].float()  # (B, heads, N, N), patches only
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


def position_similarity(position_embeddings, grid_size=None):
    """Cosine similarity between patch position embeddings: (gh, gw, gh, gw); [i, j] is the map of patch (i, j)."""
    pos = position_embeddings.detach().float().cpu().reshape(-1, position_embeddings.shape[-1])[1:]  # (N, D), no CLS
    pos = torch.nn.functional.normalize(pos, dim=-1)
    gh, gw = _grid_shape(pos.shape[0], grid_size)
    return (pos @ pos.T).reshape(gh, gw, gh, gw).numpy()


# -----------------------------------------------------------------------------
# the two commands

BATCH_SIZE = 16  # images per forward pass in `inspect`
INSPECT_IMAGES = 64  # images the attention distance is averaged over


def _attentions(model, x):
    """One no-grad forward: (attentions, logits or None when the checkpoint has no head)."""
    with torch.no_grad():
        out = model(x, output_attentions=True)
    # a classifier saved with num_labels=0 (e.g. from a bare ViTModel) has an Identity head: no class
    has_head = isinstance(getattr(model, "classifier", None), nn.Linear)
    return out.attentions, out.logits if has_head else None


def _preprocess(path, info):
    """Decode and eval-transform one image to (1, C, H, W); data.images.BadImage if unreadable."""
    from data.images import open_image
    from data.transforms import eval_transform

    image = open_image(path, info["channels"])
    transform = eval_transform(info["image_size"], info["channels"], info["mean"], info["std"])
    return transform(image).unsqueeze(0)


def _class_name(info, index):
    classes = info.get("classes")
    return classes[index] if classes else str(index)


def attention_command(checkpoint, image_paths, out_dir, device):
    """Write <out_dir>/<image stem>_attention.png per image: rollout overlay, last-layer heads, prediction."""
    from data import denormalize
    from data.images import BadImage

    from vit.commands import load_model

    model, info = load_model(checkpoint, device)
    written = []
    for path in image_paths:
        try:
            x = _preprocess(path, info).to(device)  # (1, C, H, W)
        except BadImage as e:
            raise UserError(f"cannot read image {e}; pass an image file (jpg, png, ...).") from e
        attentions, logits = _attentions(model, x)
        rollout = cls_rollout_map(attentions)[0].cpu().numpy()  # (gh, gw)
        heads = last_layer_cls_attention(attentions)[0].cpu().numpy()  # (heads, gh, gw)
        image = denormalize(x.cpu(), info["mean"], info["std"])[0]  # (H, W, C) uint8, what the model saw
        stem = os.path.splitext(os.path.basename(path))[0]
        if logits is None:
            verdict = "no classification head, attention maps only"
        else:
            prob, index = logits.float().softmax(dim=-1)[0].max(dim=0)
            verdict = f"predicted {_class_name(info, index.item())} ({prob.item():.1%})"
        out, k = os.path.join(out_dir, f"{stem}_attention.png"), 1
        while out in written:  # two inputs with one file name, e.g. a/img.png and b/img.png
            out, k = os.path.join(out_dir, f"{stem}_{k}_attention.png"), k + 1
        plots.plot_attention(image, rollout, heads, out, f"{stem}: {verdict}")
        print(f"{path}: {verdict}; wrote {out}")
        written.append(out)
    return written


def _image_files(folder):
    """Up to INSPECT_IMAGES image files under folder, spread evenly over its sorted listing (so over classes)."""
    from data.images import IMAGE_EXTENSIONS

    if not os.path.isdir(folder):
        raise UserError(f"--data-dir {folder} is not a folder; pass a folder of images (class subfolders are fine).")
    files = sorted(
        os.path.join(root, f)
        for root, _, names in os.walk(folder)
        for f in names
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise UserError(f"--data-dir {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); pass a folder of images.")
    step = max(1, len(files) // INSPECT_IMAGES)
    return files[::step][:INSPECT_IMAGES]


def _folder_images(folder, info):
    """Eval-transformed images from a folder, (n, C, H, W); unreadable files are skipped with a count."""
    from data.images import BadImage

    images, skipped = [], 0
    for path in _image_files(folder):
        try:
            images.append(_preprocess(path, info))
        except BadImage:
            skipped += 1
    if skipped:
        print(f"inspect: skipped {skipped} unreadable image(s) in {folder}")
    if not images:
        raise UserError(f"none of the images in --data-dir {folder} could be read; pass a folder of readable images.")
    return torch.cat(images)


def _fashion_mnist_images(info):
    """The embedded default's test images, (n, C, H, W), when the checkpoint was trained on it (same classes); else None."""
    from PIL import Image

    from data.fashion_mnist import CLASSES, load_fashion_mnist
    from data.transforms import eval_transform

    if info.get("classes") != CLASSES:
        return None
    images, _ = load_fashion_mnist("val")  # (10000, 28, 28) uint8
    transform = eval_transform(info["image_size"], info["channels"], info["mean"], info["std"])
    step = len(images) // INSPECT_IMAGES
    return torch.stack([transform(Image.fromarray(a)) for a in images[::step][:INSPECT_IMAGES]])


def dataset_attention_distance(model, images, device):
    """Mean attention distance (layers, heads) in pixels over images (n, C, H, W), in batches."""
    patch = model.config.patch_size
    grid = (images.shape[2] // patch, images.shape[3] // patch)
    total = 0.0
    for x in images.split(BATCH_SIZE):
        attentions, _ = _attentions(model, x.to(device))
        total = total + mean_attention_distance(attentions, grid, patch) * len(x)  # undo the batch mean
    return total / len(images)


def inspect_command(checkpoint, folder, out_dir, device):
    """Write the ViT paper's Figure 7 panels into out_dir: embedding_filters.png, position_similarity.png
    and attention_distance.png.

    The attention distance is averaged over up to INSPECT_IMAGES images from `folder`. Without a
    folder, a checkpoint trained on the embedded Fashion-MNIST default (its class names) uses that
    test set; any other checkpoint skips this figure with a message, as no image set fits them all.
    """
    from vit.commands import load_model

    model, info = load_model(checkpoint, device)
    embeddings = model.vit.embeddings
    written = []

    out = os.path.join(out_dir, "embedding_filters.png")
    plots.plot_embedding_filters(embedding_filter_components(embeddings.patch_embeddings.projection.weight), out)
    written.append(out)

    out = os.path.join(out_dir, "position_similarity.png")
    plots.plot_position_similarity(position_similarity(embeddings.position_embeddings), out)
    written.append(out)

    if folder is not None:
        images, source = _folder_images(folder, info), folder
    else:
        images, source = _fashion_mnist_images(info), "the Fashion-MNIST test set"
    if images is None:
        print("inspect: no --data-dir given (and the checkpoint is not a Fashion-MNIST one), so no attention-distance "
              "figure; pass --data-dir with a folder of images to get it")
    else:
        out = os.path.join(out_dir, "attention_distance.png")
        plots.plot_attention_distance(dataset_attention_distance(model, images, device).numpy(), out)
        print(f"inspect: attention distance averaged over {len(images)} images from {source}")
        written.append(out)
    for out in written:
        print(f"wrote {out}")
    return written
