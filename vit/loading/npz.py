"""Google sources: the original JAX/Flax `.npz` files (the first ImageNet-21k release, AugReg, and
big_vision's naming), read without pickle and with every member's header checked before numpy
allocates what it declares.

Google names after the `params/` or `opt/target/` prefix is stripped. The first release and AugReg
call the block's parts MultiHeadDotProductAttention_1, MlpBlock_3, LayerNorm_0/2; big_vision
calls them ..._0, MlpBlock_0, LayerNorm_0/1. Flax kernels are (in, out), attention ones split heads.

References: timm's `_load_weights` (models/vision_transformer.py); big_vision's models/vit.py for the
`params/` naming.
"""

import math
import zipfile
import zlib

import numpy as np
import torch

from vit.errors import UserError
from vit.loading.core import L, Source, rename

KIND = "Google .npz"  # the Source.kind
B = r"Transformer/encoderblock_(\d+)/"
NPZ_RENAMES = [
    (r"cls", "embeddings.cls_token", None),
    (r"(?:Transformer/posembed_input/)?pos_embedding", "embeddings.position_embeddings", None),
    (r"embedding/kernel", "embeddings.patch_embeddings.projection.weight", "hwio_to_oihw"),
    (r"embedding/bias", "embeddings.patch_embeddings.projection.bias", None),
    (B + r"LayerNorm_0/scale", L + "layernorm_before.weight", None),
    (B + r"LayerNorm_0/bias", L + "layernorm_before.bias", None),
    (B + r"MultiHeadDotProductAttention_[01]/(query|key|value)/kernel", L + "attention.attention.\\2.weight", "heads_in"),
    (B + r"MultiHeadDotProductAttention_[01]/(query|key|value)/bias", L + "attention.attention.\\2.bias", "flatten"),
    (B + r"MultiHeadDotProductAttention_[01]/out/kernel", L + "attention.output.dense.weight", "heads_out"),
    (B + r"MultiHeadDotProductAttention_[01]/out/bias", L + "attention.output.dense.bias", None),
    (B + r"LayerNorm_[12]/scale", L + "layernorm_after.weight", None),
    (B + r"LayerNorm_[12]/bias", L + "layernorm_after.bias", None),
    (B + r"MlpBlock_[03]/Dense_0/kernel", L + "intermediate.dense.weight", "transpose"),
    (B + r"MlpBlock_[03]/Dense_0/bias", L + "intermediate.dense.bias", None),
    (B + r"MlpBlock_[03]/Dense_1/kernel", L + "output.dense.weight", "transpose"),
    (B + r"MlpBlock_[03]/Dense_1/bias", L + "output.dense.bias", None),
    (r"Transformer/encoder_norm/scale", "layernorm.weight", None),
    (r"Transformer/encoder_norm/bias", "layernorm.bias", None),
    (r"pre_logits/kernel", "pooler.dense.weight", "transpose"),
    (r"pre_logits/bias", "pooler.dense.bias", None),
    (r"head/kernel", "classifier.weight", "transpose"),
    (r"head/bias", "classifier.bias", None),
]


def read_npz(path: str) -> Source:
    """An original Google JAX/Flax .npz (first in21k release, AugReg, or big_vision), without pickle."""
    try:
        with zipfile.ZipFile(path) as z:
            arrays = {}
            for info in z.infolist():
                check_npy_header(z, info)  # before numpy allocates what the header declares
                with z.open(info) as member:
                    arrays[info.filename.removesuffix(".npy")] = np.lib.format.read_array(member, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, zlib.error, NotImplementedError) as e:
        raise UserError(f"cannot read {path} as a .npz checkpoint ({type(e).__name__}: {str(e)[:200]}); the file is corrupt, truncated or pickled.") from None
    for prefix in ("params/", "opt/target/"):
        if prefix + "embedding/kernel" in arrays:
            arrays = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    if "embedding/kernel" not in arrays:
        raise UserError(f"{path} is not a recognised Google ViT .npz (no embedding/kernel); pass a ViT checkpoint.")
    arrays = unstack_scanned_blocks(arrays, path)
    state = rename({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}, NPZ_RENAMES, path)
    # Google's ViTs have a class token only to pool with it (big_vision's pool_type='tok'); else they pool by the mean
    kw = {"layer_norm_eps": 1e-6, "global_pool": "token" if "embeddings.cls_token" in state else "avg"}
    query = arrays.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    if query is None:
        query = arrays.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel")
    if query is not None:
        kw["num_attention_heads"] = int(query.shape[1])  # (D, heads, head_dim)
    pos = state.get("embeddings.position_embeddings")
    if pos is not None and pos.ndim == 3 and "embeddings.cls_token" in state and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        # big_vision adds position embeddings before the cls token joins: its position is zero
        state["embeddings.position_embeddings"] = torch.cat((pos.new_zeros(1, 1, pos.shape[2]), pos), dim=1)
    return Source(state, kw, KIND)


def check_npy_header(z, info):
    """ValueError for an .npy member whose header declares more (or other) data than the member holds:
    numpy would allocate the declared size first (10^12 floats for a 64-byte member), then find the data short."""
    with z.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"member {info.filename!r} is .npy format {version}, which numpy's savez does not write")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(member)
        data_bytes = info.file_size - member.tell()
    if dtype.hasobject:
        raise ValueError(f"member {info.filename!r} holds pickled objects, which are never loaded")
    declared = math.prod(shape) * dtype.itemsize
    if declared != data_bytes:
        raise ValueError(f"member {info.filename!r} declares shape {shape} of {dtype}, {declared:,} bytes, but holds {data_bytes:,}")


def unstack_scanned_blocks(arrays, path):
    """big_vision's scanned encoder stores all blocks in one `encoderblock/` with a leading depth axis."""
    out = {}
    for k, v in arrays.items():
        if k.startswith("Transformer/encoderblock/"):
            if v.ndim == 0:
                raise UserError(f"{path}: the scanned block array {k!r} is a scalar, not a stack of blocks; the file is damaged or not a ViT checkpoint.")
            for i in range(v.shape[0]):
                out[k.replace("encoderblock/", f"encoderblock_{i}/")] = v[i]
        else:
            out[k] = v
    return out

