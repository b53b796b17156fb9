"""Length-grouped epoch order: a permutation, batches of similar length, the short batch last."""

from __future__ import annotations

import random
import statistics

import torch

from smallmighty.train.batching import length_grouped_order


def _lengths(n: int = 1000, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(64, int(rng.lognormvariate(2.7, 0.5))) + 2 for _ in range(n)]  # short texts, long tail


def test_order_is_a_permutation_and_seeded():
    lengths = _lengths()
    a = length_grouped_order(lengths, 32, torch.Generator().manual_seed(3))
    b = length_grouped_order(lengths, 32, torch.Generator().manual_seed(3))
    c = length_grouped_order(lengths, 32, torch.Generator().manual_seed(4))
    assert sorted(a) == list(range(len(lengths)))
    assert a == b and a != c


def test_grouped_batches_pad_far_less_than_random_ones():
    lengths = _lengths()
    order = length_grouped_order(lengths, 32, torch.Generator().manual_seed(0))
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()

    def mean_width(o):
        return statistics.mean(max(lengths[i] for i in o[s:s + 32]) for s in range(0, len(o), 32))

    assert mean_width(order) < statistics.mean(lengths) * 1.2 < mean_width(shuffled)
    # Batch order is still random: the batch widths do not simply rise through the epoch.
    widths = [max(lengths[i] for i in order[s:s + 32]) for s in range(0, 960, 32)]
    assert widths != sorted(widths)


def test_only_the_last_batch_is_short():
    lengths = _lengths(1000)
    order = length_grouped_order(lengths, 32, torch.Generator().manual_seed(0), pool_batches=4)
    last = order[992:]
    assert len(last) == 1000 % 32
    # The short batch is the whole remainder of one pool; the earlier runs of 32 are each a sorted
    # slice of one pool, so within each, lengths never fall.
    for s in range(0, 992, 32):
        run = [lengths[i] for i in order[s:s + 32]]
        assert run == sorted(run)
