"""Inner-loop telemetry of TTT and Mesa layers: inner losses, gradient norms, CG iterations and residuals.

TTT layers: per layer and mini-batch, the self-supervised loss under the initial inner weights, before and
after the mini-batch's update, and the inner gradient and update norms, from a float32 re-run of the inner
loop on the layer's own op inputs (checked against the op's outputs); non-finite values are counted and the
first mini-batch holding one is named. Mesa layers: CG iterations to reach each --tolerances value and the
residual at the stop. Writes telemetry_<checkpoint>.json and .png per checkpoint. All documents are read in
one forward call.

examples:
  tttlm telemetry runs/ttt runs/mesa --seq-len 2048 --out-dir out/
"""

from __future__ import annotations

from tttlm.eval.options import add_device, add_documents, add_out_dir, add_seq_len, positive_float, positive_int


def add_arguments(parser) -> None:
    add_documents(parser, num_docs=2, batch_size=False)
    add_seq_len(parser, 2048, "tokens read from each document's start", deprecated=("--context",), nargs=None)
    parser.add_argument(
        "--tolerances",
        type=positive_float,
        nargs="+",
        default=[1e-2, 1e-3, 1e-4, 1e-5, 1e-6],
        help="Mesa: CG relative-residual tolerances to measure",
    )
    parser.add_argument("--max-iter", type=positive_int, default=30, help="Mesa: CG iterations at most")
    add_device(parser, "dtype of the model's weights")
    add_out_dir(parser)


def run(args) -> int:
    import re

    from tttlm.eval.checkpoints import Checkpoint, resolve_device, resolve_dtype
    from tttlm.eval.plots import plot_telemetry
    from tttlm.eval.results import environment, write_result
    from tttlm.eval.telemetry import model_telemetry

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    for ckpt in [Checkpoint(p, args.verify) for p in args.checkpoints]:
        name = ckpt.name
        model = ckpt.load(device, dtype)
        ids = ckpt.documents(args.corpus, args.seq_len, args.num_docs, args.cache_dir)
        layers = model_telemetry(model, ids, args.tolerances, args.max_iter)
        for layer in layers:
            if layer["mixer"] == "mesa":
                its = ", ".join(f"{s['tolerance']}: {s['iterations']}" for s in layer["solves"])
                print(f"{name} layer {layer['layer']} (mesa): CG iterations by tolerance {its}")
            else:
                bad = sum(layer["non_finite"].values())
                print(
                    f"{name} layer {layer['layer']} ({layer['mixer']}), last mini-batch: inner loss "
                    f"W0 {layer['loss_init'][-1]:.4g}, before {layer['loss_before'][-1]:.4g}, "
                    f"after {layer['loss_after'][-1]:.4g}; "
                    f"non-finite {bad}; re-run vs op {layer['max_abs_diff_vs_op']:.2e}"
                )
        data = {
            "checkpoint": name,
            "mixer": model.config.mixer,
            "corpus": args.corpus,
            "seq_len": args.seq_len,
            "num_docs": ids.shape[0],
            "dtype": str(dtype).removeprefix("torch."),
            "environment": environment(device),
            "layers": layers,
        }
        stem = "telemetry_" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        out = write_result(args.out_dir, stem, "telemetry", data, plot_telemetry(layers))
        print(f"wrote {out}")
        del model
    return 0
