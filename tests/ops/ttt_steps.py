"""The in-place check shared by the TTT ops' decode-step tests (TTT-Linear's and TTT-MLP's)."""

from dataclasses import replace

import pytest
import torch

from tttlm.ops.compare import differing


def check_steps_in_place(step, inputs, ref, backend, bad, mini_batch_size=16):
    """step (`ttt_linear_step` or `ttt_mlp_step`) with inplace=True, token after token from a copy of the state
    `ref` (rows at offsets 5, mini_batch_size - 1 and 0), returns that copy each time, written in place (same
    buffers), and equals the out-of-place step from `ref` (exactly on the CPU); a state with one field replaced
    by each of `bad` (name, tensor) is refused by name. inputs: q, k, v [B, T, H, D], eta [B, T, H], ln_w, ln_b
    [H, D], token_scale [mini_batch_size] (the first token takes the default scale)."""
    q, k, v, eta, ln_w, ln_b, ts = inputs
    T = q.shape[1]
    state = ref.map(torch.clone)
    buffers = [t.data_ptr() for t in state.params + state.grads]
    exact = q.device.type != "cuda"
    with torch.no_grad():
        for t in range(T):
            args = (q[:, t], k[:, t], v[:, t], eta[:, t], ln_w, ln_b)
            kw = dict(mini_batch_size=mini_batch_size, token_scale=ts if t else None, backend=backend)
            o_ref, ref = step(*args, ref, **kw)
            o, new = step(*args, state, inplace=True, **kw)
            assert new is state
            assert not differing({"o": o} | vars(new), {"o": o_ref} | vars(ref), exact=exact)
    assert state.offset.tolist() == [5 + T, T - 1, T]
    assert buffers == [t.data_ptr() for t in state.params + state.grads]
    args = (q[:, 0], k[:, 0], v[:, 0], eta[:, 0], ln_w, ln_b)
    for name, tensor in bad:
        with pytest.raises(ValueError, match=f"state.{name} "):
            step(*args, replace(state, **{name: tensor}), inplace=True, backend=backend)
