"""Batches from decoded uint8 images that stay on one device (the GPU when training there).

Every crop (random resized crop + flip for training, the center crop for eval) is one affine map per
sample, so a whole batch is a single `F.grid_sample`: nothing is decoded, copied or looped per image.
All random numbers of an epoch are drawn up front on the CPU from (seed, epoch) and moved once,
so the device never waits and an epoch is a pure function of (seed, epoch, rank, world_size).
"""

import math

import torch
import torch.nn.functional as F

from vit.data.sampler import epoch_generator, num_batches, shard_indices, shard_size
from vit.data.transforms import resize_size


class TensorLoader:
    """Iterable of (x float (B, C, S, S) normalized, y int64 (B,)) on the device of `images`."""

    def __init__(self, images, labels, *, batch_size, image_size, mean, std, train, seed,
                 scale, hflip, rank=0, world_size=1):
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[2] == images.shape[3], images.shape
        assert images.shape[1] == len(mean) == len(std), (images.shape, mean, std)
        self.images, self.labels = images, labels.to(images.device)  # (N, C, H, H) uint8, (N,) int64
        self.batch_size, self.image_size, self.train, self.seed = batch_size, image_size, train, seed
        self.scale, self.hflip = tuple(scale), hflip
        self.rank, self.world_size = rank, world_size
        # normalize straight from the 0..255 range: (x - 255 m) / (255 s)
        self.mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
        self.epoch = 0
        self.skipped = 0  # decoded up front, so nothing can fail mid-epoch

    def set_epoch(self, epoch):
        """Shuffle and augmentation of the next iteration become a pure function of (seed, epoch)."""
        self.epoch = epoch

    @property
    def samples(self):
        """Images this loader draws from (all ranks together)."""
        return len(self.images)

    def __len__(self):
        n = shard_size(len(self.images), self.rank, self.world_size, shuffle=self.train)
        return num_batches(n, self.batch_size, drop_last=self.train)

    def __iter__(self):
        idx = shard_indices(len(self.images), self.seed, self.epoch, self.rank, self.world_size, shuffle=self.train)
        return self._batches(idx, len(self))

    def in_order(self):
        """Every image once, in index order (all ranks' images, no drop_last), with this loader's transform:
        a training loader's augmentation of its current epoch. What a feature cache is extracted from."""
        idx = torch.arange(len(self.images))
        return self._batches(idx, num_batches(len(idx), self.batch_size, drop_last=False))

    def _batches(self, idx, count):
        """`count` batches of the images at `idx`, rendered."""
        theta = self._train_theta(len(idx)) if self.train else self._eval_theta(len(idx))
        dev = self.images.device
        idx, theta = idx.to(dev, non_blocking=True), theta.to(dev, non_blocking=True)
        for b in range(count):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self._render(self.images[idx[sl]], theta[sl]), self.labels[idx[sl]]

    def _render(self, x, theta):
        """uint8 (B, C, H, H) + axis-aligned affine (B, 2, 3) -> normalized float (B, C, S, S)."""
        S = self.image_size
        # the maps only scale and shift, so the grid is an outer sum (cheaper than F.affine_grid)
        u = (torch.arange(S, device=x.device, dtype=torch.float32) * 2 + 1) / S - 1  # output pixel centers
        gx = theta[:, 0, 0, None] * u + theta[:, 0, 2, None]  # (B, S) input x per output column
        gy = theta[:, 1, 1, None] * u + theta[:, 1, 2, None]  # (B, S) input y per output row
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, S, S, 2)
        # train: bilinear (torchvision's RandomResizedCrop default, 3x cheaper on CPU); eval: bicubic like
        # eval_transform. border padding never shows: crops stay inside the image
        mode = "bilinear" if self.train else "bicubic"
        x = F.grid_sample(x.float(), grid, mode=mode, padding_mode="border", align_corners=False)
        x = x.clamp_(0, 255)  # bicubic overshoots
        return (x - self.mean) / self.std

    def _eval_theta(self, n):
        """The eval_transform framing: keep image_size / resize_size(image_size) of each side, centered."""
        f = self.image_size / resize_size(self.image_size)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = f
        theta[:, 1, 1] = f
        return theta

    def _train_theta(self, n, tries=10):
        """RandomResizedCrop(scale, ratio 3/4..4/3) + hflip as affine maps, torchvision's rule vectorised:
        the first of `tries` (area, ratio) draws that fits in the image, else the whole image."""
        g = epoch_generator(self.seed, self.epoch, stream=1 + self.rank)
        lo, hi = self.scale
        area = lo + (hi - lo) * torch.rand(n, tries, generator=g)  # fraction of the image area
        log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(n, tries, generator=g)
        w = torch.sqrt(area * torch.exp(log_r))  # crop width / image width, (n, tries)
        h = torch.sqrt(area / torch.exp(log_r))
        fits = (w <= 1) & (h <= 1)
        first = fits.float().argmax(dim=1, keepdim=True)  # first fitting try (0 when none fit)
        any_fit = fits.any(dim=1)
        w = torch.where(any_fit, w.gather(1, first)[:, 0], torch.ones(n))
        h = torch.where(any_fit, h.gather(1, first)[:, 0], torch.ones(n))
        # crop center, uniform over positions that keep the crop inside; in [-1, 1] coords
        cx = (1 - w) * (2 * torch.rand(n, generator=g) - 1)
        cy = (1 - h) * (2 * torch.rand(n, generator=g) - 1)
        flip = torch.rand(n, generator=g) < self.hflip
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = torch.where(flip, -w, w)
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = h
        theta[:, 1, 2] = cy
        return theta
