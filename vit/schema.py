"""The params.json schema: every key of the four sections (model, data, train, output) with its
default, the types it takes and the rule its value must keep, and what other tools call some keys.

SCHEMA is the one place a default lives, and its defaults are the default run's; DEFAULT_RUN_ONLY names
the keys that only params.json sets (null here). vit/params.py loads and checks params against it.
"""

from vit.config import POOLINGS, WEIGHT_INITS

NUMBER = (int, float)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda", "mps")  # auto: cuda, then mps, then the CPU (vit/distributed.py's pick_device)
DATASETS = ("fashion_mnist", "folder", "webdataset")
STRATEGIES = ("ddp", "fsdp")

# each leaf: (default, allowed types, rule). rule is None, a tuple of choices, or a string:
#   ">0"  strictly positive     ">=0"  non-negative     "(0,1)"  open unit interval
#   "[0,1]"  closed unit interval     "[0,1)"  half-open     "(0,4096]"  a side length in pixels
#   "path"  a non-empty string the OS can take as a file name     "alpha"  0 (off) or a Beta parameter
#   "preset" / "scale" / "floats" / "randaugment" / "shards": see _check_rule
SCHEMA = {
    "model": {
        "preset": (None, (str, type(None)), "preset"),  # "Ti/16", "B/16", ...; null: explicit sizes
        "pretrained": (None, (str, type(None)), "path"),  # HF folder, timm file or Google .npz
        "pretrained_ema": (False, bool, None),  # take the pretrained file's EMA weights (timm's state_dict_ema, model_ema)
        # explicit sizes: override the preset's; null keeps the preset's (or the checkpoint's)
        "patch_size": (None, (int, type(None)), ">0"),
        "hidden_size": (None, (int, type(None)), ">0"),
        "num_hidden_layers": (None, (int, type(None)), ">0"),
        "num_attention_heads": (None, (int, type(None)), ">0"),
        "intermediate_size": (None, (int, type(None)), ">0"),
        "layer_norm_eps": (None, (int, float, type(None)), ">0"),  # null: 1e-6 (timm), or the checkpoint's
        "qkv_bias": (None, (bool, type(None)), None),
        # how a model trained from scratch starts: "jax" (Xavier, the original Flax code's: much faster at
        # small widths) or "trunc_normal" (HF's and timm's default); null: trunc_normal
        "weight_init": (None, (str, type(None)), WEIGHT_INITS),
        # what the head reads: "token" or "avg" (patch mean); null: the checkpoint's, or the class token
        # from scratch. Set it for a timm avg-pool file the loader can only guess about (its report says)
        "global_pool": (None, (str, type(None)), POOLINGS),
        "hidden_dropout_prob": (0.0, NUMBER, "[0,1)"),
        "attention_probs_dropout_prob": (0.0, NUMBER, "[0,1)"),
    },
    "data": {
        "dataset": ("fashion_mnist", str, DATASETS),
        "train_dir": (None, (str, type(None)), "path"),
        "val_dir": (None, (str, type(None)), "path"),  # null: split val_split off train_dir
        "val_split": (0.1, NUMBER, "(0,1)"),
        "split_seed": (0, int, ">=0"),
        "image_size": (28, int, "(0,4096]"),  # the bound refuses sizes no memory holds
        "channels": (1, int, (1, 3)),
        "mean": ([0.286], list, "floats"),
        "std": ([0.353], list, "floats"),
        "workers": (4, int, ">=0"),
        "in_memory": ("auto", (str, bool), ("auto", True, False)),
        "decode": ("workers", str, ("workers", "device")),  # JPEG folders read from disk: PIL in workers, or nvjpeg
        # dataset "webdataset": tar shards (`vit shards` writes them), a brace pattern "d/train-{000000..000099}.tar"
        # or a list of paths; classes.json beside the first train shard names the classes
        "train_shards": (None, (str, list, type(None)), "shards"),
        "val_shards": (None, (str, list, type(None)), "shards"),  # null: no validation
        "train_samples": (None, (int, type(None)), ">0"),  # the epoch's length over all ranks; null: all of train_shards
        "shuffle_buffer": (1000, int, ">0"),  # samples each shard reader shuffles among (webdataset's shuffle)
    },
    "train": {
        "epochs": (30, int, ">0"),  # with a time_budget: the most the run trains
        # minutes for the whole run, set-up and evaluation included: the run decides how many epochs fit
        # (vit/train/budget.py); null: train.epochs as given
        "time_budget": (None, (int, float, type(None)), "minutes"),
        "batch_size": (128, int, ">0"),  # per process; the effective batch is x grad_accum x world size
        "lr": (2e-3, NUMBER, ">0"),  # at lr_scale_batch when that is set
        "lr_scale_batch": (None, (int, type(None)), ">0"),  # lr *= effective batch / lr_scale_batch
        "min_lr": (1e-5, NUMBER, ">=0"),
        "weight_decay": (0.05, NUMBER, ">=0"),
        "warmup_epochs": (0.5, NUMBER, ">=0"),
        "label_smoothing": (0.1, NUMBER, "[0,1)"),
        "mixup": (0.0, NUMBER, "alpha"),  # Beta(alpha, alpha); 0 is off
        "cutmix": (0.0, NUMBER, "alpha"),
        "randaugment": (None, (str, type(None)), "randaugment"),  # timm string, e.g. "rand-m9-mstd0.5"
        "random_resized_crop_scale": ([0.9, 1.0], list, "scale"),
        "hflip": (0.5, NUMBER, "[0,1]"),
        "drop_path": (0.0, NUMBER, "[0,1)"),
        # the share of each image's patch tokens a training step drops (timm's PatchDropout; FLIP): such a
        # step costs about the share it keeps. 0: off
        "patch_dropout": (0.5, NUMBER, "[0,1)"),
        "patch_dropout_until": (0.5, NUMBER, "[0,1]"),  # the share of the run's epochs, from the first, that drop patches
        "precision": ("auto", str, PRECISIONS),  # auto: bf16 on a GPU, and on a CPU where bf16 is faster
        "device": ("auto", str, DEVICES),  # where the run trains; auto: cuda, then mps, then the CPU
        "compile": (False, bool, None),
        "grad_accum": (1, int, ">0"),
        "clip_grad": (1.0, (int, float, type(None)), ">0"),  # max global grad norm; null: no clipping
        "seed": (0, int, ">=0"),
        "layer_decay": (None, (int, float, type(None)), "[0.01,1]"),  # BEiT/MAE per-layer lr decay; below, deep layers' lr underflows
        "freeze_backbone": (False, bool, None),  # linear probe: only the classifier trains
        # with freeze_backbone: the backbone's pooled features are extracted once and the head trains over them
        # (vit/train/feature_cache.py); one view per image, so augmentation must be off
        "cache_features": (False, bool, None),
        "eval_every": (1, int, ">0"),
        "grad_checkpointing": (False, bool, None),  # recompute each block in the backward pass: less memory, ~1/3 more time
        "ema_decay": (None, (int, float, type(None)), "(0,1)"),  # EMA of the weights (timm's ModelEmaV3, with warm-up); null: off
        "strategy": ("ddp", str, STRATEGIES),  # several processes: DDP copies the model, FSDP2 shards it (vit/train/fsdp.py)
        "dist_timeout_s": (600, NUMBER, ">0"),  # how long a process waits in a collective for the others before it stops
    },
    "output": {
        "dir": ("runs/fashion_mnist", str, "path"),
        "save_every": (1, int, ">0"),  # epochs between `last` checkpoints (the final epoch always saves)
        "misclassified": (32, int, ">=0"),  # images in the end-of-run grid
        "best_metric": ("val_acc", str, ("val_acc", "val_acc_ema")),  # what picks best.pt and best_hf/ (val_acc_ema: the EMA weights)
        # TensorBoard event files in the run folder: "auto" writes them where the tensorboard package is installed
        "tensorboard": ("auto", (str, bool), ("auto", True, False)),
    },
}

# what other tools call some keys (HF's TrainingArguments and ViTConfig, timm's train.py and create_model), for
# "did you mean": train.learning_rate -> train.lr
ALIASES = {
    "learning_rate": "lr", "base_lr": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs", "epoch": "epochs",
    "bs": "batch_size", "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "accum_iter": "grad_accum", "warmup": "warmup_epochs", "warmup_steps": "warmup_epochs", "wd": "weight_decay",
    "smoothing": "label_smoothing", "drop_path_rate": "drop_path", "max_grad_norm": "clip_grad", "amp": "precision",
    "dtype": "precision", "model_ema_decay": "ema_decay", "img_size": "image_size", "input_size": "image_size",
    "num_workers": "workers", "in_chans": "channels", "num_channels": "channels", "output_dir": "dir",
    "embed_dim": "hidden_size", "width": "hidden_size", "depth": "num_hidden_layers", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "heads": "num_attention_heads", "mlp_dim": "intermediate_size",
    "drop_rate": "hidden_dropout_prob", "dropout": "hidden_dropout_prob", "attn_drop_rate": "attention_probs_dropout_prob",
    "checkpoint": "pretrained", "weights": "pretrained", "data_dir": "train_dir",
}

# the model keys without a default of their own: null leaves them to the preset or the checkpoint
SIZES = ("patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
FROM_SCRATCH = (*SIZES, "layer_norm_eps", "qkv_bias", "weight_init")  # ViTConfig fields that model.pretrained decides instead
ARCHITECTURE = ("preset", "pretrained", *FROM_SCRATCH)
DEFAULT_RUN_ONLY = {"model": ARCHITECTURE, "train": ("time_budget",)}  # null here, set in params.json
# train.cache_features: the augmentation keys and their "off" values (a cached feature is one view of its image)
AUGMENTATION_OFF = {"random_resized_crop_scale": [1.0, 1.0], "hflip": 0.0, "mixup": 0.0, "cutmix": 0.0, "randaugment": None}
