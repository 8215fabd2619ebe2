"""TrainConfig: every setting of a training run, read from a TOML file and/or command-line flags."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib

from tttlm.errors import UserError


@dataclass
class TrainConfig:
    """A training run. Batch sizes count sequences of seq_len tokens; steps count optimizer steps."""

    # model: a preset "{mixer}-{size}" and config overrides (vocab_size always comes from the tokenizer)
    model: str = "ttt_linear-tiny"
    model_overrides: dict = field(default_factory=dict)
    # fine-tuning: the weights (and the architecture and tokenizer) of this checkpoint, instead of a new model
    init_from: str | None = None
    # data: see tttlm.data.corpus for the accepted sources ("stdlib": the Python standard library)
    corpus: str = "stdlib"
    val_corpus: str | None = None  # validate on all of this source (and train on all of corpus)
    text_field: str = "text"
    val_fraction: float = 0.05
    tokenizer: str | None = None  # a tokenizer.json to use instead of training one
    vocab_size: int = 4096
    cache_dir: str | None = None  # default: $TTTLM_CACHE or ~/.cache/tttlm
    seq_len: int = 256
    batch_size: int = 16  # global: sequences per optimizer step, over all processes
    micro_batch_size: int | None = None  # at most, per process and forward pass (`split_batch`)
    # optimisation: AdamW, linear warm-up, then a cosine to min_lr_ratio * lr, or (wsd) the peak held until the
    # last decay_fraction of the steps, which decay linearly to min_lr_ratio * lr
    steps: int = 1000
    tokens: int | None = None  # a budget of training tokens instead: steps = ceil(tokens / (batch_size x seq_len))
    lr: float = 3e-3
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    # the TTT authors' choices, off by default: weight decay on every parameter (norms, biases and the inner
    # loop's initial weights too), and training windows cut from the concatenated token stream with no state,
    # convolution or attention reset at document starts (docs/fidelity.md)
    weight_decay_all: bool = False
    stream_windows: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_nonfinite_steps: int = 10  # steps with a non-finite loss or gradient are skipped; this many in a row stop
    seed: int = 0
    # hardware
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 autocast on GPU, float32 on CPU; or "float32", "bfloat16"
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard)
    activation_checkpointing: bool = False
    compile: bool | None = None  # torch.compile of the model's blocks; None: on CUDA only (tttlm.fast)
    # bookkeeping
    out_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 200
    keep_last: int = 2
    tensorboard: bool = True
    wandb: bool = False  # also log to Weights & Biases (pip install wandb; WANDB_MODE=offline works without network)
    wandb_project: str = "tttlm"
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.tokens, int) and not isinstance(self.tokens, bool) and self.tokens > 0 \
                and isinstance(self.batch_size, int) and isinstance(self.seq_len, int):
            self.steps = max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))

    def check(self) -> None:
        """UserError naming the setting for any value out of range."""
        positive = ("vocab_size", "seq_len", "batch_size", "steps", "log_every", "eval_every", "eval_batches",
                    "save_every", "keep_last", "max_nonfinite_steps")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name} must be a positive integer, got {v!r}")
        for name in ("micro_batch_size", "tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UserError(f"{name} must be a positive integer, got {v!r}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.lr <= 0:
            raise UserError("need lr > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.decay_fraction <= 1:
            raise UserError(f"decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
        if self.compile not in (None, True, False):
            raise UserError(f"compile must be true, false or unset (auto: on CUDA), got {self.compile!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise UserError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        if "vocab_size" in self.model_overrides:
            raise UserError("vocab_size comes from the tokenizer: set vocab_size, not model_overrides.vocab_size")
        from tttlm.models import preset_config

        preset_config(self.model, **self.model_overrides)  # ValueError for an unknown preset or field

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def warnings(self) -> list[str]:
        """Settings that are valid but almost certainly not meant."""
        found = []
        if self.warmup_steps >= self.steps:
            found.append(f"warmup_steps ({self.warmup_steps}) >= steps ({self.steps}): the learning rate never "
                         f"reaches its peak {self.lr:g} and the {self.schedule} decay never starts")
        return found


SCHEDULES = ("cosine", "wsd")
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def split_batch(batch_size: int, micro_batch_size: int | None, processes: int) -> tuple[int, int]:
    """(sequences per forward pass and process, accumulation steps) of a global batch of batch_size sequences
    over `processes`: each process takes batch_size / processes rows, in the fewest forward passes of at most
    micro_batch_size rows (None: one pass) that split them evenly. So one config runs on any number of
    processes that divides its batch. UserError when none does."""
    if batch_size % processes:
        raise UserError(f"the batch size {batch_size} must be a multiple of the number of processes ({processes})")
    rows = batch_size // processes
    limit = rows if micro_batch_size is None else min(micro_batch_size, rows)
    micro = max(d for d in range(1, limit + 1) if rows % d == 0)
    return micro, rows // micro


def read_toml(path: str | Path) -> dict:
    """The settings of a TOML config file (top-level keys are TrainConfig fields; [model_overrides] a table)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise UserError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return data


def make_config(base: dict | None = None, **overrides) -> TrainConfig:
    """TrainConfig from the settings `base` (e.g. a TOML file's) updated by overrides that are not None. The
    length of the run is `steps` or `tokens`, whichever the overrides give (base's other one dropped); both in
    one place is a UserError."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for given in (base or {}, overrides):
        if "steps" in given and "tokens" in given:
            raise UserError("give the length of the run as steps or as tokens, not both")
    settings = dict(base or {})
    if "steps" in overrides:
        settings.pop("tokens", None)
    settings.update(overrides)
    unknown = sorted(set(settings) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)}")
    cfg = TrainConfig(**settings)
    cfg.check()
    return cfg
