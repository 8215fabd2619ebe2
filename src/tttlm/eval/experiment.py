"""Experiments: one TOML file is one run of the comparisons in docs/results.md, trained and evaluated in one
command, its results written as small JSON files (never a checkpoint) under OUT/<name>/.

An experiment file (configs/experiments/; the run's name is the file's stem) holds:
  base = "other.toml"     settings it extends (a path relative to the file; its tables merge key by key)
  kind = "lm" or "recall"
  kind "lm": every `tttlm train` setting (TrainConfig fields), and
    lr_from = [names]     take lr from the run, among these (already under OUT), with the lowest validation loss
    [validation]          seq_len, max_sequences (0: the whole split), batch_size: the final validation loss
    [positions], [ladder], [telemetry]   options of those commands (flag names with '_' for '-'), run on the
                          trained checkpoint; telemetry only for TTT and Mesa models
  kind "recall": [recall], options of `tttlm recall`; one process per mixer, side by side (these small models
    leave the GPU mostly idle), each stopped after time_limit_s (its finished runs are kept and its recall.json
    says complete: false), then merged with `tttlm recall --merge`
OUT/<name>/experiment.json records the exact command, every setting, the parameter counts, the corpus, the
training curve and speed, the validation loss and each evaluation's own command and time; the evaluation
commands write their JSON and PNG beside it, and the corpus manifest (`Corpus.manifest`) goes once per corpus to
OUT/corpus/. The checkpoint lives in a scratch directory, deleted at the end.
"""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
import subprocess
import time
import traceback
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tttlm.errors import UserError

KINDS = ("lm", "recall")
EVALS = ("positions", "ladder", "telemetry")
_INNER = ("ttt_linear", "ttt_mlp", "mesa")  # mixers with an inner loop to report on
_OWN = {"base", "kind", "lr_from", "validation", *EVALS}
_RECALL_OWN = {"base", "kind", "recall", "time_limit_s"}
_VALIDATION = {"seq_len": None, "max_sequences": 0, "batch_size": 8}


def load_spec(path: str | Path) -> dict:
    """The settings of an experiment file with its base files merged (the file's own values win; tables merge
    key by key), plus "name" (the file's stem) and "file"."""
    path = Path(path)
    spec = _read(path, [])
    spec["kind"] = spec.get("kind", "lm")
    if spec["kind"] not in KINDS:
        raise UserError(f"{path}: kind must be one of {', '.join(KINDS)}, got {spec['kind']!r}")
    if spec["kind"] == "lm":
        from tttlm.train.config import FIELDS

        unknown = sorted(set(spec) - set(FIELDS) - _OWN)
        if unknown:
            raise UserError(f"{path}: unknown setting(s) {', '.join(unknown)} (TrainConfig fields, or {sorted(_OWN)})")
        unknown = sorted(set(spec.get("validation", {})) - set(_VALIDATION))
        if unknown:
            raise UserError(f"{path}: unknown [validation] setting(s) {', '.join(unknown)}; known: "
                            f"{', '.join(_VALIDATION)}")
    else:
        unknown = sorted(set(spec) - _RECALL_OWN)
        if unknown:
            raise UserError(f"{path}: unknown setting(s) {', '.join(unknown)} of a recall experiment (known: "
                            f"{', '.join(sorted(_RECALL_OWN))})")
        if not spec.get("recall", {}).get("mixers"):
            raise UserError(f"{path}: a recall experiment needs a [recall] table (options of `tttlm recall`) "
                            f"that names its mixers")
    return {**spec, "name": path.stem, "file": str(path)}


def _read(path: Path, chain: list[Path]) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"experiment file {str(path)!r} does not exist")
    if path.resolve() in chain:
        raise UserError(f"{path}: its base files include itself")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read(path.parent / base, [*chain, path.resolve()])
    for key, value in data.items():
        both_tables = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both_tables else value
    return merged


def command_args(options: dict) -> list[str]:
    """Command-line arguments of a table of options: {"num_docs": 8, "seq_len": [2048, 8192]} ->
    ["--num-docs", "8", "--seq-len", "2048", "8192"]; true adds the bare flag, false leaves it out."""
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            continue
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _cli(argv: list[str]) -> tuple[str, str | None]:
    """Runs `tttlm ARGV` in this process: ("ok", None), or ("failed", why) without raising."""
    from tttlm.cli import main

    try:
        code = main(argv)
    except Exception as e:  # one evaluation failing (e.g. out of memory) must not lose the others
        traceback.print_exc()
        return "failed", f"{type(e).__name__}: {e}"
    return ("ok", None) if code == 0 else ("failed", f"exit status {code}")


def run_experiment(config: str | Path, out_root: str | Path, work_root: str | Path, log=print) -> dict:
    """Runs the experiment of file `config` (see the module docstring); results under out_root/<name>/, the
    checkpoint under work_root/<name>/ (emptied first, deleted after). Returns the experiment.json record,
    whose "status" is "ok" or "failed" (the training failed, its "error" says why; or an evaluation failed, the
    others still ran)."""
    from tttlm.eval.results import write_result

    spec = load_spec(config)
    out = Path(out_root) / spec["name"]
    if (out / "experiment.json").is_file():
        raise UserError(f"{out} already holds the results of {spec['name']}: move them away to run it again")
    record = {
        "name": spec["name"],
        "experiment": spec["kind"],
        "config_file": spec["file"],
        "command": shlex.join(["tttlm", "experiment", str(config), "--out-dir", str(out_root)]),
        "git_commit": _git_commit(),
        "settings": {k: v for k, v in spec.items() if k not in ("name", "file")},
    }
    t0 = time.perf_counter()
    if spec["kind"] == "recall":
        record.update(_run_recall(spec, out, Path(work_root) / spec["name"], log))
    else:
        record.update(_run_lm(spec, Path(out_root), out, Path(work_root) / spec["name"], log))
    ok = "error" not in record and all(e["status"] == "ok" for e in record["evaluations"].values())
    record["status"] = "ok" if ok else "failed"
    record["seconds"] = time.perf_counter() - t0
    path = write_result(out, "experiment", "experiment", record)
    log(f"{spec['name']}: {record['status']} in {record['seconds']:.0f} s; wrote {path}")
    return json.loads(path.read_text())


def _eval_record(argv: list[str], status: str, error: str | None, seconds: float, checkpoint: str = "") -> dict:
    shown = ["CHECKPOINT" if a == checkpoint else a for a in argv]
    rec = {"command": shlex.join(["tttlm", *shown]), "status": status, "seconds": seconds}
    if error is not None:
        rec["error"] = error
    return rec


def best_lr(out_root: Path, names: list[str]) -> tuple[float, str]:
    """The lr of the run among `names` (their experiment.json under out_root) with the lowest validation
    loss, and that run's name."""
    found, missing = [], []
    for name in names:
        f = out_root / name / "experiment.json"
        if not f.is_file():
            missing.append(name)
            continue
        r = json.loads(f.read_text())
        loss = (r.get("validation") or {}).get("loss")
        if loss is not None:
            found.append((loss, r["train"]["lr"], name))
    if missing:
        raise UserError(f"lr_from: run these first (no results under {out_root}): {', '.join(missing)}")
    if not found:
        raise UserError(f"lr_from: none of {', '.join(names)} has a finite validation loss")
    _, lr, name = min(found)
    return lr, name


def train_config(spec: dict, **forced):
    """The TrainConfig of an lm experiment's settings, with `forced` settings on top."""
    from tttlm.train.config import FIELDS, make_config

    return make_config({k: v for k, v in spec.items() if k in FIELDS}, **forced)


def _run_lm(spec: dict, out_root: Path, out: Path, work: Path, log) -> dict:
    import torch

    from tttlm.data.corpus import Corpus
    from tttlm.data.shards import prepare_data
    from tttlm.eval.checkpoints import Checkpoint
    from tttlm.eval.results import environment
    from tttlm.models.presets import count_parameters, preset_config
    from tttlm.train import distributed
    from tttlm.train.metrics import read_metrics
    from tttlm.train.trainer import evaluate, train

    forced = dict(out_dir=str(work), save_every=spec.get("steps", 1000), keep_last=1, tensorboard=False)
    chosen = None
    if spec.get("lr_from"):
        lr, chosen = best_lr(out_root, list(spec["lr_from"]))
        forced["lr"] = lr
        log(f"lr {lr:g}: the best of {', '.join(spec['lr_from'])} ({chosen})")
    cfg = train_config(spec, **forced)
    shutil.rmtree(work, ignore_errors=True)

    corpus = Corpus(cfg.corpus, cfg.text_field, cfg.val_fraction, val_source=cfg.val_corpus)
    data = prepare_data(corpus, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, cache_dir=cfg.cache_dir, log=log)
    manifest = out_root / "corpus" / f"{Path(corpus.source).name}-{corpus.fingerprint()[:12]}.json"
    if not manifest.is_file():
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps(corpus.manifest(), indent=1) + "\n")
        log(f"wrote the corpus manifest {manifest}")
    model_cfg = preset_config(cfg.model, vocab_size=data.vocab_size, **cfg.model_overrides)
    params = count_parameters(model_cfg)

    t0 = time.perf_counter()
    try:
        result = train(cfg, log=log)
    except Exception as e:  # a diverging sweep point is a result too: recorded, then the next one runs
        traceback.print_exc()
        result = {"step": None, "error": f"{type(e).__name__}: {e}"}
    train_seconds = time.perf_counter() - t0
    records = read_metrics(work)
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    record = {
        "train": {**cfg.to_dict(), "lr_chosen_from": chosen},
        "model": {"mixer": model_cfg.mixer, "parameters": params,
                  "non_embedding_parameters": params - data.vocab_size * model_cfg.hidden_size,
                  **{k: getattr(model_cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                        "intermediate_size")}},
        "data": {"corpus": corpus.source, "fingerprint": corpus.fingerprint(), "manifest": manifest.name,
                 "vocab_size": data.vocab_size, "documents": data.meta["documents"], "tokens": data.meta["tokens"],
                 "unigram_val_loss": data.meta["unigram_val_loss"]},
        "training": {
            "steps": result["step"], "tokens": result["step"] and result["step"] * cfg.batch_size * cfg.seq_len,
            "seconds": train_seconds, "final_loss": result.get("loss"),
            # the first log interval holds compilation and warm-up: left out when there are others
            "tokens_per_s": statistics.median(speeds[1:] or speeds) if speeds else None,
            "peak_mem_gb": max((r["peak_mem_gb"] for r in records if "peak_mem_gb" in r), default=None),
            "curve": [{k: r[k] for k in ("step", "tokens", "loss", "lr")} for r in records if "loss" in r],
            "val_curve": [{"step": r["step"], "tokens": r["step"] * cfg.batch_size * cfg.seq_len,
                           "val_loss": r["val_loss"]} for r in records if "val_loss" in r],
        },
    }

    if "error" in result:
        shutil.rmtree(work, ignore_errors=True)
        return {**record, "error": result["error"], "validation": None, "evaluations": {}}
    ckpt = Checkpoint(work)
    val = {**_VALIDATION, **spec.get("validation", {})}
    val["seq_len"] = val["seq_len"] or cfg.seq_len
    t1 = time.perf_counter()
    rt = distributed.start(cfg.device, cfg.dtype)
    model = ckpt.load(rt.device)
    shard = data.split("val")
    windows = shard.num_tokens // val["seq_len"]
    sequences = min(windows, val["max_sequences"] or windows)
    v = evaluate(model, shard, val["seq_len"], sequences, val["batch_size"], 1, rt)
    del model
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    record["validation"] = {"seq_len": val["seq_len"], "sequences": sequences, "loss": v["val_loss"],
                            "perplexity": v["val_ppl"], "tokens": v["val_tokens"],
                            "seconds": time.perf_counter() - t1}
    log(f"validation loss at {val['seq_len']}: {v['val_loss']:.4f} over {v['val_tokens']:,d} tokens")

    evaluations = {}
    for name in EVALS:
        if name not in spec or (name == "telemetry" and model_cfg.mixer not in _INNER):
            continue
        argv = [name, str(ckpt.path), *command_args(spec[name]), "--out-dir", str(out)]
        log(f"running: tttlm {shlex.join(argv)}")
        t2 = time.perf_counter()
        status, error = _cli(argv)
        evaluations[name] = _eval_record(argv, status, error, time.perf_counter() - t2, str(ckpt.path))
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()
    record["evaluations"] = evaluations
    record["environment"] = environment(rt.device)
    shutil.rmtree(work, ignore_errors=True)
    return record


def _run_recall(spec: dict, out: Path, work: Path, log) -> dict:
    import os
    import sys

    import torch

    from tttlm.eval.results import environment

    options = dict(spec["recall"])
    mixers = options.pop("mixers")
    limit = spec.get("time_limit_s")
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    procs, evaluations = {}, {}
    for mixer in mixers:
        argv = ["recall", "--mixers", mixer, *command_args(options), "--out-dir", str(work / mixer)]
        log(f"starting: tttlm {shlex.join(argv)}")
        procs[mixer] = (argv, time.perf_counter(), subprocess.Popen([sys.executable, "-m", "tttlm", *argv], env=env))
    for mixer, (argv, t0, proc) in procs.items():
        left = None if limit is None else max(1.0, limit - (time.perf_counter() - t0))
        try:
            code = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:  # by design: the runs it finished are in its recall.json
            proc.kill()
            proc.wait()
            code = None
        ok = code in (0, None)
        rec = _eval_record(argv, "ok" if ok else "failed", None if ok else f"exit status {code}",
                           time.perf_counter() - t0)
        evaluations[f"recall-{mixer}"] = {**rec, "stopped_at_time_limit": code is None}
    parts = [str(work / m) for m in mixers if (work / m / "recall.json").is_file()]
    argv = ["recall", "--merge", *parts, "--out-dir", str(out)]
    t0 = time.perf_counter()
    status, error = _cli(argv) if parts else ("failed", "no mixer finished a run")
    evaluations["merge"] = _eval_record(argv, status, error, time.perf_counter() - t0)
    shutil.rmtree(work, ignore_errors=True)
    return {"evaluations": evaluations,
            "environment": environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))}


def probe(configs: list[str | Path], steps: int, work_root: str | Path, log=print) -> list[dict]:
    """Trains each lm experiment for `steps` steps only (no evaluation) to measure its speed: per config
    {"name", "model", "seq_len", "tokens_per_s", "train_minutes" (projected for the full run's steps, training
    only)}, or {"name", "error"} when its training failed."""
    from tttlm.train.metrics import read_metrics
    from tttlm.train.trainer import train

    rows = []
    for config in configs:
        spec = load_spec(config)
        if spec["kind"] != "lm":
            continue
        work = Path(work_root) / f"probe-{spec['name']}"
        shutil.rmtree(work, ignore_errors=True)
        full = train_config(spec)
        cfg = train_config(spec, out_dir=str(work), steps=steps, warmup_steps=0, log_every=max(1, steps // 4),
                           eval_every=steps, eval_batches=1, save_every=steps, keep_last=1, tensorboard=False)
        try:
            train(cfg, log=log)
        except Exception as e:  # one configuration failing (out of memory, divergence) must not hide the others
            traceback.print_exc()
            rows.append({"name": spec["name"], "error": f"{type(e).__name__}: {e}"})
            continue
        finally:
            speeds = [r["tokens_per_s"] for r in read_metrics(work) if "tokens_per_s" in r]
            shutil.rmtree(work, ignore_errors=True)
        tok_s = statistics.median(speeds[1:] or speeds)
        minutes = full.steps * full.batch_size * full.seq_len / tok_s / 60
        rows.append({"name": spec["name"], "model": full.model, "seq_len": full.seq_len, "tokens_per_s": tok_s,
                     "train_minutes": minutes})
        log(f"{spec['name']}: {tok_s:,.0f} tokens/s; the full run's training would take {minutes:.1f} min")
    return rows
