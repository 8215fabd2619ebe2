"""Train a language model on a text corpus (CPU, one GPU, or several under torchrun).

Settings come from a TOML file (--config, see configs/) and/or flags; flags win (a default shown below is
TrainConfig's, used when neither sets it). Without either, a tiny TTT-Linear learns the Python standard library's
own source on the CPU. Checkpoints go to --out-dir (step-NNNNNN/, the last --keep-last kept), metrics to
out-dir/metrics.jsonl, TensorBoard (out-dir/tb) and, with --wandb, Weights & Biases. On a terminal a progress
bar shows the run; elsewhere (a log file, a scheduler) it prints a plain line every --log-every steps.

examples:
  tttlm train --config configs/cpu-ttt_linear-tiny.toml
  tttlm train --model ttt_mlp-small --corpus 'data/**/*.txt' --seq-len 512 --tokens 50M --out-dir runs/mlp
  tttlm train --config configs/cpu-ttt_linear-tiny.toml --resume          # continue after an interruption
  tttlm train --init-from runs/mlp --corpus notes.jsonl --lr 3e-4 --steps 200 --out-dir runs/mlp-notes
  tttlm train --corpus hf:wikitext:wikitext-103-raw-v1 --val-corpus hf:wikitext:wikitext-103-raw-v1:validation
  torchrun --nproc-per-node 2 -m tttlm train --config configs/gpu-ttt_linear-125m.toml --parallel fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import re

from tttlm.eval.options import CORPUS_HELP, DEVICE_HELP, DTYPES, device_name

_HELP = {
    "model": "model preset {mixer}-{size}: mixers ttt_linear, ttt_mlp, mesa, transformer, mamba2, mamba; sizes "
             "tiny, small, 125m, 350m, 760m, 1.3b; or mesa-paper-{size}",
    "init_from": "fine-tune: start from this checkpoint's weights (a checkpoint or run directory), with its "
                 "architecture and tokenizer; a new optimizer and schedule (default: a new model)",
    "corpus": CORPUS_HELP,
    "val_corpus": "validate on every document of this source (any --corpus form) and train on every document of "
                  "--corpus (default: hold out --val-fraction of --corpus)",
    "text_field": "field of .jsonl records / column of parquet and datasets holding the text",
    "val_fraction": "fraction of documents held out for validation (by hash of their path)",
    "tokenizer": "an existing tokenizer.json (default: train a byte-level BPE on the corpus)",
    "vocab_size": "vocabulary size of the trained tokenizer",
    "cache_dir": "where tokenizers and token shards are cached (default $TTTLM_CACHE or ~/.cache/tttlm)",
    "seq_len": "tokens per training sequence (documents are packed, boundaries kept unless --stream-windows)",
    "batch_size": "sequences per optimizer step, over all processes (global)",
    "micro_batch_size": "sequences per forward pass and process, at most: each process takes batch-size / "
                        "processes rows in the fewest passes of at most this many that split them evenly, "
                        "accumulating gradients (default: one pass)",
    "steps": "optimizer steps",
    "tokens": "the length of the run as training tokens instead of --steps (e.g. 2.5B, 300M, 5e8): steps = "
              "ceil(tokens / (batch-size x seq-len)) (default: use --steps)",
    "lr": "peak learning rate",
    "schedule": "learning-rate schedule after the warm-up: cosine (to --min-lr-ratio at the last step), or wsd "
                "(warmup-stable-decay: the peak until the last --decay-fraction of the steps, then linear)",
    "min_lr_ratio": "final learning rate as a fraction of the peak",
    "warmup_steps": "linear warm-up steps",
    "decay_fraction": "wsd: fraction of the steps in the final decay",
    "weight_decay": "AdamW weight decay (never on norms, biases, lambda or the inner loop's initial weights)",
    "weight_decay_all": "weight decay on every parameter, as the TTT authors (default: none on norms, biases, "
                        "lambda or the inner loop's initial weights)",
    "stream_windows": "train on windows of the concatenated token stream with no resets at document starts (states, "
                      "convolutions and attention flow across documents), as the TTT authors",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "gradient clipping norm",
    "max_nonfinite_steps": "a step with a non-finite loss or gradient is skipped; this many in a row stop the run",
    "seed": "seed of the model initialisation and the data order",
    "device": DEVICE_HELP,
    "dtype": "compute dtype, under autocast (weights and optimizer in float32); auto: bfloat16 on CUDA, float32 "
             "elsewhere",
    "parallel": "under torchrun: ddp, or fsdp (FSDP2, for models that do not fit one GPU)",
    "activation_checkpointing": "recompute each block in the backward pass to save memory",
    "compile": "torch.compile the model's blocks; --no-compile runs them as plain PyTorch, as TTTLM_COMPILE=0 "
               "does (default: on CUDA only)",
    "out_dir": "run directory: checkpoints, metrics.jsonl, tb/",
    "log_every": "steps between metric records",
    "eval_every": "steps between validations",
    "eval_batches": "batches of each validation",
    "save_every": "steps between checkpoints",
    "keep_last": "checkpoints kept",
    "tensorboard": "also write TensorBoard logs",
    "wandb": "also log to Weights & Biases (pip install wandb; WANDB_MODE=offline logs without a network)",
    "wandb_project": "the Weights & Biases project (the run is named after --out-dir)",
    "progress": "a progress bar when stdout and stderr are terminals; --no-progress: plain log lines there too "
                "(elsewhere always plain lines, every --log-every steps, and each validation)",
}
_CHOICES = {"dtype": list(DTYPES), "parallel": ["ddp", "fsdp"], "schedule": ["cosine", "wsd"]}
_METAVARS = {"corpus": "SOURCE", "val_corpus": "SOURCE", "init_from": "CHECKPOINT", "tokenizer": "JSON",
             "cache_dir": "DIR", "out_dir": "DIR", "tokens": "N"}
_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def token_count(text: str) -> int:
    """A number of tokens: 500000000, 5e8, 500M, 2.5B (k, M, B or G, T)."""
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([kmbgt]?)", text.strip().lower().replace("_", ""))
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a number of tokens such as 500M, 2.5B or 5e8, got {text!r}")
    value = round(float(m.group(1)) * _SUFFIXES.get(m.group(2), 1))
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens, got {text!r}")
    return value


def _default(f) -> str:
    """The help's note of a TrainConfig field's default."""
    import dataclasses

    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), _value(value.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tttlm.train.config import FIELDS

    parser.add_argument("--config", metavar="TOML", help="a TOML file of settings (see configs/; default: none)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    for name, f in FIELDS.items():
        if name == "model_overrides":
            parser.add_argument("--set", dest="model_overrides", action="append", type=_override, metavar="FIELD=VALUE",
                                help="override a model config field, e.g. --set num_hidden_layers=4 (repeatable; "
                                     "default: the preset's values)")
            continue
        flag = "--" + name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        text = _HELP[name] if "(default" in _HELP[name] else f"{_HELP[name]} (default: {_default(f)})"
        if kind.startswith("bool"):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            conv = {"device": device_name, "tokens": token_count}.get(name) or (
                int if kind.startswith("int") else float if kind.startswith("float") else str)
            parser.add_argument(flag, dest=name, type=conv, default=None, choices=_CHOICES.get(name),
                                metavar=_METAVARS.get(name), help=text)


def run(args: argparse.Namespace) -> int:
    from tttlm.train.config import FIELDS, make_config, read_toml
    from tttlm.train.trainer import train

    base = read_toml(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in FIELDS if name != "model_overrides"}
    if args.model_overrides:
        flags["model_overrides"] = {**base.get("model_overrides", {}), **dict(args.model_overrides)}
    cfg = make_config(base, **flags)
    result = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun the first process reports
        return 0
    if "loss" not in result:
        print(f"{cfg.out_dir} is already at step {result['step']} of {cfg.steps}: nothing to train (raise --steps "
              f"or --tokens)")
        return 0
    line = f"step {result['step']}: train loss {result['loss']:.4f}"
    if "val_loss" in result:
        line += (f", validation loss {result['val_loss']:.4f} (perplexity {result['val_ppl']:.1f}); "
                 f"unigram baseline {result['unigram_val_loss']:.4f}")
    print(line)
    if "checkpoint" in result:
        print(f"checkpoint: {result['checkpoint']}")
    return 0
