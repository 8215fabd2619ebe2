"""Show the model presets: parameter counts beside the papers' nominal sizes.

Counts are exact (tied embeddings counted once) and computed on the meta device, so nothing is allocated. They
hold an embedding of --vocab-size tokens: the presets' 32000 (the papers' Llama-2 tokenizer) unless told
otherwise. `tttlm train` sizes the embedding to its tokenizer's vocabulary (--vocab-size there, 4096 by default),
so the count it prints differs from this one unless both use the same vocabulary.

examples:
  tttlm info --sizes 125m
  tttlm info --sizes tiny --mixers ttt_linear --vocab-size 4096     # as `tttlm train` counts its default model
"""

from __future__ import annotations

from tttlm.eval.options import positive_int


def add_arguments(parser) -> None:
    parser.add_argument("--sizes", nargs="*", default=None,
                        help="sizes to show (default: all: tiny small 125m 350m 760m 1.3b)")
    parser.add_argument("--mixers", nargs="*", default=None,
                        help="mixers to show (default: all: ttt_linear ttt_mlp mesa transformer mamba2 mamba; mesa "
                             "also shows its mesa-paper presets)")
    parser.add_argument("--vocab-size", type=positive_int, default=None,
                        help="vocabulary the counts include (default: each preset's own, 32000)")


def run(args) -> int:
    from tttlm.models import MIXERS, NOMINAL, SIZES, count_parameters, preset_config
    from tttlm.models.presets import PAPER_SIZES, PAPER_VARIANTS

    sizes = args.sizes or list(SIZES)
    mixers = args.mixers or list(MIXERS)
    for s in sizes:
        if s not in SIZES:
            raise ValueError(f"unknown size {s!r}; sizes: {', '.join(SIZES)}")
    for m in mixers:
        if m not in MIXERS:
            raise ValueError(f"unknown mixer {m!r}; mixers: {', '.join(MIXERS)}")
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    vocabs = {preset_config(f"{m}-{s}", **overrides).vocab_size for m in mixers for s in sizes}
    print(f"parameters with a vocabulary of {', '.join(map(str, sorted(vocabs)))} tokens (embedding tied to the "
          f"output; `tttlm train` counts its tokenizer's vocabulary)")
    print(f"{'preset':<20} {'nominal':>8} {'params':>14} {'vs nominal':>10}  width x layers, heads, mlp")
    for s in sizes:
        counts = {}
        names = [f"{m}-{s}" for m in mixers]
        names += [f"{m}-paper-{s}" for m in mixers if m in PAPER_VARIANTS and s in PAPER_SIZES]
        for name in names:
            c = preset_config(name, **overrides)
            n = counts[name] = count_parameters(c)
            nominal = NOMINAL[s]
            nom = "-" if nominal is None else _human(nominal)
            ratio = "-" if nominal is None else f"{n / nominal:.3f}"
            shape = f"{c.hidden_size} x {c.num_hidden_layers}, {c.num_attention_heads}, {c.intermediate_size}"
            if c.mixer == "mamba":
                shape = f"{c.hidden_size} x {c.num_hidden_layers}, no MLP"
            print(f"{name:<20} {nom:>8} {n:>14,} {ratio:>10}  {shape}")
        if len(counts) > 1:
            spread = max(counts.values()) / min(counts.values()) - 1
            print(f"{'':<20} {'':>8} spread across mixers at {s}: {100 * spread:.1f}%")
    return 0


def _human(n: float) -> str:
    return f"{n / 1e9:g}B" if n >= 1e9 else f"{n / 1e6:g}M"
