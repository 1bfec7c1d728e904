"""Write data/samples/: the first Fashion-MNIST test image of each class as a 28x28 grayscale PNG,
named by its class (trouser.png, ankle_boot.png, ...), for the README's predict and attention examples.

    python data/make_samples.py

Reads the idx files of Debian's dataset-fashion-mnist (see data/README.md) through vit.data, so the
pixels are exactly those the model is evaluated on. Running it again rewrites the same files.
"""

import os
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without `pip install .`

from vit.data.fashion_mnist import CLASSES, load_fashion_mnist  # noqa: E402

OUT = os.path.join(ROOT, "data", "samples")


def file_name(label):
    """'T-shirt/top' -> 't-shirt_top.png', 'Ankle boot' -> 'ankle_boot.png'."""
    return label.lower().replace("/", "_").replace(" ", "_") + ".png"


def main():
    images, labels = load_fashion_mnist("val")  # the official 10k test set
    os.makedirs(OUT, exist_ok=True)
    for k, label in enumerate(CLASSES):
        index = int((labels == k).nonzero()[0][0])  # the first test image of class k
        path = os.path.join(OUT, file_name(label))
        Image.fromarray(images[index], "L").save(path, optimize=True)
        print(f"{path}: test image {index}, {label}")


if __name__ == "__main__":
    main()
