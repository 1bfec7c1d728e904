"""Resizing: position embeddings resampled like timm, interpolate_pos_encoding like transformers, FlexiViT
patches, and the patch kernel adapted to another channel count like timm."""

import pytest
import torch
import transformers
from google_npz import randomize_, timm_vit
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models._manipulate import adapt_input_conv
from timm.models.vision_transformer import checkpoint_filter_fn

from vit import ViTForImageClassification, ViTModel
from vit.errors import UserError
from vit.resize import LUMA, adapt_input_channels, resample_patch_kernel, resample_pos_embed


def assert_close(ours, ref, what, tol=1e-5):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    rel = diff / ref.abs().max().clamp_min(1e-12).item()
    assert rel <= tol, f"{what}: max abs diff {diff:.2e}, rel {rel:.2e}"


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    torch.manual_seed(0)
    model = timm_vit(width=32, depth=2, heads=4, image_size=32, patch=8, classes=5)
    path = tmp_path_factory.mktemp("timm") / "vit.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("new_size", [16, 48, 56])
def test_load_at_other_image_size_matches_timm(timm_file, new_size):
    """timm at the new size, given the same file through its checkpoint_filter_fn, computes what we compute."""
    model, path = timm_file
    theirs = timm_vit(width=32, depth=2, heads=4, image_size=new_size, patch=8, classes=5)
    theirs.load_state_dict(checkpoint_filter_fn(torch.load(path, weights_only=True), theirs))
    ours = ViTForImageClassification.from_pretrained(path, image_size=new_size, num_attention_heads=4)
    assert ours.config.image_size == new_size
    assert f"position embeddings resampled 4x4 -> {new_size // 8}x{new_size // 8}" in str(ours.load_report)
    assert_close(ours.vit.embeddings.position_embeddings.detach(), theirs.pos_embed.detach(), "position embeddings")
    x = torch.randn(2, 3, new_size, new_size)
    assert_close(ours(x).logits, theirs(x), "logits")


@pytest.mark.parametrize("old,new", [(4, 7), (14, 24), (12, 6)])
def test_resample_pos_embed_matches_timm_default(old, new):
    posemb = torch.randn(1, 1 + old * old, 16)
    assert_close(resample_pos_embed(posemb, new), resample_abs_pos_embed(posemb, (new, new), num_prefix_tokens=1), "resampled")


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random transformers ViTModel and ours loaded from its save_pretrained folder."""
    torch.manual_seed(1)
    config = transformers.ViTConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, image_size=32, patch_size=8)
    theirs = randomize_(transformers.ViTModel(config)).eval()
    folder = tmp_path_factory.mktemp("hf")
    theirs.save_pretrained(folder)
    return ViTModel.from_pretrained(folder).eval(), theirs


@pytest.mark.parametrize("height,width", [(48, 48), (24, 24), (32, 48), (56, 40)])
def test_interpolate_pos_encoding_matches_transformers(hf_pair, height, width):
    ours, theirs = hf_pair
    x = torch.randn(2, 3, height, width)
    out = ours(x, interpolate_pos_encoding=True)
    ref = theirs(x, interpolate_pos_encoding=True)
    assert_close(out.last_hidden_state, ref.last_hidden_state, f"last_hidden_state at {height}x{width}")
    assert_close(out.pooler_output, ref.pooler_output, f"pooler_output at {height}x{width}")


@pytest.mark.parametrize("old,new", [(8, 4), (8, 16), (8, 6)])
def test_flexivit_kernel_matches_timm(old, new):
    kernel = torch.randn(6, 3, old, old)
    assert_close(resample_patch_kernel(kernel, new), resample_patch_embed(kernel, (new, new)), f"kernel {old}->{new}")


def test_flexivit_upsampled_kernel_sees_resized_patches_the_same():
    """The FlexiViT property: <new kernel, resize(patch)> = <old kernel, patch> when the patch grows."""
    kernel = torch.randn(4, 3, 4, 4)
    patch = torch.randn(5, 3, 4, 4)
    bigger = torch.nn.functional.interpolate(patch, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    new = resample_patch_kernel(kernel, 8)
    assert_close(torch.einsum("ochw,bchw->bo", new, bigger), torch.einsum("ochw,bchw->bo", kernel, patch), "responses", tol=1e-4)


@pytest.mark.parametrize("patch,image", [(4, 32), (16, 64)])
def test_load_with_other_patch_size(timm_file, patch, image):
    _, path = timm_file
    ours = ViTForImageClassification.from_pretrained(path, patch_size=patch, image_size=image, num_attention_heads=4)
    grid = image // patch
    assert ours.vit.embeddings.patch_embeddings.projection.weight.shape == (32, 3, patch, patch)
    assert ours.vit.embeddings.position_embeddings.shape == (1, 1 + grid * grid, 32)
    assert f"patch kernel resampled 8 -> {patch} (FlexiViT)" in str(ours.load_report)
    out = ours(torch.randn(2, 3, image, image), output_hidden_states=True)
    assert out.logits.shape == (2, 5) and out.hidden_states[0].shape == (2, 1 + grid * grid, 32)
    assert torch.isfinite(out.logits).all()


def test_rgb_checkpoint_on_gray_images_matches_timm(timm_file):
    """RGB weights, 1-channel model: the kernel is timm's adapt_input_conv(1, ...), and a gray image gives
    the logits the RGB model gives for that image copied onto all three channels."""
    model, path = timm_file
    ours = ViTForImageClassification.from_pretrained(path, num_channels=1, num_attention_heads=4).eval()
    assert "patch kernel adapted 3 -> 1 input channels" in str(ours.load_report)
    kernel = ours.vit.embeddings.patch_embeddings.projection.weight.detach()
    assert_close(kernel, adapt_input_conv(1, model.patch_embed.proj.weight.detach()), "adapted kernel")
    gray = torch.randn(2, 1, 32, 32)
    assert_close(ours(gray).logits, model.eval()(gray.expand(-1, 3, -1, -1)), "logits")


def test_gray_checkpoint_on_rgb_images(tmp_path):
    """1-channel weights, 3-channel model: an RGB image gives what the gray model gives for its gray version
    (PIL's luma weights, as open_image converts an RGB file for a 1-channel model)."""
    torch.manual_seed(2)
    gray_model = timm_vit(width=32, depth=2, heads=4, image_size=32, patch=8, classes=5, in_chans=1).eval()
    torch.save(gray_model.state_dict(), tmp_path / "gray.pth")
    ours = ViTForImageClassification.from_pretrained(tmp_path / "gray.pth", num_channels=3, num_attention_heads=4).eval()
    assert "patch kernel adapted 1 -> 3 input channels" in str(ours.load_report)
    rgb = torch.randn(2, 3, 32, 32)
    luma = torch.tensor(LUMA).view(1, 3, 1, 1)
    assert_close(ours(rgb).logits, gray_model((rgb * luma).sum(dim=1, keepdim=True)), "logits")
    assert_close(adapt_input_channels(torch.ones(8, 1, 4, 4), 4, "x.pth"), torch.full((8, 4, 4, 4), 0.25), "another count: the mean")


def test_channel_counts_that_cannot_be_adapted_are_refused():
    with pytest.raises(UserError, match="3 input channels and cannot be adapted to 2"):
        adapt_input_channels(torch.zeros(8, 3, 4, 4), 2, "x.pth")
