"""TTTLMForCausalLM: the causal LM of every tttlm mixer, a transformers PreTrainedModel with generate().

Forward inputs are [B, T] token ids. Packed batches (several documents per row, no padding) come as
`cu_seqlens` (int64 [N+1], B == 1) or as `position_ids` that restart at 0 at every document start (any B;
every row start is a document start too). Documents never see each other: recurrent states and convolutions
restart, attention is block-diagonal, and the loss never predicts across a boundary. Prompts of different
lengths for generation come left-padded (zeros at the start of attention_mask rows) and are read packed.
Every call runs through the fast paths of `tttlm.fast` (compiled blocks on CUDA, with or without a cache);
decoding from a cache runs through `tttlm.models.decode` (a CUDA graph of the compiled step on CUDA).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from tttlm.fast import compile_enabled, compiled, fast_paths, kernels_enabled
from tttlm.layers import (
    AttentionMixer,
    Mamba2Mixer,
    MambaMixer,
    MesaMixer,
    PreConv,
    RMSNorm,
    SeqInfo,
    SwiGLU,
    TTTMixer,
)
from tttlm.models import decode
from tttlm.models.cache import TTTLMCache
from tttlm.models.config import TTTLMConfig
from tttlm.ops.linear_cross_entropy import linear_cross_entropy

# transformers 5.24 renamed the decoding cache of forward() and of its outputs from past_key_values to cache
# (generate() passes and reads `cache`); forward takes either, and outputs carry the installed version's field
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# parameters that weight decay must leave alone besides every vector (norm weights, biases, A_log, D, ...):
# the inner loop's initial weights and LayerNorm, its token-scale offset, Mesa's regulariser, and Mamba's A
# (a matrix there, exempt in its reference code)
_NO_DECAY_NAMES = {
    "A_log",
    "W0",
    "b0",
    "W1",
    "b1",
    "W2",
    "b2",
    "ln_weight",
    "ln_bias",
    "token_scale_offset",
    "lamb_param",
}


def make_mixer(config: TTTLMConfig) -> nn.Module:
    m = config.mixer
    if m in ("ttt_linear", "ttt_mlp"):
        return TTTMixer(config, m.removeprefix("ttt_"))
    if m == "mesa":
        return MesaMixer(config)
    if m == "transformer":
        return AttentionMixer(config)
    if m == "mamba2":
        return Mamba2Mixer(config)
    if m == "mamba":
        return MambaMixer(config)
    raise ValueError(f"unknown mixer {m!r}")


class TTTLMBlock(GradientCheckpointingLayer):
    """h + mixer(RMSNorm(h)), then h + SwiGLU(RMSNorm(h)); TTT on the Mamba backbone adds a pre-conv first, and
    Mamba's blocks are the mixer alone (no MLP), as in its paper's models."""

    def __init__(self, config: TTTLMConfig):
        super().__init__()
        ttt_mamba = config.mixer.startswith("ttt_") and config.ttt_backbone == "mamba"
        self.pre_conv = PreConv(config) if ttt_mamba else None
        self.mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = make_mixer(config)
        mlp = config.mixer != "mamba"
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if mlp else None
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size) if mlp else None

    def forward(self, h: Tensor, info: SeqInfo, cache=None) -> Tensor:
        # compiled with or without a cache: the cache's tensors are inputs of the compiled code (a static cache's
        # buffers written in place, see tttlm.models.decode), so one compilation serves every layer and step
        if compile_enabled(h.device):
            return compiled(TTTLMBlock._forward)(self, h, info, cache)
        return self._forward(h, info, cache)

    def _forward(self, h: Tensor, info: SeqInfo, cache=None) -> Tensor:
        if self.pre_conv is not None:
            h = self.pre_conv(h, info, cache)
        h = h + self.mixer(self.mixer_norm(h), info, cache)
        return h if self.mlp is None else h + self.mlp(self.mlp_norm(h))


class TTTLMPreTrainedModel(PreTrainedModel):
    config_class = TTTLMConfig
    config: TTTLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TTTLMBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        if hasattr(module, "init_parameters"):
            module.init_parameters(self.config.initializer_range)
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, verify_hashes: bool = False, **kwargs):
        """transformers' from_pretrained, a local directory first checked against the manifest of a `tttlm train`
        checkpoint (every file's size; SHA-256 too with verify_hashes): a CheckpointError names a damaged file
        rather than the loader failing on it."""
        from tttlm.train.manifest import verify

        if pretrained_model_name_or_path is not None and Path(pretrained_model_name_or_path).is_dir():
            verify(Path(pretrained_model_name_or_path), verify_hashes)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


class TTTLMModel(TTTLMPreTrainedModel):
    """Embeddings, blocks and the final RMSNorm: hidden states [B, T, C]."""

    def __init__(self, config: TTTLMConfig):
        super().__init__(config)
        config.check()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([TTTLMBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, inputs_embeds: Tensor, info: SeqInfo, cache: TTTLMCache | None = None) -> Tensor:
        h = inputs_embeds
        for i, block in enumerate(self.layers):
            h = block(h, info=info, cache=None if cache is None else cache.layers[i])
        if compile_enabled(h.device):
            return compiled(RMSNorm.forward)(self.norm, h)
        return self.norm(h)


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
    """Per-token cross-entropy of the logits hidden @ weight^T, chunk_size tokens at a time.

    hidden [M, C], weight [V, C], targets [M] (all valid). Returns float32 losses [M]. In training each chunk
    is recomputed in the backward pass, so at most chunk_size x V float32 logits exist at any time.
    """

    def chunk_loss(h: Tensor, w: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(F.linear(h, w).float(), t, reduction="none")

    out = []
    for s in range(0, hidden.shape[0], chunk_size):
        args = (hidden[s : s + chunk_size], weight, targets[s : s + chunk_size])
        out.append(checkpoint(chunk_loss, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk_loss(*args))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _checked_cu_seqlens(cu_seqlens: Tensor, B: int, T: int) -> Tensor:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int64 tensor [N+1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int64, got {cu_seqlens.dtype}")
    if B != 1:
        raise ValueError(f"with cu_seqlens, input_ids must be one packed row (B == 1), got B = {B}")
    cu = cu_seqlens.long()
    bounds = cu.tolist()  # cu_seqlens on the CPU spares the host a wait for the GPU here
    if bounds[0] != 0 or bounds[-1] != T or any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens must start at 0, increase strictly and end at T = {T}, got {bounds}")
    return cu


def _left_padding(attention_mask: Tensor, position_ids: Tensor | None) -> Tensor | None:
    """The mask of real tokens [B, T] (bool) of a left-padded batch, None when nothing is padded."""
    keep = attention_mask != 0
    if bool(keep.all()):
        return None
    if not bool(keep[:, -1].all()) or not bool((keep[:, 1:] >= keep[:, :-1]).all()):
        raise ValueError(
            "padding (zeros in attention_mask) must come before each row's tokens (left padding, as with "
            "tokenizer.padding_side = 'left'); to read documents of different lengths side by side, pack them "
            "with cu_seqlens"
        )
    if position_ids is not None:
        counted = keep.long().cumsum(-1) - 1
        if not bool((position_ids.to(keep.device) == counted)[keep].all()):
            raise ValueError("with left padding, position_ids must count each row's tokens from 0 after its padding")
    return keep


def _cu_seqlens_from_positions(position_ids: Tensor) -> Tensor | None:
    """Document boundaries of rows whose positions restart at 0 (None when no row restarts), on position_ids'
    device (the CPU: found without waiting for the GPU). Every row start is a document start as well: a row
    continuing a document from outside the batch starts a fresh state."""
    if position_ids.dim() != 2 or not bool((position_ids[:, 1:] == 0).any()):
        return None
    starts = position_ids == 0
    starts[:, 0] = True
    starts = torch.nonzero(starts.reshape(-1)).flatten()
    return torch.cat([starts, starts.new_tensor([position_ids.numel()])]).long()


class TTTLMForCausalLM(TTTLMPreTrainedModel, GenerationMixin):
    """The causal LM. `tttlm.build_model("ttt_linear-125m")` builds one from a preset."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TTTLMConfig):
        super().__init__(config)
        self.model = TTTLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward creates its own TTTLMCache when asked to cache

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def checkpoint_activations(self) -> None:
        """Recompute each block in the backward pass instead of keeping its activations (non-reentrant)."""
        # transformers renamed gradient_checkpointing_enable in 5.2x (the old name warns); keep both working
        enable = getattr(self, "activation_checkpointing_enable", None) or self.gradient_checkpointing_enable
        enable({"use_reentrant": False})

    @property
    def checkpointing_activations(self) -> bool:
        return any(block.gradient_checkpointing for block in self.model.layers)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: TTTLMCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: Tensor | None = None,
        logits_to_keep: int = 0,
        loss_reduction: str = "mean",
        return_dict: bool | None = None,
        cache: TTTLMCache | None = None,
        **kwargs,
    ):
        """input_ids [B, T] (or inputs_embeds [B, T, C]).

        labels [B, T]: the loss predicts labels[t + 1] at position t (shifted here; -100 ignored; never across
            a document boundary); loss_reduction "mean", "sum" or "none" ([B, T] float32, 0 where ignored).
            With labels, logits are not computed (the loss is chunked so full float32 logits never exist).
        cu_seqlens / position_ids: packed documents (see the module docstring); on the CPU (as the trainer
            passes them) the documents are read without the host waiting for the GPU. attention_mask: ones, or
            zeros only before each row's tokens (left padding, e.g. prompts of different lengths for generate()):
            the rows are then read packed, logits at padded positions are zeros, and labels are not accepted.
        use_cache / past_key_values (or cache, its name from transformers 5.24 on): decoding; with
            use_cache=True and no cache a TTTLMCache is created and returned. After a left-padded or cu_seqlens
            call the cache holds one row per sequence, each at its own length (cu_seqlens with
            logits_to_keep=1 then gives each sequence's last logits, [N, 1, V]). A call that continues a cache
            runs as `tttlm.models.decode.plan` decides (a CUDA graph on CUDA); while decoding, only the new
            tokens' columns of attention_mask must be ones, and position_ids are ignored (the cache knows
            every row's position). logits_to_keep: compute logits for the last n positions only (0: all).
        Returns CausalLMOutputWithPast(loss, logits [B, T or n, V], and the cache as `CACHE_FIELD`).
        Other keyword arguments (as generate() may pass) must be None or False.
        """
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and v is not False and k != "cache_position")
        if unsupported:
            raise ValueError(f"TTTLMForCausalLM.forward does not support {', '.join(unsupported)}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, C]")
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        given = input_ids if inputs_embeds is None else inputs_embeds[..., 0]  # [B, T]
        if given.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, T], got {list(given.shape)}")
        B, T = given.shape
        if labels is not None and labels.shape != (B, T):
            raise ValueError(f"labels must have shape [B, T] = [{B}, {T}], got {list(labels.shape)}")
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the decoding cache as past_key_values or as cache, not both")
        past_key_values = past_key_values if cache is None else cache  # the local `cache` below is the one used
        if past_key_values is not None and not isinstance(past_key_values, TTTLMCache):
            raise ValueError(
                f"past_key_values (or cache) must be a TTTLMCache, got {type(past_key_values).__name__}"
            )
        use_cache = past_key_values is not None if use_cache is None else use_cache
        if self.training and self.checkpointing_activations:
            use_cache = False  # a checkpointed block runs twice, and would advance its cache twice
        cache = None
        if use_cache:
            cache = past_key_values if past_key_values is not None else TTTLMCache(self.config.num_hidden_layers)

        if cache is not None and cache.seen_tokens > 0:  # continues the cache
            if attention_mask is not None and not bool((attention_mask[:, -T:] != 0).all()):
                raise ValueError("while decoding, attention_mask must be ones for the new tokens (only left padding)")
            if cu_seqlens is not None:
                raise ValueError("packed batches (cu_seqlens) cannot continue a decoding cache")
            how = decode.plan(self, cache, T, inputs_embeds is None)
            if how != "eager":
                if labels is not None:
                    raise ValueError("labels are not supported while decoding on a static cache")
                logits = decode.decode_step(self, cache, input_ids, inputs_embeds, graph=how == "graph",
                                            logits_to_keep=logits_to_keep)
                out = CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: cache})
                return out if return_dict is not False else out.to_tuple()

        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        keep = None
        if attention_mask is not None and (cache is None or cache.seen_tokens == 0):
            keep = _left_padding(attention_mask.to(x.device), position_ids)
        if keep is not None and (labels is not None or cu_seqlens is not None):
            raise ValueError("a left-padded batch (zeros in attention_mask) takes no labels and no cu_seqlens")
        if cu_seqlens is not None:
            cu = _checked_cu_seqlens(cu_seqlens, B, T)
        elif keep is not None:
            cu = F.pad(keep.sum(1).cumsum(0), (1, 0))
            x = x[keep]
        elif position_ids is not None and (cache is None or cache.seen_tokens == 0):
            cu = _cu_seqlens_from_positions(position_ids)
            if cu is not None and cache is not None:
                raise ValueError("restarting position_ids cannot fill a decoding cache: pack with cu_seqlens")
        else:
            cu = None
        if cu is not None:
            # FlexAttention's document mask serves training and evaluation, whose packed batches keep their
            # length (it compiles for each new one); a prefill attends per document
            flex = self.config.mixer == "transformer" and cache is None
            info = SeqInfo.packed(cu, x.device, attention=flex)
            x = x.reshape(1, -1, x.shape[-1])
        else:
            info = SeqInfo.contiguous(B, T, 0 if cache is None else cache.seen_tokens, x.device)
        mixer = self.model.layers[0].mixer
        if hasattr(mixer, "rope_tables"):  # every layer's, built once here, outside the compiled blocks
            info.rope = mixer.rope_tables(info.pos)

        h = self.model(x, info, cache)
        last_of_each = cu is not None and cache is not None and keep is None and logits_to_keep == 1
        if cache is not None and cu is not None:  # a packed prefill: one row per sequence, at its own length
            cache.positions = info.cu_seqlens[1:] - info.cu_seqlens[:-1]
            cache.seen_tokens = T if keep is not None else int((cu[1:] - cu[:-1]).max())
        elif cache is not None:
            cache.seen_tokens += T
        h = h.new_zeros(B, T, h.shape[-1]).index_put_((keep,), h[0]) if keep is not None else h.reshape(B, T, -1)

        loss = logits = None
        if labels is not None:
            loss = self._loss(h, labels, info.cu_seqlens, loss_reduction)
        elif last_of_each:
            logits = self.lm_head(h[0, info.cu_seqlens[1:] - 1][:, None])
        else:
            logits = self.lm_head(h if not logits_to_keep else h[:, -logits_to_keep:])
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        return out if return_dict is not False else out.to_tuple()

    def _loss(self, h: Tensor, labels: Tensor, cu: Tensor | None, reduction: str) -> Tensor:
        B, T, C = h.shape
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]
        if cu is not None:  # the token before a document start predicts nothing
            flat = targets.view(-1)
            flat[cu[1:-1] - 1] = -100
        if kernels_enabled(h.device) and not (reduction == "none" and torch.is_grad_enabled()):
            # the fused loss of every position, ignored ones included: no host sync to find the valid ones
            out = linear_cross_entropy(
                h.reshape(-1, C), self.lm_head.weight, targets.reshape(-1), reduction="none" if reduction == "none"
                else "sum"
            )
            if reduction == "none":
                return out.view(B, T)
            return out if reduction == "sum" else out / (targets != -100).sum().clamp_min(1)
        valid = torch.nonzero(targets.reshape(-1) != -100).flatten()
        losses = chunked_cross_entropy(
            h.reshape(-1, C)[valid],
            self.lm_head.weight,
            targets.reshape(-1)[valid],
            self.config.loss_chunk_size,
        )
        if reduction == "none":
            return losses.new_zeros(B * T).index_put((valid,), losses).view(B, T)
        total = losses.sum() + 0.0 * h.sum()  # keeps the graph when no position is valid
        return total if reduction == "sum" else total / max(1, valid.numel())

    @torch.no_grad()
    def mixer_op_inputs(self, input_ids: Tensor, cu_seqlens: Tensor | None = None) -> list[dict | None]:
        """For inner-loop telemetry: per block, the keyword arguments its TTT or Mesa layer passes to its op
        (`layer.op_inputs`, see TTTMixer / MesaMixer) while reading input_ids [B, T] from the sequence start;
        None for the other mixers. Runs one forward pass without gradients."""
        captured: list[Tensor] = []
        hooks = [
            b.mixer.register_forward_pre_hook(lambda mod, args: captured.append(args[0])) for b in self.model.layers
        ]
        try:
            with fast_paths(compile=False):  # the hooks see every layer's input as plain PyTorch runs it
                self(input_ids, cu_seqlens=cu_seqlens)
        finally:
            for h in hooks:
                h.remove()
        return [
            b.mixer.op_inputs(x, cu_seqlens) if hasattr(b.mixer, "op_inputs") else None
            for b, x in zip(self.model.layers, captured, strict=True)
        ]

    def set_inner_lr_warmup(self, progress: float) -> float:
        """Warm the TTT inner base learning rate from config.ttt_base_lr_init to config.ttt_base_lr, linearly
        in progress in [0, 1] (the paper warms TTT-MLP's from 0.01 to 0.1 with the outer learning rate).
        Returns the base learning rate now in use; a no-op for other mixers."""
        p = min(1.0, max(0.0, float(progress)))
        c = self.config
        lr = c.ttt_base_lr_init + (c.ttt_base_lr - c.ttt_base_lr_init) * p
        for m in self.modules():
            if isinstance(m, TTTMixer):
                m.lr_scale = lr / m.base_lr
        return lr

    def no_weight_decay_names(self) -> set[str]:
        """Names of the parameters that weight decay must skip: every vector (norm weights, biases, Mamba2's
        A_log / D / dt_bias, Mamba's D / dt_bias), Mamba's A_log, the TTT inner loop's initial weights (W0, b0
        or W1, b1, W2, b2), its LayerNorm and token-scale offset, and Mesa's regulariser parameter."""
        return {n for n, p in self.named_parameters() if p.dim() < 2 or n.rsplit(".", 1)[-1] in _NO_DECAY_NAMES}
