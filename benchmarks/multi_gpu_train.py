"""Multi-GPU training benchmark: one GPU, torchrun DDP and torchrun FSDP2 on the same model, data and global batch.

Each configuration trains `--steps` optimizer steps of (per-GPU batch x N GPUs) sequences on the standard
library corpus (no network needed); the one-GPU run reaches the same global batch by gradient accumulation, so
all three see identical data and should reach the same loss. Prints, per configuration, the final training and
validation loss, tokens/s (global, training steps only, first logged interval excluded) and peak GPU memory of
rank 0.

    PYTHONPATH=src python benchmarks/multi_gpu_train.py --gpus 2 --preset ttt_linear-small --seq-len 1024 \
        --batch-per-gpu 8 --steps 60
    PYTHONPATH=src python benchmarks/multi_gpu_train.py --gpus 4 --preset ttt_linear-760m --seq-len 2048 \
        --batch-per-gpu 4 --steps 30 --activation-checkpointing --configs ddp,fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_config(name: str, args, n: int, out: Path) -> dict:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    log_every = max(1, args.steps // 10)
    train = ["-m", "tttlm", "train", "--model", args.preset, "--corpus", args.corpus, "--vocab-size",
             str(args.vocab_size), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_per_gpu * n),
             "--micro-batch-size", str(args.batch_per_gpu), "--steps", str(args.steps), "--lr", str(args.lr),
             "--warmup-steps", str(max(1, args.steps // 10)), "--log-every", str(log_every), "--eval-every",
             str(args.steps), "--eval-batches", "4", "--save-every", str(10 * args.steps), "--keep-last", "1",
             "--no-tensorboard", "--no-progress", "--out-dir", str(run_dir), "--seed", "0"]
    if args.activation_checkpointing:
        train.append("--activation-checkpointing")
    env = dict(os.environ, TTTLM_CACHE=str(out / "cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    if name == "1gpu":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *train,
               "--parallel", name]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        return {"config": name, "error": f"exit {proc.returncode}\n{tail}"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if "loss" in r]
    timed = train_recs[1:] or train_recs
    result = {
        "config": name,
        "gpus": 1 if name == "1gpu" else n,
        "loss": train_recs[-1]["loss"],
        "val_loss": next((r["val_loss"] for r in reversed(records) if "val_loss" in r), float("nan")),
        "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed),
        "peak_mem_gb": max(r.get("peak_mem_gb", 0.0) for r in train_recs),
        "wall_s": wall,
    }
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=None, help="N GPUs for DDP and FSDP (default: all visible)")
    p.add_argument("--preset", default="ttt_linear-small")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-per-gpu", type=int, default=8, help="sequences per GPU and forward pass")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--configs", default="1gpu,ddp,fsdp", help="comma-separated subset of 1gpu, ddp, fsdp")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-multi-gpu"))
    p.add_argument("--keep-runs", action="store_true", help="keep run directories (checkpoints, metrics)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    import torch

    n = args.gpus or torch.cuda.device_count()
    if n < 1:
        sys.exit("no GPU visible: pass --gpus N to run N CPU processes (gloo) instead, as a smoke test")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (gloo)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.preset}, seq_len {args.seq_len}, {args.batch_per_gpu} sequences per GPU, global batch "
          f"{args.batch_per_gpu * n} x {args.seq_len} tokens, {args.steps} steps; {n} GPUs: "
          f"{device}; torch {torch.__version__}", flush=True)
    results = []
    for name in args.configs.split(","):
        r = run_config(name.strip(), args, n, out)
        results.append(r)
        if "error" in r:
            print(f"{name}: FAILED {r['error']}", flush=True)
        else:
            print(f"{r['config']:5s} gpus {r['gpus']}  loss {r['loss']:.4f}  val {r['val_loss']:.4f}  "
                  f"tokens/s {r['tokens_per_s']:,.0f}  peak mem {r['peak_mem_gb']:.2f} GiB  wall {r['wall_s']:.0f} s",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
