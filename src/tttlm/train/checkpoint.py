"""Checkpoints: one directory per saved step, written atomically, the last k kept.

    out_dir/step-000200/
      config.json, model.safetensors   the model, loadable with AutoModelForCausalLM.from_pretrained after
                                       `import tttlm.models` (weights in float32, tied embeddings stored once)
      tokenizer.json (+ transformers tokenizer files)
      train.json                       the TrainConfig of the run
      trainer_state.pt                 optimizer, scheduler, data-loader position, step and token counters
      rng-{rank}.pt                    each process's RNG states (python, numpy, torch, CUDA)

Everything is written to a hidden temporary directory that is renamed into place at the end, so a run killed
mid-save leaves the previous checkpoints intact and never a partial one. Works the same for one process, DDP and
FSDP2 (full, unsharded state dicts gathered to CPU).
"""

from __future__ import annotations

import json
import random
import re
import shutil
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
from tttlm.train.distributed import Runtime, unwrap

_STEP_DIR = re.compile(r"^step-(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoints(out_dir: str | Path) -> list[Path]:
    """The checkpoint directories of a run, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest one inside a run directory; FileNotFoundError when there is none."""
    path = Path(path).expanduser()
    if (path / "model.safetensors").is_file():
        return path
    found = checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint at {str(path)!r} (expected a run directory with step-* "
                                f"checkpoints, or one checkpoint directory)")
    return found[-1]


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


def save_checkpoint(out_dir: str | Path, step: int, model, optimizer, scheduler, loader, tokenizer, cfg, rt: Runtime,
                    counters: dict, keep_last: int) -> Path:
    """Writes out_dir/step-{step:06d} (collective: every process calls it) and deletes all but the last
    keep_last checkpoints. Returns the directory."""
    out = Path(out_dir)
    final = out / f"step-{step:06d}"
    tmp = out / f".tmp-step-{step:06d}"
    model_sd = get_model_state_dict(model, options=_FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if rt.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    rt.barrier()
    torch.save(_rng_state(), tmp / f"rng-{rt.rank}.pt")
    rt.barrier()
    if rt.main:
        config = unwrap(model).config
        if config.tie_word_embeddings:
            model_sd.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        save_tokenizer(tokenizer, tmp)
        (tmp / "train.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        torch.save({"optimizer": optim_sd, "scheduler": scheduler.state_dict(), "loader": loader.state_dict(),
                    "step": step, "counters": counters, "world_size": rt.world_size}, tmp / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
        for old in checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    rt.barrier()
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


def load_pretrained(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizers.Tokenizer, TrainConfig settings dict or None) of a checkpoint directory
    or the latest checkpoint of a run directory."""
    import transformers
    from transformers import AutoModelForCausalLM

    import tttlm.models  # noqa: F401  (registers model_type "tttlm" with the Auto classes)
    from tttlm.data.tokenizer import load_tokenizer

    path = resolve_checkpoint(path)
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
    settings = json.loads((path / "train.json").read_text()) if (path / "train.json").is_file() else None
    return model, load_tokenizer(path / "tokenizer.json"), settings
