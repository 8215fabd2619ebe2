"""Packing documents into fixed-length sequences, deterministically, resumable mid-epoch.

Each epoch orders the documents by a permutation drawn from (seed, epoch) (or keeps their order when
shuffle=False), lays them end to end and cuts the stream into windows of seq_len tokens; the last partial
window is dropped. A batch is `batch_size` consecutive windows (the global batch); with several processes
each rank takes its own contiguous slice of rows, so the global batch is the same for any world size.
Boundaries travel as position_ids that restart at 0 at every document start (and at every row start, since a
document cut by a window boundary continues as a fresh sequence), which is what TTTLMForCausalLM reads to
reset its states and mask the loss. With resets=False (the TTT authors' data handling) the positions run
0..seq_len-1 in every row: a window is one sequence, documents flow into each other (separated by the EOS
tokens that frame them) and the loss predicts across their boundaries.
"""

from __future__ import annotations

import numpy as np
import torch

from tttlm.data.shards import TokenShard
from tttlm.errors import UserError


class PackedLoader:
    """Batches {"input_ids": [b, seq_len] int64, "position_ids": [b, seq_len] int64} from one TokenShard.

    batch_size: rows of the global batch; b = batch_size // world_size rows go to this rank.
    `state_dict()` / `load_state_dict()` save and restore the position (epoch, batch index).
    require_full_length: a UserError when no document reaches seq_len (the model would never see a context
    that long: a likely mistake); off for validation, and moot without resets.
    resets: position_ids restart at document starts (default); False: they run 0..seq_len-1 in every row.
    """

    def __init__(self, shard: TokenShard, seq_len: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, split: str = "train", require_full_length: bool = True,
                 resets: bool = True):
        if seq_len < 2:
            raise UserError(f"the sequence length must be at least 2, got {seq_len}")
        if batch_size < 1 or batch_size % world_size:
            raise UserError(f"the batch size ({batch_size} sequences) must be a positive multiple of the number "
                            f"of processes ({world_size})")
        longest = int(shard.lengths.max(initial=0))
        if require_full_length and resets and longest < seq_len:
            raise UserError(f"the sequence length {seq_len} is longer than every document of the {split} split "
                            f"(the longest has {longest} tokens): choose a sequence length <= {longest}")
        self.windows = shard.num_tokens // seq_len
        if self.windows < batch_size:
            raise UserError(f"the {split} split has {shard.num_tokens} tokens, fewer than one batch of "
                            f"{batch_size} x {seq_len}: lower the batch size or sequence length")
        self.shard, self.seq_len, self.batch_size = shard, seq_len, batch_size
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.resets = resets
        self.batches_per_epoch = self.windows // batch_size
        self.epoch, self.index = 0, 0
        self._order_epoch = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise UserError(f"the checkpoint's data seed is {state['seed']}, this run's is {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def _layout(self):
        """Document order of this epoch and each one's start in the concatenated stream."""
        if self._order_epoch != self.epoch:
            n = self.shard.num_documents
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
            else:
                order = np.arange(n)
            lengths = self.shard.lengths[order]
            self._order = order
            self._starts = np.concatenate([[0], np.cumsum(lengths)])
            self._order_epoch = self.epoch
        return self._order, self._starts

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        order, starts = self._layout()
        lo, hi = w * self.seq_len, (w + 1) * self.seq_len
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        ids, pos = [], []
        d = first
        while starts[d] < hi:
            a, b = max(lo, starts[d]), min(hi, starts[d + 1])
            doc = order[d]
            off = int(self.shard.offsets[doc])
            ids.append(self.shard.tokens[off + a - starts[d] : off + b - starts[d]])
            pos.append(np.arange(b - a))
            d += 1
        return np.concatenate(ids).astype(np.int64), np.concatenate(pos)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        rows = self.batch_size // self.world_size
        first = self.index * self.batch_size + self.rank * rows
        windows = [self._window(first + r) for r in range(rows)]
        self.index += 1
        ids = torch.from_numpy(np.stack([w[0] for w in windows]))
        if self.resets:
            pos = torch.from_numpy(np.stack([w[1] for w in windows]))
        else:
            pos = torch.arange(self.seq_len).expand(rows, self.seq_len).clone()
        return {"input_ids": ids, "position_ids": pos}


def count_targets(position_ids: torch.Tensor) -> int:
    """Tokens that have a next-token target in a packed batch: positions whose successor is in the same document.

    position_ids [b, T] (restarting at 0 at document starts)."""
    return int((position_ids[:, 1:] != 0).sum())
