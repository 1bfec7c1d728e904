"""train.strategy "fsdp": torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) shards the parameters,
gradients and AdamW state over the processes, and the full state dicts every checkpoint holds.

- `shard` wraps each ViTLayer, then the root (the embeddings, final norm and head), after the run's
  weights and optimizer state are in place: a fresh run's, or those resume read from last.pt. On a GPU its
  MixedPrecisionPolicy computes in train.precision's dtype (bf16 or fp16) and reduces gradients in fp32;
  on the CPU parameters stay fp32 and autocast alone decides, as under DDP.
- `full_state` gathers the whole model and optimizer state (AdamW's moments by parameter number, as
  `optimizer.state_dict()` writes them) onto rank 0's CPU. So last.pt, best.pt and best_hf/ are the
  files a DDP or one-process run writes: `from_pretrained` and transformers read them, and any strategy
  and any world size resumes them (the effective batch must stay, as always). We chose this over torch's
  distributed checkpoint (a folder of shards per save plus a converter command) because a ViT-g's state
  (1 B parameters: 4 GB of weights, 12 GB with AdamW) still fits one host's memory, and one file kind
  keeps every reader, the resume checks and the kill tests as they are.
- The weights' EMA (timm's ModelEmaV3 keeps an unsharded copy and updates it from the parameters) is
  refused with train.strategy "fsdp" by vit/params.py; gradient checkpointing works (each layer is
  recomputed inside its own all-gather).
"""

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from vit import distributed
from vit.model import ViTForImageClassification, ViTLayer
from vit.train import optim

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard(model: ViTForImageClassification, optimizer: torch.optim.Optimizer, train: dict, precision: str,
          d: distributed.Dist) -> torch.optim.Optimizer:
    """fully_shard each ViTLayer, then the root, in place; returns the optimizer over the sharded
    parameters, holding `optimizer`'s state (resumed moments and step counts) sharded the same way.
    With one process there is nothing to shard: `optimizer` comes back as it was."""
    if not d.enabled:
        return optimizer
    # a resumed run's moments and step counts, by parameter name. Only when there are any: on an optimizer
    # without state, get_optimizer_state_dict makes some by taking a step, which would count as one
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True)) if optimizer.state else None
    policy = (MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
              if d.device.type == "cuda" and precision in DTYPES else MixedPrecisionPolicy())
    for module in model.modules():
        if isinstance(module, ViTLayer):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    sharded = optim.build_optimizer(model, train, d.device)
    if state is not None:
        set_optimizer_state_dict(model, sharded, state, options=StateDictOptions(full_state_dict=True))
    return sharded


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) whole, as a one-process run's `state_dict()` gives them.
    Under FSDP every rank must call it (it gathers the shards); rank 0 gets them on the CPU, the others
    empty dicts."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    return weights, numbered(by_name) if by_name else {}


def numbered(by_name: dict) -> dict:
    """An optimizer state dict keyed by parameter names (torch.distributed.checkpoint's form) -> keyed by
    parameter numbers in param_groups order, the form `optimizer.state_dict()` and resume use."""
    ids, groups = {}, []
    for group in by_name["param_groups"]:
        groups.append({**group, "params": [ids.setdefault(name, len(ids)) for name in group["params"]]})
    return {"state": {ids[name]: value for name, value in by_name["state"].items()}, "param_groups": groups}
