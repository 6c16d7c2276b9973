"""Batches cut from tensors in memory: the order of an epoch (resumable mid-epoch, sharded under DDP) and the
loader that hands them to Lightning."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from mnist_lit.errors import DataError


class EpochBatches(Sampler[Tensor]):
    """One process's batches of indices for one epoch.

    For training (shuffle=True) the order is a pure function of (seed, epoch); the seed and the position in
    the order are the state Lightning checkpoints: a resumed run re-creates exactly the order it was killed in
    (also without --seed_everything, or with another one), and goes on from the next sample. Under DDP the
    epoch's order is dealt out in turn to the world_size processes, as DistributedSampler does, so their shards
    are disjoint: for training each gets the same number of samples (the remainder, fewer than world_size
    samples, sits that epoch out), for evaluation (shuffle=False, the file order, every pass from the start)
    every sample is seen exactly once.
    """

    def __init__(
        self, size: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        # Samples this process has been handed this epoch (counted in samples, not batches, so a resume with
        # another batch_size still sees each sample once), and how far into the epoch's order they reach.
        self.seen = 0
        self.position = 0

    def _shard_size(self) -> int:
        if self.shuffle:  # training: equal shards, or DDP processes would wait on each other at the end
            return self.size // self.world_size
        return len(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return -(-self._shard_size() // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.seen, self.position = epoch, 0, 0

    def indices(self) -> Tensor:
        """This process's sample indices for the rest of the epoch (for evaluation: for a whole pass)."""
        if not self.shuffle:
            self.seen = self.position = 0
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        # What this process still has to see this epoch. After a resume with another number of processes the
        # rest of the order is dealt out anew, wrapping round to its start if the new processes need more.
        remaining = max(self._shard_size() - self.seen, 0)
        stream = torch.arange(self.position, self.position + remaining * self.world_size) % max(self.size, 1)
        return order[stream[self.rank :: self.world_size]]

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.indices().split(self.batch_size))

    def advance(self, batch_len: int) -> None:
        self.seen += batch_len
        self.position += batch_len * self.world_size

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "seen": self.seen, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # from a checkpoint: numbers that size tensors (a negative count would ask for an endless order)
        values = [state.get(key) if isinstance(state, dict) else None for key in ("seed", "epoch", "seen", "position")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in values) or (
            values[2] > self.size or values[3] > self.size * max(self.world_size, 1) * 4
        ):
            raise DataError(f"the checkpoint's place in the data order is not one this data has: {state!r:.120}")
        self.seed, self.epoch, self.seen, self.position = values


class _Rows(torch.utils.data.Dataset):
    """Batches by index tensor, for DataLoader workers (batch_size=None hands each worker a whole batch)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __getitem__(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __len__(self) -> int:
        return len(self.images)


class BatchLoader:
    """Batches (images, labels) cut from tensors in memory; Lightning saves and restores its position.

    Hand-written, not torch's DataLoader over a TensorDataset: that fetches each of a batch's 64 samples by
    itself and collates them in Python (a batch sampler with batch_size=None avoids it, as the num_workers path
    below does), and it has no state_dict, so Lightning could not save where in the epoch a run was and a
    resume would replay or skip batches (torchdata's StatefulDataLoader could, as one more dependency). An
    epoch of batches takes 0.02 s this way against 0.15 s through DataLoader(TensorDataset) here (0.021 against
    0.158 ms a batch, `python tests/benchmarks/fit.py --loaders`): 6% of a training step saved.

    With num_workers=0 batches are cut in the training process (fastest for data already in memory); with
    workers they are cut in a torch DataLoader's worker processes. pin_memory pins each batch so that the
    copy to the GPU is asynchronous. The tensors may also live on the GPU already: then batches never cross.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, sampler: EpochBatches, num_workers: int = 0, pin_memory: bool = False
    ) -> None:
        self.images, self.labels, self.sampler = images, labels, sampler
        # As in a DataLoader with batch_size=None: the sampler yields whole batches. Lightning reads both
        # attributes (and calls sampler.set_epoch at each epoch).
        self.batch_sampler = None
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # A generator: Lightning creates the iterator before it calls set_epoch, so the order is fixed lazily.
        if self.num_workers == 0:
            order = self.sampler.indices().to(self.images.device)
            for index in order.split(self.sampler.batch_size):
                images, labels = self.images.index_select(0, index), self.labels.index_select(0, index)
                if self.pin_memory:
                    images, labels = images.pin_memory(), labels.pin_memory()
                # Counted as it is handed out: a checkpoint saved after this batch must not replay it.
                self.sampler.advance(len(index))
                yield images, labels
            return
        loader = DataLoader(
            _Rows(self.images, self.labels),
            sampler=list(self.sampler),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=torch.Generator(),  # leaves the global RNG, which drives dropout, untouched
        )
        for images, labels in loader:
            self.sampler.advance(len(labels))
            yield images, labels

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
