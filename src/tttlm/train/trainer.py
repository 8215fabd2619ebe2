"""The training loop: data, model, AdamW, warm-up + cosine, accumulation, clipping, validation, checkpoints.

One function, `train(cfg)`, for one process or several under torchrun (DDP or FSDP2). The loss of a step is the
mean over every next-token target of the global batch (all processes and micro-batches together), so a run on N
processes equals a run on one with the same global batch.

What a run survives (docs/reliability.md lists every case and what the user sees):
- a kill: `--resume` continues from the newest checkpoint whose files match their manifest, to the bit on a CPU;
- SIGTERM or SIGINT: a checkpoint at the next step boundary, then `RunStopped` with status PREEMPTED;
- a non-finite loss or gradient: the step is skipped on the device (`SkipNonFinite`), counted in the metrics,
  and max_nonfinite_steps of them in a row stop the run, its checkpoints holding the weights from before them;
- another process of the run gone: `RunStopped` as soon as a collective fails (gloo: at once);
- a write that fails: `RunStopped`, the earlier checkpoints untouched.
The host waits for the device only where it logs, validates or saves, never in every step.
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
from tttlm.data.tokenizer import eos_id, load_tokenizer, tokenizer_key
from tttlm.errors import PREEMPTED, RunStopped, UserError
from tttlm.fast import fast_paths, to_device
from tttlm.train import distributed
from tttlm.train.checkpoint import (
    checkpoints,
    load_checkpoint,
    load_pretrained,
    newest_intact,
    resolve_checkpoint,
    save_checkpoint,
)
from tttlm.train.config import TrainConfig, split_batch
from tttlm.train.distributed import Runtime, grad_sync, lost_peer, unwrap
from tttlm.train.metrics import MetricsLog
from tttlm.train.optim import SkipNonFinite, make_optimizer, warmup_progress
from tttlm.train.preemption import StopRequests

# settings that must match between a checkpoint and the run resuming it (the rest may change, e.g. steps)
_RESUME_KEYS = ("model", "model_overrides", "corpus", "val_corpus", "text_field", "val_fraction", "tokenizer",
                "vocab_size", "seq_len", "batch_size", "seed")


def prepare(cfg: TrainConfig, corpus: Corpus, rt: Runtime, log=print) -> PreparedData:
    """The corpus tokenized into cached shards; the main process builds them while the others wait."""
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
        ids, pos = to_device(batch["input_ids"], rt.device), batch["position_ids"]  # positions read on the host
        for s in range(0, ids.shape[0], micro):
            with rt.autocast():
                out = model(input_ids=ids[s : s + micro], labels=ids[s : s + micro],
                            position_ids=pos[s : s + micro], loss_reduction="sum")
            total += float(out.loss)
        count += count_targets(batch["position_ids"])
    model.train(was_training)
    total, count = rt.all_sum([total, count])
    loss = total / max(1.0, count)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": int(count)}


def _with_init(cfg: TrainConfig) -> TrainConfig:
    """cfg for fine-tuning from cfg.init_from: its checkpoint's model (preset name and overrides, as that run
    recorded them) and tokenizer. UserError when the settings ask for another model or tokenizer."""
    import dataclasses

    path = resolve_checkpoint(cfg.init_from)
    saved = json.loads((path / "train.json").read_text()) if (path / "train.json").is_file() else {}
    overrides = saved.get("model_overrides", {})
    if cfg.model_overrides and cfg.model_overrides != overrides:
        raise UserError(f"--init-from {cfg.init_from}: the model keeps its architecture; drop --set (model_overrides "
                        f"{cfg.model_overrides})")
    tokenizer = str(path / "tokenizer.json")
    if cfg.tokenizer is not None and cfg.tokenizer != tokenizer and \
            tokenizer_key(load_tokenizer(cfg.tokenizer)) != tokenizer_key(load_tokenizer(tokenizer)):
        raise UserError(f"--init-from {cfg.init_from}: the model was trained with {tokenizer}, not {cfg.tokenizer}: "
                        f"leave --tokenizer out")
    return dataclasses.replace(cfg, init_from=str(path), model=saved.get("model", cfg.model),
                               model_overrides=overrides, tokenizer=tokenizer)


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _corpus_change(before: dict, now: dict) -> str | None:
    """What differs between two `Corpus.stamps()`, in words ("1 file(s) added (c.txt); 1 file(s) changed (a.txt:
    10 -> 12 bytes)"), or None."""
    added = sorted(set(now) - set(before))
    removed = sorted(set(before) - set(now))
    changed = []
    for name in sorted(set(now) & set(before)):
        (size0, time0), (size1, time1) = before[name], now[name]
        if size0 != size1:
            changed.append(f"{name}: {size0:,d} -> {size1:,d} bytes")
        elif time0 != time1:
            changed.append(f"{name}: modified, same size")
    parts = [f"{len(v)} file(s) {what} ({_listed(v)})" for what, v in
             (("added", added), ("removed", removed), ("changed", changed)) if v]
    return "; ".join(parts) or None


def _check_resumable(cfg: TrainConfig, ckpt: Path, corpus: Corpus) -> None:
    """UserError when the run resuming ckpt differs from the one that saved it: its settings, the corpus files,
    or the tokenizer file it names."""
    saved = json.loads((ckpt / "train.json").read_text())
    diff = [k for k in _RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise UserError(f"cannot resume from {ckpt}: {', '.join(f'{k}={saved.get(k)!r}' for k in diff)} there, "
                        f"but {', '.join(f'{k}={getattr(cfg, k)!r}' for k in diff)} now")
    data_file = ckpt / "data.json"
    if data_file.is_file():  # absent from checkpoints written before it existed
        change = _corpus_change(json.loads(data_file.read_text())["corpus_files"], corpus.stamps())
        if change is not None:
            raise UserError(f"cannot resume from {ckpt}: the corpus {corpus.source!r} changed since the run "
                            f"started: {change}")
    if cfg.tokenizer is not None:
        then, now = load_tokenizer(ckpt / "tokenizer.json"), load_tokenizer(cfg.tokenizer)
        if tokenizer_key(then) != tokenizer_key(now):
            sizes = (then.get_vocab_size(), now.get_vocab_size())
            what = f"{sizes[0]} -> {sizes[1]} tokens" if sizes[0] != sizes[1] else "same size, other tokens or merges"
            raise UserError(f"cannot resume from {ckpt}: the tokenizer {cfg.tokenizer} changed since the run "
                            f"started ({what})")


def _flops(model, n_params: int, seq_len: int, rt: Runtime) -> tuple[float, float | None]:
    """Model FLOPs of one training token and the device's measured bf16 matmul peak (None off CUDA), counted as
    `tttlm throughput` counts them (tttlm.eval.throughput), for the utilisation in the logs."""
    from tttlm.eval.throughput import flops_per_token, peak_matmul_flops

    c = model.config
    per_token = flops_per_token(n_params, c.num_hidden_layers, c.hidden_size, seq_len, c.mixer == "transformer")
    if not rt.main:  # only the main process logs
        return per_token, None
    peak = peak_matmul_flops(rt.device)
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()  # the measurement's matrices, before the model's activations need the room
    return per_token, peak


def _log_line(rec: dict, steps: int) -> str:
    """One training record as a plain log line (no progress bar: stdout is not a terminal, or --no-progress)."""
    line = (f"step {rec['step']}/{steps}: loss {rec['loss']:.4f}, lr {rec['lr']:.3g}, grad norm "
            f"{rec['grad_norm']:.3g}, {rec['tokens_per_s']:,.0f} tokens/s")
    if "mfu" in rec:
        line += f", MFU {rec['mfu']:.1%}"
    if "peak_mem_gb" in rec:
        line += f", peak memory {rec['peak_mem_gb']:.1f} GB"
    return line


def _intact(out: Path) -> str:
    found = checkpoints(out)
    return f"the checkpoints in {out} are intact, the newest {found[-1].name}" if found else \
        f"no checkpoint had been saved in {out}"


def _check_writable(out: Path, rt: Runtime) -> None:
    """UserError on every process when the main one cannot create files in out (before any data is prepared)."""
    error = None
    if rt.main:
        probe = out / ".write-test"
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            error = f"cannot write to the output directory {out}: {e.strerror}"
    error = rt.first_error(error)
    if error is not None:
        raise UserError(error)


def _choose_checkpoint(out: Path, resume: bool, log) -> Path | None:
    existing = checkpoints(out)
    if not resume:
        if existing:
            raise UserError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose "
                            f"another output directory")
        return None
    if not existing:
        raise UserError(f"nothing to resume: {out} holds no checkpoint")
    found = newest_intact(out, log)
    if found is None:
        raise UserError(f"nothing to resume: every checkpoint in {out} is damaged (moved aside as *.damaged)")
    return found


def _starting_checkpoint(out: Path, rt: Runtime, resume: bool, log) -> Path | None:
    """None for a new run; with resume, the newest intact checkpoint, chosen by the main process (which moves
    damaged ones aside and says so) for all."""
    choice = None
    if rt.main:
        try:
            choice = _choose_checkpoint(out, resume, log)
        except UserError as e:
            choice = e
    choice = rt.broadcast(choice)
    if isinstance(choice, UserError):
        raise UserError(str(choice))
    return choice


def train(cfg: TrainConfig, *, resume: bool = False, log=print) -> dict:
    """Runs (or with resume=True continues, from the newest intact checkpoint in cfg.out_dir) the training of
    cfg. Returns the last metrics: {"step", "loss", "val_loss", "val_ppl", "unigram_val_loss", "checkpoint", ...}.
    Raises RunStopped when the run ends early (see the module docstring)."""
    cfg.check()
    rt = distributed.start(cfg.device, cfg.dtype)
    try:
        with fast_paths(compile=cfg.compile):
            return _train(cfg, rt, resume, log if rt.main else (lambda *a, **k: None))
    finally:
        distributed.stop()


def _train(cfg: TrainConfig, rt: Runtime, resume: bool, log) -> dict:
    out = Path(cfg.out_dir)
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--wandb needs Weights & Biases: pip install wandb") from None
    _check_writable(out, rt)
    for warning in cfg.warnings():
        log(f"warning: {warning}")
    micro, accum = split_batch(cfg.batch_size, cfg.micro_batch_size, rt.world_size)
    if cfg.init_from is not None:
        cfg = _with_init(cfg)
    ckpt = _starting_checkpoint(out, rt, resume, log)
    corpus = Corpus(cfg.corpus, cfg.text_field, cfg.val_fraction, val_source=cfg.val_corpus)
    if ckpt is not None:
        _check_resumable(cfg, ckpt, corpus)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = prepare(cfg, corpus, rt, log)
    corpus_files = corpus.stamps()
    train_shard, val_shard = data.split("train"), data.split("val")
    loader = PackedLoader(train_shard, cfg.seq_len, cfg.batch_size, seed=cfg.seed, rank=rt.rank,
                          world_size=rt.world_size, resets=not cfg.stream_windows)
    if cfg.init_from is not None and ckpt is None:
        model = load_pretrained(cfg.init_from)[0].train().to(rt.device)
        log(f"weights from {cfg.init_from}")
    else:  # a new model, or the one a resumed run loads below
        model = build(cfg, data).to(rt.device)
    if cfg.activation_checkpointing:
        model.checkpoint_activations()
    wrapped = distributed.wrap(model, rt, cfg.parallel)
    optimizer, scheduler = make_optimizer(model, cfg)
    step, counters = 0, {"tokens": 0, "skipped_steps": 0, "nonfinite_streak": 0}
    if ckpt is not None:
        state = load_checkpoint(ckpt, wrapped, optimizer, scheduler, loader, rt)
        step = state["step"]
        counters.update(state["counters"])
        log(f"resumed from {ckpt} (step {step})")
    skip = SkipNonFinite(optimizer, rt.device, counters["skipped_steps"], counters["nonfinite_streak"])
    n_params = sum(p.numel() for p in unwrap(model).parameters())
    budget = f" ({cfg.tokens:,d} tokens asked for)" if cfg.tokens else ""
    log(f"model {cfg.model}: {n_params / 1e6:.2f}M parameters (vocabulary {data.vocab_size}); {rt.world_size} "
        f"process(es) on {rt.device.type}, {cfg.parallel if rt.distributed else 'single'}; {cfg.batch_size} x "
        f"{cfg.seq_len} tokens per step ({accum} accumulation step(s) of {micro} per process); {cfg.steps} steps"
        f"{budget}, {cfg.schedule} schedule")
    flops_per_token, peak = _flops(unwrap(model), n_params, cfg.seq_len, rt)

    metrics = MetricsLog(out, rt.main, cfg.tensorboard, step if ckpt is not None else None,
                         wandb=cfg.to_dict() if cfg.wandb else None)
    last: dict = {"step": step, "unigram_val_loss": data.meta["unigram_val_loss"]}
    saved = step if ckpt is not None else None  # the step of the newest checkpoint this run has
    checked = step  # the step at which the skip counts were last read
    bar = None
    if rt.main and cfg.progress and sys.stdout.isatty() and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)

    def save() -> None:
        nonlocal saved
        last["checkpoint"] = str(save_checkpoint(out, step, wrapped, optimizer, scheduler, loader, data.tokenizer,
                                                 cfg, rt, counters, cfg.keep_last, corpus_files))
        saved = step

    def say(text: str) -> None:
        if bar is not None:
            bar.write(text)
        else:
            log(text)

    def check_finite() -> int:
        """Reads the skip counts (a host synchronisation); RunStopped after max_nonfinite_steps in a row."""
        nonlocal checked
        skipped, streak, longest = skip.read()
        if skipped > counters["skipped_steps"]:
            steps = f"step {step}" if checked + 1 == step else f"steps {checked + 1}-{step}"
            say(f"{steps}: skipped {skipped - counters['skipped_steps']} step(s) with a non-finite loss or gradient "
                f"({skipped} in all)")
        counters.update(skipped_steps=skipped, nonfinite_streak=streak)
        checked = step
        if longest >= cfg.max_nonfinite_steps:
            raise RunStopped(f"stopped at step {step}: {longest} steps in a row had a non-finite loss or gradient "
                             f"and were skipped (max_nonfinite_steps={cfg.max_nonfinite_steps}); {_intact(out)}, "
                             f"with the weights from before them: lower --lr or raise --warmup-steps")
        return skipped

    tokens_per_step = cfg.batch_size * cfg.seq_len
    busy, steps_last = 0.0, 0  # seconds spent in training steps since the last log (validation, saving excluded)
    wrapped.train()
    try:
        with StopRequests() as stop:
            while step < cfg.steps:
                t0 = time.perf_counter()
                position = loader.state_dict()
                batch = next(loader)
                # the processes agree on stopping in the sum that counts the batch's targets
                n_targets, stops = rt.all_sum([count_targets(batch["position_ids"]), float(stop.received is not None)])
                if stops:
                    loader.load_state_dict(position)  # the batch goes back: the run resumes at it
                    check_finite()
                    if saved != step:
                        save()
                    why = stop.received or "a signal to another process"
                    raise RunStopped(f"stopped by {why} at step {step}, saved in {out / f'step-{step:06d}'}: the "
                                     f"same command with --resume continues", PREEMPTED)
                if hasattr(model, "set_inner_lr_warmup"):
                    model.set_inner_lr_warmup(warmup_progress(step, cfg))
                # the ids go to the GPU without the host waiting for it; the positions stay on the CPU, where the
                # model reads the documents' boundaries from them (also without waiting)
                ids, pos = to_device(batch["input_ids"], rt.device), batch["position_ids"]
                loss_sum = torch.zeros((), device=rt.device)
                for i in range(accum):
                    sl = slice(i * micro, (i + 1) * micro)
                    with grad_sync(wrapped, i == accum - 1):
                        with rt.autocast():
                            out_ = wrapped(input_ids=ids[sl], labels=ids[sl], position_ids=pos[sl],
                                           loss_reduction="sum")
                        (out_.loss * (rt.world_size / n_targets)).backward()
                    loss_sum += out_.loss.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2
                loss = rt.sum_(loss_sum) / n_targets
                skip.before_step(loss, grad_norm)
                lr = scheduler.get_last_lr()[0]  # this step's; the schedule moves on to the next step's below
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                steps_last += 1
                counters["tokens"] += tokens_per_step
                log_now = step % cfg.log_every == 0 or step == cfg.steps
                eval_now = step % cfg.eval_every == 0 or step == cfg.steps
                save_now = step % cfg.save_every == 0 or step == cfg.steps
                if log_now or eval_now or save_now:
                    skipped = check_finite()
                busy += time.perf_counter() - t0
                last["step"] = step
                if log_now:
                    rec = {"step": step, "loss": float(loss), "lr": lr,
                           "grad_norm": float(grad_norm), "skipped_steps": skipped, "tokens": counters["tokens"],
                           "tokens_per_s": steps_last * tokens_per_step / busy}
                    if peak is not None:
                        rec["mfu"] = rec["tokens_per_s"] * flops_per_token / (peak * rt.world_size)
                    if rt.device.type == "cuda":
                        rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
                    metrics.write(rec)
                    last.update(rec)
                    busy, steps_last = 0.0, 0
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    else:
                        log(_log_line(rec, cfg.steps))
                if bar is not None:
                    bar.update(1)
                if eval_now:
                    val = evaluate(wrapped, val_shard, cfg.seq_len, cfg.batch_size, micro, cfg.eval_batches, rt,
                                   resets=not cfg.stream_windows)
                    metrics.write({"step": step, **val})
                    last.update(val)
                    say(f"step {step}: validation loss {val['val_loss']:.4f} (perplexity {val['val_ppl']:.1f})")
                if save_now:
                    save()
    except OSError as e:
        raise RunStopped(f"{e}; {_intact(out)}") from None
    except RuntimeError as e:
        how = lost_peer(e) if rt.distributed else None
        if how is None:
            raise
        raise RunStopped(f"process {rt.rank} of {rt.world_size} lost another process of the run after step {step} "
                         f"({how}): it died or was killed, its own log says why; {_intact(out)}: --resume "
                         f"continues") from None
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    return last
