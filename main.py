"""Train, evaluate and use a Vision Transformer; everything a run does comes from params.json.

    python main.py                                   # train what params.json says
    python main.py --params configs/cpu_smoke.json --set train.epochs=3 train.batch_size=64
    python main.py --resume                          # continue the run in output.dir
    python main.py eval --checkpoint runs/fashion_mnist [--data-dir D]
    python main.py predict --checkpoint runs/fashion_mnist/best.pt img1.png img2.jpg --topk 5
    python main.py attention --checkpoint C img1.png ... [--out DIR]
    python main.py inspect --checkpoint C [--data-dir D] [--out DIR]
    torchrun --nproc_per_node=2 main.py ...          # DDP, same results layout

The same command line as `vit ...` and `python -m vit ...` (after `pip install .`): this file only
notes the launch time and hands over to vit/cli.py.
"""

import time

LAUNCHED = time.perf_counter()  # elapsed_s in metrics.jsonl counts from here: imports, data, model and compile included

import sys  # noqa: E402

from vit.cli import main  # noqa: E402  (vit/cli.py sets OMP_WAIT_POLICY before torch loads)

if __name__ == "__main__":
    sys.exit(main(launched=LAUNCHED))
