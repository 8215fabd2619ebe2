"""The training loop: data, model, AdamW, warm-up + cosine, accumulation, clipping, validation, checkpoints.

One function, `train(cfg)`, for one process or several under torchrun (DDP or FSDP2). The loss of a step is the
mean over every next-token target of the global batch (all processes and micro-batches together), so a run on N
processes equals a run on one with the same global batch.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tttlm.data.corpus import Corpus
from tttlm.data.loader import PackedLoader, count_targets
from tttlm.data.shards import PreparedData, TokenShard, prepare_data
from tttlm.data.tokenizer import eos_id
from tttlm.errors import UserError
from tttlm.train import distributed
from tttlm.train.checkpoint import checkpoints, load_checkpoint, save_checkpoint
from tttlm.train.config import TrainConfig
from tttlm.train.distributed import Runtime, grad_sync, unwrap
from tttlm.train.metrics import MetricsLog
from tttlm.train.optim import make_optimizer, warmup_progress

# settings that must match between a checkpoint and the run resuming it (the rest may change, e.g. steps)
_RESUME_KEYS = ("model", "model_overrides", "corpus", "text_field", "val_fraction", "tokenizer", "vocab_size",
                "seq_len", "batch_size", "seed")


def prepare(cfg: TrainConfig, rt: Runtime, log=print) -> PreparedData:
    """The corpus of cfg tokenized into cached shards; the main process builds them while the others wait."""
    corpus = Corpus(cfg.corpus, cfg.text_field, cfg.val_fraction)
    data = None
    if rt.main:
        data = prepare_data(corpus, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, cache_dir=cfg.cache_dir,
                            log=log)
    rt.barrier()
    if not rt.main:
        data = prepare_data(corpus, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, cache_dir=cfg.cache_dir,
                            log=lambda *_: None)
    return data


def build(cfg: TrainConfig, data: PreparedData):
    """The model of cfg, sized for the data's tokenizer (EOS as bos/eos token)."""
    from tttlm.models import build_model

    eos = eos_id(data.tokenizer)
    return build_model(cfg.model, vocab_size=data.vocab_size, eos_token_id=eos, bos_token_id=eos,
                       **cfg.model_overrides)


@torch.no_grad()
def evaluate(model, shard: TokenShard, seq_len: int, batch_size: int, micro: int, batches: int, rt: Runtime,
             resets: bool = True) -> dict:
    """Mean next-token loss over the first `batches` global batches of `batch_size` sequences of a split (in
    document order), each process taking its rows `micro` at a time; resets=False reads the windows as training
    does with stream_windows. Returns {"val_loss", "val_ppl", "val_tokens"}."""
    windows = shard.num_tokens // seq_len
    batch_size = min(batch_size, windows - windows % rt.world_size)
    if batch_size < rt.world_size:
        raise UserError(f"the validation split has {shard.num_tokens} tokens, too few for {rt.world_size} "
                        f"sequence(s) of {seq_len}")
    loader = PackedLoader(shard, seq_len, batch_size, shuffle=False, rank=rt.rank, world_size=rt.world_size,
                          split="val", require_full_length=False, resets=resets)
    was_training = model.training
    model.eval()
    total = count = 0.0
    for _ in range(min(batches, loader.batches_per_epoch)):
        batch = next(loader)
        ids, pos = batch["input_ids"].to(rt.device), batch["position_ids"].to(rt.device)
        for s in range(0, ids.shape[0], micro):
            with rt.autocast():
                out = model(input_ids=ids[s : s + micro], labels=ids[s : s + micro],
                            position_ids=pos[s : s + micro], loss_reduction="sum")
            total += float(out.loss)
        count += count_targets(batch["position_ids"])
    model.train(was_training)
    total, count = rt.all_sum(total), rt.all_sum(count)
    loss = total / max(1.0, count)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(count)}


def _check_resumable(cfg: TrainConfig, ckpt: Path) -> None:
    saved = json.loads((ckpt / "train.json").read_text())
    diff = [k for k in _RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise UserError(f"cannot resume from {ckpt}: {', '.join(f'{k}={saved.get(k)!r}' for k in diff)} there, "
                        f"but {', '.join(f'{k}={getattr(cfg, k)!r}' for k in diff)} now")


def train(cfg: TrainConfig, *, resume: bool = False, log=print) -> dict:
    """Runs (or with resume=True continues, from the latest checkpoint in cfg.out_dir) the training of cfg.
    Returns the last metrics: {"step", "loss", "val_loss", "val_ppl", "unigram_val_loss", "checkpoint", ...}."""
    cfg.check()
    rt = distributed.start(cfg.device, cfg.dtype)
    try:
        return _train(cfg, rt, resume, log if rt.main else (lambda *a, **k: None))
    finally:
        distributed.stop()


def _train(cfg: TrainConfig, rt: Runtime, resume: bool, log) -> dict:
    out = Path(cfg.out_dir)
    existing = checkpoints(out)
    if resume and not existing:
        raise UserError(f"nothing to resume: {out} holds no checkpoint")
    if not resume and existing:
        raise UserError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose another "
                        f"output directory")
    ckpt = existing[-1] if resume else None
    if ckpt is not None:
        _check_resumable(cfg, ckpt)
    micro = cfg.micro_batch_size or cfg.batch_size // rt.world_size
    if micro < 1 or cfg.batch_size % (micro * rt.world_size):
        raise UserError(f"the batch size {cfg.batch_size} must be a multiple of micro_batch_size ({micro}) x "
                        f"processes ({rt.world_size})")
    accum = cfg.batch_size // (micro * rt.world_size)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = prepare(cfg, rt, log)
    train_shard, val_shard = data.split("train"), data.split("val")
    loader = PackedLoader(train_shard, cfg.seq_len, cfg.batch_size, seed=cfg.seed, rank=rt.rank,
                          world_size=rt.world_size, resets=not cfg.stream_windows)
    model = build(cfg, data).to(rt.device)
    if cfg.activation_checkpointing:
        model.checkpoint_activations()
    wrapped = distributed.wrap(model, rt, cfg.parallel)
    # the fused AdamW kernel for plain CUDA tensors; FSDP2's sharded DTensor parameters take the default path
    fused = rt.device.type == "cuda" and not (rt.distributed and cfg.parallel == "fsdp")
    optimizer, scheduler = make_optimizer(model, cfg, fused=fused)
    step, counters = 0, {"tokens": 0}
    if ckpt is not None:
        state = load_checkpoint(ckpt, wrapped, optimizer, scheduler, loader, rt)
        step, counters = state["step"], state["counters"]
        log(f"resumed from {ckpt} (step {step})")
    n_params = sum(p.numel() for p in unwrap(model).parameters())
    log(f"model {cfg.model}: {n_params / 1e6:.2f}M parameters; {rt.world_size} process(es) on {rt.device.type}, "
        f"{cfg.parallel if rt.distributed else 'single'}; {cfg.batch_size} x {cfg.seq_len} tokens per step "
        f"({accum} accumulation step(s) of {micro} per process); {cfg.steps} steps")

    metrics = MetricsLog(out, rt.main, cfg.tensorboard, step if ckpt is not None else None)
    last: dict = {"step": step, "unigram_val_loss": data.meta["unigram_val_loss"]}
    bar = None
    if rt.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    busy, steps_last = 0.0, 0  # seconds spent in training steps since the last log (validation, saving excluded)
    wrapped.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        if hasattr(model, "set_inner_lr_warmup"):
            model.set_inner_lr_warmup(warmup_progress(step, cfg))
        batch = next(loader)
        ids, pos = batch["input_ids"].to(rt.device), batch["position_ids"].to(rt.device)
        n_targets = rt.all_sum(count_targets(batch["position_ids"]))
        loss_sum = torch.zeros((), device=rt.device)
        for i in range(accum):
            sl = slice(i * micro, (i + 1) * micro)
            with grad_sync(wrapped, i == accum - 1):
                with rt.autocast():
                    out_ = wrapped(input_ids=ids[sl], labels=ids[sl], position_ids=pos[sl], loss_reduction="sum")
                (out_.loss * (rt.world_size / n_targets)).backward()
            loss_sum += out_.loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_last += 1
        counters["tokens"] += tokens_per_step
        loss = rt.all_sum(float(loss_sum)) / n_targets
        if not math.isfinite(loss):
            raise RuntimeError(f"the training loss is {loss} at step {step}: lower the learning rate")
        busy += time.perf_counter() - t0
        last.update(step=step, loss=loss)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                   "tokens": counters["tokens"], "tokens_per_s": steps_last * tokens_per_step / busy}
            if rt.device.type == "cuda":
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
            metrics.write(rec)
            last.update(rec)
            busy, steps_last = 0.0, 0
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val = evaluate(wrapped, val_shard, cfg.seq_len, cfg.batch_size, micro, cfg.eval_batches, rt,
                           resets=not cfg.stream_windows)
            metrics.write({"step": step, **val})
            last.update(val)
            if bar is not None:
                bar.write(f"step {step}: validation loss {val['val_loss']:.4f} (perplexity {val['val_ppl']:.1f})")
        if step % cfg.save_every == 0 or step == cfg.steps:
            last["checkpoint"] = str(save_checkpoint(out, step, wrapped, optimizer, scheduler, loader,
                                                     data.tokenizer, cfg, rt, counters, cfg.keep_last))
    if bar is not None:
        bar.close()
    metrics.close()
    return last
