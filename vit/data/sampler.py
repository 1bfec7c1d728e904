"""Which samples each rank sees in an epoch: a pure function of (seed, epoch, rank, world_size).

Both loaders use this, so resume is bit-exact and DDP ranks never overlap.
"""

import numpy as np
import torch


def epoch_generator(seed, epoch, stream=0):
    """A CPU torch.Generator seeded from (seed, epoch, stream); streams keep order and augmentation apart."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def shard_indices(n, seed, epoch, rank, world_size, shuffle):
    """Indices (int64 tensor) for this rank. Shuffled: the same permutation on every rank, the tail that
    does not divide by world_size dropped so every rank gets exactly n // world_size. Not shuffled (eval):
    arange strided by rank, nothing dropped, so the ranks together cover every sample exactly once
    (eval ranks may then differ by one sample, and so by one batch: reduce metric sums after the loop)."""
    if not shuffle:
        return torch.arange(rank, n, world_size)
    perm = torch.randperm(n, generator=epoch_generator(seed, epoch))
    return perm[rank::world_size][:shard_size(n, rank, world_size, shuffle)]


def shard_size(n, rank, world_size, shuffle):
    """len(shard_indices(...)) without drawing the permutation."""
    return n // world_size if shuffle else len(range(rank, n, world_size))


def num_batches(n_samples, batch_size, drop_last):
    """Batches per epoch for one rank."""
    return n_samples // batch_size if drop_last else -(-n_samples // batch_size)
