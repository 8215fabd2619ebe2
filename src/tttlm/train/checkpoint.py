"""Checkpoints: one directory per saved step, written atomically, the last k kept.

    out_dir/step-000200/
      config.json, model.safetensors   the model, loadable with AutoModelForCausalLM.from_pretrained after
                                       `import tttlm.models` (weights in float32, tied embeddings stored once)
      tokenizer.json (+ transformers tokenizer files)
      train.json                       the TrainConfig of the run
      trainer_state.pt                 optimizer, scheduler, data-loader position, step and token counters
      rng-{rank}.pt                    each process's RNG states (python, numpy, torch, CUDA)
      data.json                        the corpus files' sizes and times, to refuse resuming on a changed corpus
      manifest.json                    every other file's size and SHA-256 (`tttlm.train.manifest`), written last

Everything is written to a hidden temporary directory that is renamed into place at the end, so a run killed
mid-save leaves the previous checkpoints intact and never a partial one; a write that fails (a full disk)
removes the temporary directory and leaves the earlier checkpoints as they were. Loading checks the files
against the manifest, which finds a checkpoint damaged later (an interrupted copy, a disk error). Works the
same for one process, DDP and FSDP2 (full, unsharded state dicts gathered to CPU).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tttlm.data.tokenizer import save_tokenizer
from tttlm.errors import CheckpointError
from tttlm.train.distributed import Runtime, unwrap
from tttlm.train.manifest import MANIFEST, damage, write_manifest

_STEP_DIR = re.compile(r"^step-(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoints(out_dir: str | Path) -> list[Path]:
    """The checkpoint directories of a run, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _is_checkpoint(path: Path) -> bool:
    return bool(_STEP_DIR.match(path.name)) or any((path / f).is_file() for f in (MANIFEST, "config.json"))


def resolve_checkpoint(path: str | Path, hashes: bool = False) -> Path:
    """A checkpoint directory, or the latest one inside a run directory, checked against its manifest (sizes;
    SHA-256 too with hashes=True). FileNotFoundError when there is none; CheckpointError naming the damaged
    file (and the newest intact checkpoint beside it) when it is damaged."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: it is not a directory")
    if _is_checkpoint(path):
        ckpt, siblings = path, checkpoints(path.parent)
    else:
        siblings = checkpoints(path)
        if not siblings:
            raise FileNotFoundError(f"no checkpoint at {str(path)!r} (expected a run directory with step-* "
                                    f"checkpoints, or one checkpoint directory)")
        ckpt = siblings[-1]
    problem = damage(ckpt, hashes)
    if problem is not None:
        older = siblings[: siblings.index(ckpt)] if ckpt in siblings else []
        intact = next((s for s in reversed(older) if damage(s) is None), None)
        hint = f"; {intact} is intact" if intact is not None else ""
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {problem}{hint}")
    return ckpt


def newest_intact(out_dir: Path, log=print) -> Path | None:
    """The newest checkpoint of a run whose files all match their manifest (sizes and SHA-256). Each damaged
    one met on the way is renamed step-NNNNNN.damaged (out of the way of `checkpoints` and of the next run's
    saves, kept for inspection), and the log says so."""
    for ckpt in reversed(checkpoints(out_dir)):
        t0 = time.perf_counter()
        problem = damage(ckpt, hashes=True, resume=True)
        if problem is None:
            if (ckpt / MANIFEST).is_file():
                size = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
                log(f"checked {ckpt.name} against its manifest: {size / 1e6:,.1f} MB in "
                    f"{time.perf_counter() - t0:.1f} s")
            return ckpt
        aside = ckpt.with_name(ckpt.name + ".damaged")
        shutil.rmtree(aside, ignore_errors=True)
        ckpt.rename(aside)
        log(f"skipped {ckpt}: {problem}; moved it to {aside.name}")
    return None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _reason(e: BaseException) -> str:
    """The operating system's words for a failed write ("No space left on device"): torch.save hides its OSError
    in the exception's context, safetensors its error number in the message."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        return cause.strerror or str(cause)
    number = re.search(r"os error (\d+)", str(e))
    return os.strerror(int(number.group(1))) if number else f"{type(e).__name__}: {e}"


def _write(path: Path, write) -> None:
    """write(path), any failure (each writer reports a full disk its own way) an OSError naming the file."""
    try:
        write(path)
    except Exception as e:
        raise OSError(f"cannot write {path}: {_reason(e)}") from e


def _save_torch(obj, path: Path) -> None:
    with open(path, "wb") as f:  # a file object, so that the OSError of a full disk reaches _reason
        torch.save(obj, f)


def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, scheduler, loader, tokenizer, cfg, rt: Runtime,
                    counters: dict, keep_last: int, corpus_files: dict) -> Path:
    """Writes out_dir/step-{step:06d} (collective: every process calls it) and deletes all but the last
    keep_last checkpoints. corpus_files: `Corpus.stamps()` of the training corpus (data.json, checked on
    resume). Returns the directory; an OSError on every process when any of them could not write, the earlier
    checkpoints untouched and no temporary directory left."""
    out = Path(out_dir)
    final = out / f"step-{step:06d}"
    tmp = out / f".tmp-step-{step:06d}"
    model_sd = get_model_state_dict(model, options=_FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)

    def prepare() -> None:
        if rt.main:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
            except OSError as e:
                raise OSError(f"cannot create {tmp}: {e.strerror}") from e

    def write() -> None:
        _write(tmp / f"rng-{rt.rank}.pt", lambda p: _save_torch(_rng_state(), p))
        if not rt.main:
            return
        config = unwrap(model).config
        if config.tie_word_embeddings:
            model_sd.pop("lm_head.weight", None)
        tensors = {k: v.contiguous() for k, v in model_sd.items()}
        _write(tmp / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        _write(tmp / "config.json", lambda p: config.save_pretrained(str(p.parent)))
        _write(tmp / "tokenizer.json", lambda p: save_tokenizer(tokenizer, p.parent))
        _write(tmp / "train.json", lambda p: p.write_text(json.dumps(cfg.to_dict(), indent=1)))
        _write(tmp / "data.json", lambda p: p.write_text(json.dumps({"corpus_files": corpus_files})))
        state = {"optimizer": optim_sd, "scheduler": scheduler.state_dict(), "loader": loader.state_dict(),
                 "step": step, "counters": counters, "world_size": rt.world_size}
        _write(tmp / "trainer_state.pt", lambda p: _save_torch(state, p))

    def publish() -> None:  # the manifest lists every process's files, so it waits for the write phase
        if not rt.main:
            return
        _write(tmp / MANIFEST, lambda p: write_manifest(p.parent, step))
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
        for old in checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # every process learns after each phase whether any failed, so that none waits for one that gave up
    for phase in (prepare, write, publish):
        error = None
        try:
            phase()
        except OSError as e:
            error = str(e)
        error = rt.first_error(error)
        if error is not None:
            if rt.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(error)
    return final


def load_weights(path: Path) -> dict:
    return load_file(str(Path(path) / "model.safetensors"))


def load_checkpoint(path: Path, model, optimizer, scheduler, loader, rt: Runtime) -> dict:
    """Restores what save_checkpoint wrote into the (wrapped) model, optimizer, scheduler and loader, and this
    process's RNG states (when the world size is unchanged). Returns the trainer state (step, counters)."""
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    set_model_state_dict(model, load_weights(path), options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"])
    rng = path / f"rng-{rt.rank}.pt"
    if state["world_size"] == rt.world_size and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", hashes: bool = False):
    """(model in eval mode, tokenizers.Tokenizer, TrainConfig settings dict or None) of a checkpoint directory
    or the latest checkpoint of a run directory, checked as `resolve_checkpoint` does."""
    import transformers
    from transformers import AutoModelForCausalLM

    import tttlm.models  # noqa: F401  (registers model_type "tttlm" with the Auto classes)
    from tttlm.data.tokenizer import load_tokenizer

    path = resolve_checkpoint(path, hashes)
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
    settings = json.loads((path / "train.json").read_text()) if (path / "train.json").is_file() else None
    return model, load_tokenizer(path / "tokenizer.json"), settings
