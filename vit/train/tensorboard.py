"""TensorBoard event files in the run folder (`output.tensorboard`), written by rank 0 through
torch.utils.tensorboard's SummaryWriter, so that `tensorboard --logdir runs` lays every run side by side.

What a run writes, all against the run's optimizer step (one x axis for every curve):
- per logged step (the engine's host syncs, every SYNC_EVERY batches): `train/loss` and `train/acc`,
  the averages over the batches since the last logged step (rank 0's batches), and `train/lr`;
- per epoch, at the step that ends it: `val/loss`, `val/acc`, `val/top5` (and `val/*_ema` when the run
  keeps an EMA of the weights), the epoch's `train/epoch_loss` and `train/epoch_acc`, `speed/images_per_s`
  and `speed/epoch_s`, the numbers of its metrics.jsonl line;
- the resolved params as text (`params`), at step 0.

A resumed run appends to the same curves with no step written twice. Events run ahead of the
checkpoint (a kill between an event and the next save leaves steps the resume trains again), so a
resumed launch opens its event file with purge_step = the checkpoint's step + 1: TensorBoard's reader
drops every earlier scalar from that step on, and the resume writes those steps anew. (The reader
purges scalars only, so the params text is written by the fresh start alone.) A fresh start removes
the event files of an earlier start in the same folder, one that never reached a checkpoint, as it
rewrites metrics.jsonl.
"""

import glob
import json
import os
import threading
from contextlib import contextmanager
from typing import Callable, Optional

from vit.errors import UserError
from vit.run_folder import LAST
from vit.train.report import writing

INSTALL = 'pip install ".[tensorboard]"'
EVENT_FILES = "events.out.tfevents.*"  # how SummaryWriter names its files in the run folder
# a metrics.jsonl record's numbers and the tags they get
EPOCH_TAGS = {"val_loss": "val/loss", "val_acc": "val/acc", "val_top5": "val/top5", "val_loss_ema": "val/loss_ema",
              "val_acc_ema": "val/acc_ema", "val_top5_ema": "val/top5_ema", "loss": "train/epoch_loss",
              "acc": "train/epoch_acc", "images_per_s": "speed/images_per_s", "epoch_s": "speed/epoch_s"}


def wanted(setting) -> bool:
    """Whether the run writes event files: output.tensorboard true, or "auto" where torch's SummaryWriter
    can be imported (the tensorboard package); true without it is refused in one sentence."""
    if setting is False:
        return False
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        if setting is True:
            raise UserError(f"params key output.tensorboard is true but TensorBoard cannot be loaded ({e}); "
                            f"install it with {INSTALL}, or set output.tensorboard to \"auto\" or false.") from None
        return False
    return True


class Board:
    """The run's SummaryWriter (rank 0): per-step and per-epoch scalars and the params, no step twice."""

    def __init__(self, out: str, params: dict, resumed_step: Optional[int]):
        """Open an event file in the run folder `out`: for a run resumed from a checkpoint at `resumed_step`,
        one that purges the earlier events after it; for a fresh run (None), the only one, with the params."""
        from torch.utils.tensorboard import SummaryWriter

        self.where, self.last_path = os.path.join(out, EVENT_FILES), os.path.join(out, LAST)
        self.last_step = -1 if resumed_step is None else resumed_step  # steps up to here are written
        self.previous_hook = threading.excepthook
        threading.excepthook = self._quiet_writer_thread
        try:
            with self.writing():
                if resumed_step is None:  # the folder's events are this run's alone, from step 0
                    for stale in glob.glob(os.path.join(glob.escape(out), EVENT_FILES)):
                        os.remove(stale)
                    self.writer = SummaryWriter(log_dir=out)
                    text = json.dumps(params, indent=2)
                    self.writer.add_text("params", "\n".join("    " + line for line in text.splitlines()), 0)  # markdown code
                else:
                    self.writer = SummaryWriter(log_dir=out, purge_step=resumed_step + 1)
        except UserError:
            threading.excepthook = self.previous_hook
            raise
        print(f"tensorboard: event files in {out}; watch the runs side by side with: "
              f"tensorboard --logdir {os.path.dirname(os.path.normpath(out)) or '.'}")

    def writing(self):
        """Around a write: a full disk stops the run with one sentence, as for the run's other files.
        The writer's thread keeps its error for the next call here (it is raised then)."""
        return writing(self.where, self.last_path)

    def _quiet_writer_thread(self, args):
        """threading.excepthook while the board is open: an OSError of the event writer's thread is not
        printed as a traceback, since the writer raises it again at the next call, inside `writing`."""
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError)):
            self.previous_hook(args)

    def steps(self, sums: Optional[dict]) -> Callable[[int, dict, float], None]:
        """The per-step logger of one epoch that starts from the running `sums` (a resumed epoch's; None:
        from zero): called at each host sync with the run's step, the epoch's sums so far and the lr."""
        seen = dict(sums or {"loss": 0.0, "correct": 0.0, "count": 0.0})

        def log(step: int, now: dict, lr: float) -> None:
            n = now["count"] - seen["count"]
            if step <= self.last_step or n <= 0:  # a step logged already (gradient accumulation), or nothing new
                return
            with self.writing():
                self.writer.add_scalar("train/loss", (now["loss"] - seen["loss"]) / n, step)
                self.writer.add_scalar("train/acc", (now["correct"] - seen["correct"]) / n, step)
                self.writer.add_scalar("train/lr", lr, step)
            seen.update(now)
            self.last_step = step

        return log

    def epoch(self, step: int, record: dict) -> None:
        """An epoch's metrics.jsonl `record` at the run's `step` that ends it; flushed, so that a live
        TensorBoard shows it now."""
        with self.writing():
            for key, tag in EPOCH_TAGS.items():
                if key in record:
                    self.writer.add_scalar(tag, record[key], step)
            self.writer.flush()

    def close(self, failed: bool) -> None:
        """Flush and close the event file. When the run `failed` already, its own error is the one to tell:
        a write error here is then left unsaid (the events it lost are the steps a resume trains again)."""
        try:
            with self.writing():
                self.writer.close()
        except UserError:
            if not failed:
                raise
        finally:
            threading.excepthook = self.previous_hook


@contextmanager
def closing(board: Optional[Board]):
    """Around the epochs: the board (None on other ranks and with output.tensorboard off) is closed at
    the end, and when the run stops with an error."""
    try:
        yield
    except BaseException:
        if board is not None:
            board.close(failed=True)
        raise
    if board is not None:
        board.close(failed=False)
