"""Continue a prompt with a trained checkpoint, printing the text as it is generated.

examples:
  tttlm generate runs/quickstart --prompt "def fibonacci(n):"
  tttlm generate runs/quickstart/step-001000 --prompt "import " --max-new-tokens 400 --temperature 0.7
"""

from __future__ import annotations

import argparse

from tttlm.eval.options import add_device, add_verify


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0: greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_device(parser)
    add_verify(parser)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from tttlm.data.tokenizer import as_transformers, eos_id
    from tttlm.train.checkpoint import load_pretrained

    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0:
        raise ValueError("--max-new-tokens must be positive, --temperature and --top-k non-negative")
    from tttlm.eval.checkpoints import resolve_device

    device = resolve_device(args.device)
    model, tok, _ = load_pretrained(args.checkpoint, device, args.verify)
    eos = eos_id(tok)
    # a prompt continues a document; the empty prompt starts one right after an end of text
    ids = [eos] + tok.encode(args.prompt, add_special_tokens=False).ids if args.prompt else [eos]
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    streamer = TextStreamer(as_transformers(tok), skip_prompt=False, skip_special_tokens=True)
    model.generate(torch.tensor([ids], device=device), max_new_tokens=args.max_new_tokens, do_sample=sample,
                   temperature=args.temperature if sample else None, top_k=args.top_k if sample else None,
                   eos_token_id=eos, pad_token_id=eos, streamer=streamer)
    return 0
