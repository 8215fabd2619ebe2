import numpy as np
import pytest
import torch

from tttlm.data.loader import PackedLoader, count_targets
from tttlm.data.shards import TokenShard
from tttlm.errors import UserError


def make_shard(lengths, seed=0):
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenShard(rng.integers(1, 1000, offsets[-1]).astype(np.uint16), offsets)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_windows_pack_documents_with_positions_restarting_at_each_start():
    lengths = [5, 17, 3, 40, 9, 26, 11]
    shard = make_shard(lengths)
    loader = PackedLoader(shard, seq_len=16, batch_size=2, shuffle=False)
    batches = take(loader, loader.batches_per_epoch)
    ids = np.concatenate([b["input_ids"].numpy().reshape(-1) for b in batches])
    pos = np.concatenate([b["position_ids"].numpy().reshape(-1) for b in batches])
    n = len(ids)
    assert n == (sum(lengths) // 32) * 32
    assert (ids == shard.tokens[:n]).all()  # unshuffled: the corpus in order
    starts = set(shard.offsets[:-1].tolist()) | set(range(0, n, 16))  # document and row starts
    assert set(np.flatnonzero(pos == 0).tolist()) == {s for s in starts if s < n}
    assert count_targets(batches[0]["position_ids"]) == 32 - len([s for s in starts if s < 32])


def test_stream_windows_cut_the_same_stream_without_resets():
    """resets=False (the TTT authors' handling): the same windows of the same concatenated stream, with positions
    0..seq_len-1 in every row, so every token but a row's last has a target, across document boundaries too; no
    document needs to reach seq_len."""
    shard = make_shard([5, 17, 3, 40, 9, 26, 11])
    kept, stream = (PackedLoader(shard, 16, 2, seed=4, resets=r) for r in (True, False))
    targets = [0, 0]
    for _ in range(kept.batches_per_epoch + 1):
        a, b = next(kept), next(stream)
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(b["position_ids"], torch.arange(16).expand(2, 16))
        targets[0] += count_targets(a["position_ids"])
        targets[1] += count_targets(b["position_ids"])
    assert targets[1] == (kept.batches_per_epoch + 1) * 2 * 15 > targets[0]
    short = make_shard([5, 7, 3, 9] * 4)
    with pytest.raises(UserError, match="longer than every document"):
        PackedLoader(short, 16, 2)
    assert next(PackedLoader(short, 16, 2, resets=False))["input_ids"].shape == (2, 16)


def test_deterministic_for_a_seed_and_resumable_mid_epoch():
    shard = make_shard(np.random.default_rng(1).integers(8, 60, 50))
    a = PackedLoader(shard, 24, 4, seed=7)
    first = take(a, a.batches_per_epoch + 3)  # crosses into the second epoch
    b = PackedLoader(shard, 24, 4, seed=7)
    assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(first, take(b, len(first))))
    other = next(PackedLoader(shard, 24, 4, seed=8))
    assert not (other["input_ids"] == first[0]["input_ids"]).all()
    c = PackedLoader(shard, 24, 4, seed=7)
    take(c, 5)
    state = c.state_dict()
    d = PackedLoader(shard, 24, 4, seed=7)
    d.load_state_dict(state)
    for x, y in zip(take(c, a.batches_per_epoch), take(d, a.batches_per_epoch)):
        assert (x["input_ids"] == y["input_ids"]).all() and (x["position_ids"] == y["position_ids"]).all()


def test_ranks_split_the_global_batch():
    shard = make_shard([30] * 20)
    whole = take(PackedLoader(shard, 16, 4, seed=3), 3)
    parts = [take(PackedLoader(shard, 16, 4, seed=3, rank=r, world_size=2), 3) for r in range(2)]
    for i in range(3):
        joined = np.concatenate([parts[0][i]["input_ids"], parts[1][i]["input_ids"]])
        assert (joined == whole[i]["input_ids"].numpy()).all()


def test_sequence_longer_than_every_document_is_a_clear_error():
    with pytest.raises(UserError, match="longer than every document.*longest has 40 tokens"):
        PackedLoader(make_shard([10, 40, 20]), seq_len=64, batch_size=1)
    with pytest.raises(UserError, match="fewer than one batch"):
        PackedLoader(make_shard([10, 40, 20]), seq_len=32, batch_size=4)
