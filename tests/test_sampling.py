"""Sampling strategies: class balance per epoch, fresh draws per epoch, disjoint DDP shares."""

from collections import Counter

import numpy as np
import pytest

from fer_lightning.data.sampling import EpochSampler

# an AffectNet-like skew: 50 / 20 / 5 samples, plus 3 rows with no label
LABELS = np.array([0] * 50 + [1] * 20 + [2] * 5 + [-1] * 3)


def epoch(sampler, e):
    sampler.set_epoch(e)
    return list(sampler)


def test_none_is_a_permutation_of_every_row():
    s = EpochSampler(LABELS, "none", seed=1, num_replicas=1, rank=0)
    idx = epoch(s, 0)
    assert sorted(idx) == list(range(len(LABELS)))
    assert idx != list(range(len(LABELS)))  # shuffled
    assert len(s) == len(LABELS)


def test_downsample_equal_counts_without_replacement_fresh_each_epoch():
    s = EpochSampler(LABELS, "downsample", seed=1, num_replicas=1, rank=0)
    a, b = epoch(s, 0), epoch(s, 1)
    for idx in (a, b):
        counts = Counter(LABELS[idx].tolist())
        assert counts == {0: 5, 1: 5, 2: 5}  # every class cut to the rarest (5); unlabeled rows excluded
        assert len(set(idx)) == len(idx)  # no repeats
    assert set(a) != set(b)  # a fresh random subset per epoch
    assert len(s) == 15


def test_upsample_equal_counts_with_replacement():
    s = EpochSampler(LABELS, "upsample", seed=1, num_replicas=1, rank=0)
    idx = epoch(s, 0)
    counts = Counter(LABELS[idx].tolist())
    assert counts == {0: 50, 1: 50, 2: 50}
    # the 5 class-2 rows must be drawn repeatedly to reach 50
    assert len({i for i in idx if LABELS[i] == 2}) <= 5


def test_same_seed_and_epoch_same_draw():
    a = EpochSampler(LABELS, "upsample", seed=7, num_replicas=1, rank=0)
    b = EpochSampler(LABELS, "upsample", seed=7, num_replicas=1, rank=0)
    assert epoch(a, 3) == epoch(b, 3)
    c = EpochSampler(LABELS, "upsample", seed=8, num_replicas=1, rank=0)
    assert epoch(a, 3) != epoch(c, 3)


@pytest.mark.parametrize("strategy", ["none", "downsample", "upsample"])
def test_ddp_ranks_split_the_same_global_draw(strategy):
    world = 3
    samplers = [EpochSampler(LABELS, strategy, seed=5, num_replicas=world, rank=r) for r in range(world)]
    shares = [epoch(s, 2) for s in samplers]
    assert len({len(x) for x in shares}) == 1  # equal lengths keep DDP in lockstep
    global_draw = samplers[0].global_indices()
    # interleaving the ranks' shares gives back exactly the padded global draw: nothing duplicated across
    # ranks beyond the strategy's own draws and the padding to a multiple of the world size
    merged = np.empty(len(global_draw), dtype=np.int64)
    for r, share in enumerate(shares):
        merged[r::world] = share
    assert merged.tolist() == global_draw.tolist()
    unpadded = samplers[0].total
    assert len(global_draw) - unpadded < world
    if strategy != "none":
        counts = Counter(LABELS[global_draw[:unpadded]].tolist())
        assert len(set(counts.values())) == 1


def test_unknown_strategy_names_the_key():
    with pytest.raises(ValueError, match="sampling.name"):
        EpochSampler(LABELS, "smote")
