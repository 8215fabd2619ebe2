"""TTTLMConfig: one transformers config for every mixer of tttlm (model_type "tttlm")."""

from __future__ import annotations

from transformers import PretrainedConfig

MIXERS = ("ttt_linear", "ttt_mlp", "mesa", "transformer", "mamba2", "mamba")
MESA_FORGET_BIAS_INITS = ("spread", "zero")
MAMBA_D_STATE = {"mamba": 16, "mamba2": 128}  # the papers' state sizes (Mamba: 16, Mamba-2: 128)
TTT_BASE_LR = {"ttt_linear": 1.0, "ttt_mlp": 0.1}  # the paper's inner base learning rates
TTT_MLP_BASE_LR_INIT = 0.01  # TTT-MLP's base lr is warmed up from here with the outer learning rate


class TTTLMConfig(PretrainedConfig):
    """A causal LM of `num_hidden_layers` pre-norm blocks (RMSNorm, mixer, RMSNorm, SwiGLU MLP), tied
    embeddings; "mamba" blocks have no MLP (RMSNorm, mixer), as in Mamba's own models, and ignore
    intermediate_size.

    mixer: "ttt_linear", "ttt_mlp", "mesa", "transformer", "mamba2" or "mamba". Width, depth, heads and MLP size
    use the transformers names. Mixer options:
      TTT: ttt_backbone "mamba" (shared q/k + convs + pre-conv, the paper's default) or "transformer";
        mini_batch_size; ttt_base_lr (default 1.0 for TTT-Linear, 0.1 for TTT-MLP) and ttt_base_lr_init (the
        start of its warm-up: 0.01 for TTT-MLP, else ttt_base_lr), see TTTLMForCausalLM.set_inner_lr_warmup.
      Mesa: mesa_cg_max_iter (CG steps, 30), mesa_cg_tol (early stop outside training; None: never),
        mesa_gate_cap (a cap on the forget gate for repeated tokens, off by default), mesa_output_gate (the
        gate silu(x W_g) on the normed output; on by default, off in MesaNet's reference layer),
        mesa_forget_bias_init ("spread": the forget gates' biases give gates from 0.9 to 0.999 across heads;
        "zero": gates near 0.5, as the reference layer's default init). docs/fidelity.md compares them.
      Mamba2: mamba_d_state (default 128), mamba_headdim, mamba_expand, mamba_ngroups, mamba_chunk_size.
      Mamba: mamba_d_state (default 16), mamba_expand, mamba_dt_rank (default ceil(hidden_size / 16)).
    conv_kernel: width of every short causal convolution. loss_chunk_size: tokens per chunk of the
    cross-entropy (full float32 logits are never built for more tokens than this).
    """

    model_type = "tttlm"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    mixer: str = "ttt_linear"
    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    conv_kernel: int = 4
    ttt_backbone: str = "mamba"
    mini_batch_size: int = 16
    ttt_base_lr: float | None = None
    ttt_base_lr_init: float | None = None
    mesa_cg_max_iter: int = 30
    mesa_cg_tol: float | None = None
    mesa_gate_cap: bool = False
    mesa_output_gate: bool = True
    mesa_forget_bias_init: str = "spread"
    mamba_d_state: int | None = None
    mamba_dt_rank: int | None = None
    mamba_headdim: int = 64
    mamba_expand: int = 2
    mamba_ngroups: int = 1
    mamba_chunk_size: int = 64
    loss_chunk_size: int = 1024

    def __post_init__(self, **kwargs):
        if self.ttt_base_lr is None:
            self.ttt_base_lr = TTT_BASE_LR.get(self.mixer, 1.0)
        if self.ttt_base_lr_init is None:
            self.ttt_base_lr_init = TTT_MLP_BASE_LR_INIT if self.mixer == "ttt_mlp" else self.ttt_base_lr
        if self.mamba_d_state is None:
            self.mamba_d_state = MAMBA_D_STATE.get(self.mixer, MAMBA_D_STATE["mamba2"])
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """ValueError naming the field for any inconsistent setting."""
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {', '.join(MIXERS)}; got {self.mixer!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "conv_kernel",
            "mini_batch_size",
            "mesa_cg_max_iter",
            "mamba_d_state",
            "mamba_headdim",
            "mamba_expand",
            "mamba_ngroups",
            "mamba_chunk_size",
            "loss_chunk_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads = {self.num_attention_heads} must divide hidden_size = {self.hidden_size}"
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if self.mixer in ("transformer", "ttt_linear", "ttt_mlp") and head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got hidden_size / num_attention_heads = {head_dim}")
        if self.ttt_backbone not in ("mamba", "transformer"):
            raise ValueError(f"ttt_backbone must be 'mamba' or 'transformer', got {self.ttt_backbone!r}")
        if not self.ttt_base_lr > 0 or not self.ttt_base_lr_init > 0:
            raise ValueError(
                f"ttt_base_lr and ttt_base_lr_init must be > 0, got {self.ttt_base_lr}, {self.ttt_base_lr_init}"
            )
        if self.mamba_dt_rank is not None and (isinstance(self.mamba_dt_rank, bool) or not isinstance(
                self.mamba_dt_rank, int) or self.mamba_dt_rank < 1):
            raise ValueError(f"mamba_dt_rank must be None or a positive integer, got {self.mamba_dt_rank!r}")
        if self.mesa_forget_bias_init not in MESA_FORGET_BIAS_INITS:
            raise ValueError(f"mesa_forget_bias_init must be one of {', '.join(MESA_FORGET_BIAS_INITS)}, "
                             f"got {self.mesa_forget_bias_init!r}")
        if self.mesa_cg_tol is not None and not self.mesa_cg_tol >= 0:
            raise ValueError(f"mesa_cg_tol must be None or >= 0, got {self.mesa_cg_tol!r}")
        if self.mixer == "mamba2":
            d_inner = self.mamba_expand * self.hidden_size
            if d_inner % self.mamba_headdim:
                raise ValueError(
                    f"mamba_headdim = {self.mamba_headdim} must divide mamba_expand * hidden_size = {d_inner}"
                )
            if (d_inner // self.mamba_headdim) % self.mamba_ngroups:
                raise ValueError(
                    f"mamba_ngroups = {self.mamba_ngroups} must divide the number of SSM heads "
                    f"{d_inner // self.mamba_headdim}"
                )
