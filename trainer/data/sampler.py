"""Batches grouped by bucket, in an order that is a pure function of (seed, epoch).

Resuming mid-epoch needs no sampler state beyond (epoch, batch index): the epoch's batch list is recomputed.
"""

from collections.abc import Sequence

import numpy as np


class BucketBatchSampler:
    def __init__(self, bucket_ids: Sequence[int], repeats: Sequence[int], batch_size: int, seed: int):
        """bucket_ids[i] and repeats[i] belong to dataset item i; every batch holds items of one bucket."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self._members: dict[int, list[int]] = {}
        for i, (b, r) in enumerate(zip(bucket_ids, repeats)):
            self._members.setdefault(b, []).extend([i] * r)
        self._len = sum(-(-len(m) // batch_size) for m in self._members.values())

    def __len__(self) -> int:
        """Batches per epoch (the last batch of a bucket may be short)."""
        return self._len

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for b in sorted(self._members):
            members = self._members[b]
            order = [members[i] for i in rng.permutation(len(members))]
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]
