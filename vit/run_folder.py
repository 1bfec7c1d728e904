"""The names of the files in a training run's folder (`output.dir`), in one place: the training run
writes them (vit/train/), the loader reads a run folder as its best.pt, else its last.pt (vit/loading/).

Plain names, no code: both sides import them from here, downward.
"""

BEST = "best.pt"  # the checkpoint of the epoch with the best output.best_metric
LAST = "last.pt"  # the latest checkpoint, what --resume continues
HF_DIR = "best_hf"  # best.pt's weights as a Hugging Face folder (config.json, model.safetensors, preprocessor_config.json)
PARAMS = "params.json"  # the resolved params the run was started with
METRICS = "metrics.jsonl"  # one record per finished epoch
CURVES = "curves.png"  # loss and accuracy, redrawn every epoch
CONFUSION = "confusion.png"  # the end-of-run report: confusion matrix,
PER_CLASS = "per_class_accuracy.json"  # per-class accuracy
MISCLASSIFIED = "misclassified.png"  # and a grid of misclassified images
FEATURES = "features.safetensors"  # train.cache_features: the frozen backbone's pooled features, extracted once

# in the order the run's last line lists them (a folder with a trailing slash)
FILES = (BEST, LAST, HF_DIR + "/", METRICS, CURVES, CONFUSION, PER_CLASS, MISCLASSIFIED, PARAMS, FEATURES)
