"""Train a language model on a text corpus (CPU, one GPU, or several under torchrun).

Settings come from a TOML file (--config, see configs/) and/or flags; flags win. Without either, a tiny
TTT-Linear learns the Python standard library's own source on the CPU. Checkpoints go to --out-dir
(step-NNNNNN/, the last --keep-last kept), metrics to out-dir/metrics.jsonl and TensorBoard (out-dir/tb).

examples:
  tttlm train --config configs/cpu-ttt_linear-tiny.toml
  tttlm train --model ttt_mlp-small --corpus 'data/**/*.txt' --seq-len 512 --steps 2000 --out-dir runs/mlp
  tttlm train --config configs/cpu-ttt_linear-tiny.toml --resume          # continue after an interruption
  torchrun --nproc-per-node 2 -m tttlm train --config configs/gpu-ttt_linear-125m.toml --parallel fsdp
"""

from __future__ import annotations

import argparse
import json
import os

_HELP = {
    "model": "model preset {mixer}-{size}: mixers ttt_linear, ttt_mlp, mesa, transformer, mamba2, mamba; sizes "
             "tiny, small, 125m, 350m, 760m, 1.3b; or mesa-paper-{size} (default ttt_linear-tiny)",
    "corpus": "'stdlib' (the Python standard library's .py files), 'python' (every .py file installed with the "
              "interpreter, duplicates removed), a directory, a glob, a .txt/.jsonl/.parquet file, or a saved "
              "`datasets` dataset",
    "text_field": "field of .jsonl records / column of parquet and datasets holding the text",
    "val_fraction": "fraction of documents held out for validation (by hash of their path)",
    "tokenizer": "an existing tokenizer.json (default: train a byte-level BPE on the corpus)",
    "vocab_size": "vocabulary size of the trained tokenizer",
    "cache_dir": "where tokenizers and token shards are cached (default $TTTLM_CACHE or ~/.cache/tttlm)",
    "seq_len": "tokens per training sequence (documents are packed, boundaries kept unless --stream-windows)",
    "batch_size": "sequences per optimizer step, over all processes",
    "micro_batch_size": "sequences per forward pass and process (gradient accumulation makes up the rest)",
    "steps": "optimizer steps",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate as a fraction of the peak (cosine decay)",
    "warmup_steps": "linear warm-up steps",
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
    "device": "auto, cpu or cuda",
    "dtype": "auto (bfloat16 autocast on GPU, float32 on CPU), float32 or bfloat16",
    "parallel": "under torchrun: ddp, or fsdp (FSDP2, for models that do not fit one GPU)",
    "activation_checkpointing": "recompute each block in the backward pass to save memory",
    "compile": "torch.compile the model's blocks (default: on CUDA only); --no-compile runs them as plain PyTorch",
    "out_dir": "run directory: checkpoints, metrics.jsonl, tb/",
    "log_every": "steps between metric records",
    "eval_every": "steps between validations",
    "eval_batches": "batches of each validation",
    "save_every": "steps between checkpoints",
    "keep_last": "checkpoints kept",
    "tensorboard": "also write TensorBoard logs",
    "progress": "show a progress bar",
}
_CHOICES = {"device": ["auto", "cpu", "cuda"], "dtype": ["auto", "float32", "bfloat16"], "parallel": ["ddp", "fsdp"]}


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

    parser.add_argument("--config", metavar="TOML", help="a TOML file of settings (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    for name, f in FIELDS.items():
        if name == "model_overrides":
            parser.add_argument("--set", dest="model_overrides", action="append", type=_override, metavar="FIELD=VALUE",
                                help="override a model config field, e.g. --set num_hidden_layers=4 (repeatable)")
            continue
        flag = "--" + name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind.startswith("bool"):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=_HELP[name])
        else:
            conv = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, dest=name, type=conv, default=None, choices=_CHOICES.get(name),
                                help=_HELP[name])


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
        print(f"{cfg.out_dir} is already at step {result['step']} of {cfg.steps}: nothing to train (raise --steps)")
        return 0
    line = f"step {result['step']}: train loss {result['loss']:.4f}"
    if "val_loss" in result:
        line += (f", validation loss {result['val_loss']:.4f} (perplexity {result['val_ppl']:.1f}); "
                 f"unigram baseline {result['unigram_val_loss']:.4f}")
    print(line)
    if "checkpoint" in result:
        print(f"checkpoint: {result['checkpoint']}")
    return 0
