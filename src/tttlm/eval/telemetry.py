"""Inner-loop telemetry of TTT and Mesa layers on real inputs.

TTT (Sun et al. 2024, §2 and Fig. 3, the "TTT loss" plot): the layer's op inputs are captured in a forward
pass, then its inner loop is re-run here in float32, one mini-batch at a time, with the ops' own inner-model
functions (`tttlm.ops.ttt_linear.chunked.LINEAR`, `tttlm.ops.ttt_mlp.chunked.MLP`). For mini-batch m with
starting weights W_m, over its tokens j: the self-supervised loss l_j = 1/2 ||f(k_j) - v_j||^2 under the
initial weights W_0, under W_m (before the update) and under W_{m+1} (after it); the norm of the mean inner
gradient (1/b) sum_j grad l_j(W_m) and of the applied update s_b sum_j eta_j grad l_j(W_m). The re-run's
outputs are compared with the op's, so the telemetry is known to describe the layer that ran.

Mesa (von Oswald et al. 2025, §5): the CG iterations its forward solve takes to reach each tolerance and the
relative residual where it stopped (`tttlm.ops.mesa`'s cg_stats), per layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tttlm.layers import MesaMixer, TTTMixer


@torch.no_grad()
def capture_mixer_inputs(model, ids: Tensor) -> list[tuple[int, torch.nn.Module, Tensor]]:
    """Runs model on ids [B, T] and returns (block index, mixer, mixer input [B, T, C]) for every TTT or Mesa
    mixer, in block order."""
    captured, hooks = [], []
    for i, block in enumerate(model.model.layers):
        if isinstance(block.mixer, (TTTMixer, MesaMixer)):

            def hook(module, args, kwargs, i=i):
                captured.append((i, module, (args[0] if args else kwargs["x"]).detach()))

            hooks.append(block.mixer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model(input_ids=ids.to(next(model.parameters()).device), logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return captured


def _inner_model(mixer: TTTMixer):
    if mixer.inner == "linear":
        from tttlm.ops.ttt_linear.chunked import LINEAR

        return LINEAR
    from tttlm.ops.ttt_mlp.chunked import MLP

    return MLP


def _non_finite(t: Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


@torch.no_grad()
def ttt_layer_telemetry(mixer: TTTMixer, x: Tensor) -> dict:
    """Telemetry of one TTT layer for its input x [B, T, C] (T >= the mini-batch size; a trailing partial
    mini-batch is left out).

    Returns per mini-batch m (lists, means over rows and heads): "position" (tokens read at its end),
    "loss_init", "loss_before", "loss_after", "grad_norm", "update_norm"; "non_finite" counts per quantity
    (op inputs and outputs included), "first_non_finite_minibatch" (or None) and "max_abs_diff_vs_op" (the
    re-run's outputs against the op's, all mini-batches).
    """
    inner = _inner_model(mixer)
    inputs = mixer.op_inputs(x)
    o_op, _ = mixer.op(**inputs)
    b = inputs["mini_batch_size"]
    eps = inputs.get("eps", 1e-6)
    B, T, H, D = inputs["q"].shape
    M = T // b
    if M < 1:
        raise ValueError(f"telemetry needs at least one full mini-batch: T = {T} < mini_batch_size = {b}")
    Q, K, V = (inputs[n][:, : M * b].float().permute(0, 2, 1, 3) for n in ("q", "k", "v"))  # [B, H, T, D]
    E = inputs["eta"][:, : M * b].float().permute(0, 2, 1)  # [B, H, T]
    s = inputs["token_scale"].float()
    lw, lb = inputs["ln_weight"].float()[:, None, :], inputs["ln_bias"].float()[:, None, :]
    params0 = tuple(p.float() for p in inputs["state"].params)
    O_op = o_op[:, : M * b].float().permute(0, 2, 1, 3)

    def loss(params, Kb, Vb):  # [B, H, b]
        return 0.5 * (inner.apply(params, Kb, lw, lb, eps) - Vb).pow(2).sum(-1)

    def norm(tensors):  # [B, H]
        return torch.sqrt(sum(t.pow(2).flatten(2).sum(-1) for t in tensors))

    keys = ("loss_init", "loss_before", "loss_after", "grad_norm", "update_norm")
    series = {k: [] for k in keys}
    counts = {k: 0 for k in (*keys, "op_inputs", "op_output")}
    counts["op_inputs"] = sum(_non_finite(inputs[n].float()) for n in ("q", "k", "v", "eta"))
    counts["op_output"] = _non_finite(O_op)
    first_bad, max_diff = None, 0.0
    params = params0
    for m in range(M):
        sl = slice(m * b, (m + 1) * b)
        Qm, Km, Vm, Em = Q[:, :, sl], K[:, :, sl], V[:, :, sl], E[:, :, sl]
        O, sums = inner.minibatch(params, None, Qm, Km, Vm, Em, s, lw, lb, eps)
        new = tuple(p - s[-1] * g for p, g in zip(params, sums, strict=True))
        mean_grad = inner.grad_sums(params, Km, Vm, torch.full_like(Em, 1.0 / b), lw, lb, eps)
        values = {
            "loss_init": loss(params0, Km, Vm),
            "loss_before": loss(params, Km, Vm),
            "loss_after": loss(new, Km, Vm),
            "grad_norm": norm(mean_grad),
            "update_norm": s[-1].abs() * norm(sums),
        }
        bad = False
        for k, v in values.items():
            n = _non_finite(v)
            counts[k] += n
            bad |= n > 0
            series[k].append(float(v[torch.isfinite(v)].double().mean()) if n < v.numel() else math.nan)
        if bad and first_bad is None:
            first_bad = m
        diff = (O - O_op[:, :, sl]).abs()
        max_diff = max(max_diff, float(diff.max()) if bool(torch.isfinite(diff).all()) else math.inf)
        params = new
    return {
        "mixer": "ttt_" + mixer.inner,
        "mini_batch_size": b,
        "position": [(m + 1) * b for m in range(M)],
        **series,
        "non_finite": counts,
        "first_non_finite_minibatch": first_bad,
        "max_abs_diff_vs_op": max_diff,
    }


@torch.no_grad()
def mesa_layer_telemetry(mixer: MesaMixer, x: Tensor, tolerances: list[float], max_iter: int) -> dict:
    """CG statistics of one Mesa layer for its input x [B, T, C]: for each tolerance (relative residual),
    the iterations the forward solve took (at most max_iter) and the largest relative residual at the stop
    (max over rows, heads and tokens), plus the same at max_iter with no tolerance. Non-finite outputs are
    counted.
    """
    from tttlm.ops import mesa

    inputs = mixer.op_inputs(x)
    runs = []
    for tol in [None, *sorted(tolerances, reverse=True)]:
        stats: dict = {}
        o, _ = mesa(**{**inputs, "cg_tol": tol, "cg_max_iter": max_iter}, cg_stats=stats)
        res = stats["residual"].float()
        runs.append(
            {
                "tolerance": tol,
                "iterations": int(stats["iterations"]),
                "residual_max": float(res.max()),
                "residual_mean": float(res.mean()),
                "non_finite_output": _non_finite(o.float()),
            }
        )
    return {"mixer": "mesa", "max_iter": max_iter, "solves": runs}


def model_telemetry(
    model, ids: Tensor, tolerances: list[float] = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6), max_iter: int = 30
) -> list[dict]:
    """Telemetry of every TTT and Mesa layer of model for the rows ids [B, T]: one dict per layer (with its
    block index under "layer"). A ValueError if the model has no such layer."""
    layers = capture_mixer_inputs(model, ids)
    if not layers:
        raise ValueError(f"telemetry needs TTT or Mesa layers; this model's mixer is {model.config.mixer!r}")
    out = []
    for i, mixer, x in layers:
        if isinstance(mixer, TTTMixer):
            out.append({"layer": i, **ttt_layer_telemetry(mixer, x)})
        else:
            out.append({"layer": i, **mesa_layer_telemetry(mixer, x, list(tolerances), max_iter)})
    return out
