"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", arXiv 2312.04927, §3): a sequence
first lists P key-value pairs, then asks for keys again later in the sequence; the model must emit each key's
value. Every mixer is trained from scratch at small width on this task over a learning-rate sweep, and the
best accuracy per (mixer, width, sequence length, pairs) is kept, as Zoology does.

Layout of one example (token 0 fills unused slots; keys and values come from disjoint halves of the
vocabulary, each drawn without replacement):
    k_1 v_1 k_2 v_2 ... k_P v_P  0 0 k_a v_a 0 ... k_b v_b 0 ...
Every key is asked once, in random order, at random non-overlapping two-token slots after the pairs. The
loss and the accuracy count only the answers (the value after each asked key).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

FILLER = 0


def mqar_batch(
    batch_size: int, seq_len: int, num_pairs: int, vocab_size: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """MQAR examples: ids int64 [B, L] and labels int64 [B, L] (the value at each answer slot, -100 elsewhere;
    as for the models' loss, position t's prediction is scored against labels[t + 1]).

    Needs seq_len >= 4 * num_pairs (the pairs, then one two-token slot per query) and
    num_pairs <= (vocab_size - 1) // 2.
    """
    half = (vocab_size - 1) // 2
    if num_pairs < 1 or num_pairs > half:
        raise ValueError(f"num_pairs must lie in [1, (vocab_size - 1) // 2 = {half}], got {num_pairs}")
    if seq_len < 4 * num_pairs:
        raise ValueError(f"seq_len must be >= 4 * num_pairs = {4 * num_pairs}, got {seq_len}")
    B, P, L = batch_size, num_pairs, seq_len

    def draw(n: int, k: int) -> Tensor:  # k distinct integers in [0, n) per row
        return torch.rand(B, n, generator=generator).argsort(dim=1)[:, :k]

    keys = draw(half, P) + 1
    values = draw(vocab_size - 1 - half, P) + 1 + half
    ids = torch.full((B, L), FILLER, dtype=torch.long)
    pair_pos = 2 * torch.arange(P)
    ids[:, pair_pos] = keys
    ids[:, pair_pos + 1] = values
    slots = draw((L - 2 * P) // 2, P)  # which two-token slots after the pairs hold a query
    order = draw(P, P)  # which pair each query asks for
    rows = torch.arange(B)[:, None]
    qpos = 2 * P + 2 * slots
    ids[rows, qpos] = keys.gather(1, order)
    ids[rows, qpos + 1] = values.gather(1, order)
    labels = torch.full_like(ids, -100)
    labels[rows, qpos + 1] = ids[rows, qpos + 1]
    return ids, labels


def chance_accuracy(vocab_size: int) -> float:
    """The accuracy of a uniform guess among the values mqar_batch draws answers from."""
    return 1 / (vocab_size - 1 - (vocab_size - 1) // 2)


@torch.no_grad()
def mqar_accuracy(model, ids: Tensor, labels: Tensor, batch_size: int = 64) -> float:
    """Fraction of answers predicted exactly (argmax) over ids, labels [N, L]."""
    device = next(model.parameters()).device
    correct = total = 0
    for s in range(0, ids.shape[0], batch_size):
        x, y = ids[s : s + batch_size].to(device), labels[s : s + batch_size].to(device)
        logits = model(input_ids=x).logits[:, :-1]
        target = y[:, 1:]
        mask = target != -100
        correct += int((logits.argmax(-1)[mask] == target[mask]).sum())
        total += int(mask.sum())
    return correct / max(1, total)


def recall_model(mixer: str, width: int, vocab_size: int, num_layers: int = 2, head_dim: int = 16):
    """A small LM for recall: `{mixer}-tiny` at the given width, num_layers blocks, heads of head_dim, a
    SwiGLU of 3 x width (the same MLP for every mixer: Zoology compares mixers at equal width)."""
    import tttlm

    if width % head_dim:
        raise ValueError(f"width {width} must be a multiple of head_dim {head_dim}")
    overrides = dict(
        hidden_size=width,
        num_hidden_layers=num_layers,
        num_attention_heads=width // head_dim,
        intermediate_size=3 * width,
        vocab_size=vocab_size,
    )
    if mixer == "mamba2":
        overrides.update(mamba_headdim=head_dim)
    return tttlm.build_model(f"{mixer}-tiny", **overrides)


def train_mqar(
    model,
    *,
    seq_len: int,
    num_pairs: int,
    vocab_size: int,
    lr: float,
    steps: int,
    batch_size: int,
    eval_examples: int = 1000,
    seed: int = 0,
    weight_decay: float = 0.1,
    warmup: float = 0.1,
) -> dict:
    """Trains model on fresh MQAR batches (AdamW, linear warm-up then cosine decay, gradient clipping at 1),
    then measures accuracy on eval_examples held-out examples. Returns {"accuracy", "final_loss", "diverged",
    "seconds"}; a run whose loss turns non-finite stops and scores accuracy 0."""
    device = next(model.parameters()).device
    decay_free = model.no_weight_decay_names()
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if n not in decay_free],
            "weight_decay": weight_decay,
        },
        {"params": [p for n, p in model.named_parameters() if n in decay_free], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))
    n_warm = max(1, int(warmup * steps))

    def schedule(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    loss_value, diverged = math.nan, False
    for step in range(steps):
        model.set_inner_lr_warmup(step / max(1, steps - 1))
        ids, labels = mqar_batch(batch_size, seq_len, num_pairs, vocab_size, gen)
        loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    accuracy = 0.0
    if not diverged:
        eval_gen = torch.Generator().manual_seed(10_000 + seed)
        accuracy = mqar_accuracy(model, *mqar_batch(eval_examples, seq_len, num_pairs, vocab_size, eval_gen))
    return {
        "accuracy": accuracy,
        "final_loss": loss_value,
        "diverged": diverged,
        "seconds": time.perf_counter() - start,
    }


def recall_sweep(
    mixers: list[str],
    widths: list[int],
    seq_lens: list[int],
    pairs: list[int],
    lrs: list[float],
    *,
    steps: int,
    batch_size: int,
    vocab_size: int,
    device: torch.device,
    num_layers: int = 2,
    head_dim: int = 16,
    eval_examples: int = 1000,
    seed: int = 0,
    on_run=None,
) -> dict:
    """Trains one model per (mixer, width, seq_len, pairs, lr) and keeps the best accuracy over lrs.

    Configurations with seq_len < 4 * pairs are skipped. on_run(run, result so far) is called after every run.
    Returns {"runs": [every run], "best": best_runs(runs)}.
    """
    runs = []
    for mixer in mixers:
        for width in widths:
            for L in seq_lens:
                for P in pairs:
                    if L < 4 * P:
                        continue
                    for lr in lrs:
                        torch.manual_seed(seed)
                        model = recall_model(mixer, width, vocab_size, num_layers, head_dim).to(device)
                        res = train_mqar(
                            model,
                            seq_len=L,
                            num_pairs=P,
                            vocab_size=vocab_size,
                            lr=lr,
                            steps=steps,
                            batch_size=batch_size,
                            eval_examples=eval_examples,
                            seed=seed,
                        )
                        run = {"mixer": mixer, "width": width, "seq_len": L, "pairs": P, "lr": lr, **res}
                        runs.append(run)
                        if on_run is not None:
                            on_run(run, {"runs": runs, "best": best_runs(runs)})
    return {"runs": runs, "best": best_runs(runs)}


def best_runs(runs: list[dict]) -> list[dict]:
    """The best run over learning rates per (mixer, width, seq_len, pairs): {those keys, "lr", "accuracy"}, in
    order of first appearance."""
    best: dict[tuple, dict] = {}
    for run in runs:
        key = (run["mixer"], run["width"], run["seq_len"], run["pairs"])
        if key not in best or run["accuracy"] > best[key]["accuracy"]:
            best[key] = {k: run[k] for k in ("mixer", "width", "seq_len", "pairs", "lr", "accuracy")}
    return list(best.values())
