"""The command line's shared vocabulary (README, "CLI conventions"): every renamed option still accepts its old
spelling, parses to the same value, says on stderr what replaces it and is left out of --help; every --help shows
the defaults; the parsers of the shared values."""

import argparse

import pytest

from tttlm.cli import build_parser, main

# (command and its required arguments, the new spelling and its values, the old spelling, the attribute)
RENAMED = [
    (["positions", "ckpt"], ["--seq-len", "64", "128"], "--context", "seq_len"),
    (["positions", "ckpt"], ["--corpus", "data.jsonl"], "--data", "corpus"),
    (["positions", "ckpt"], ["--micro-batch-size", "4"], "--batch-size", "micro_batch_size"),
    (["positions", "ckpt"], ["--out-dir", "out"], "--out", "out_dir"),
    (["ladder", "ckpt"], ["--seq-len", "512", "1024"], "--lengths", "seq_len"),
    (["ladder", "ckpt"], ["--micro-batch-size", "2"], "--batch-size", "micro_batch_size"),
    (["telemetry", "ckpt"], ["--seq-len", "2048"], "--context", "seq_len"),
    (["telemetry", "ckpt"], ["--corpus", "stdlib"], "--data", "corpus"),
    (["recall"], ["--seq-len", "64", "256"], "--seq-lens", "seq_len"),
    (["recall"], ["--lr", "1e-3", "1e-2"], "--lrs", "lr"),
    (["recall"], ["--out-dir", "out"], "--out", "out_dir"),
    (["throughput"], ["--seq-len", "512", "2048"], "--contexts", "seq_len"),
    (["throughput"], ["--out-dir", "out"], "--out", "out_dir"),
    (["eval", "ckpt"], ["--eval-batches", "3"], "--batches", "eval_batches"),
    (["experiment", "x.toml"], ["--out-dir", "res"], "--out", "out_dir"),
    (["experiment", "x.toml"], ["--work-dir", "scratch"], "--work", "work_dir"),
]
REQUIRED_OUT = {"positions", "ladder", "telemetry", "recall", "throughput"}


def parse(argv):
    """The namespace of `tttlm ARGV`, with --out-dir added where the command requires it and argv has none."""
    if argv[0] in REQUIRED_OUT and "--out-dir" not in argv and "--out" not in argv:
        argv = [*argv, "--out-dir", "o"]
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("command, new, old, dest", RENAMED, ids=lambda x: x if isinstance(x, str) else None)
def test_old_spellings_parse_as_the_new_ones_with_a_note(capsys, command, new, old, dest):
    want = getattr(parse([*command, *new]), dest)
    assert capsys.readouterr().err == ""
    assert getattr(parse([*command, old, *new[1:]]), dest) == want
    note = capsys.readouterr().err.strip()
    assert note == f"tttlm {command[0]}: {old} is deprecated and goes in a future release: use {new[0]}", note
    assert want not in (None, [], argparse.SUPPRESS)


@pytest.mark.parametrize("command", sorted({c[0][0] for c in RENAMED}))
def test_help_shows_new_spellings_and_defaults_only(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for cmd, new, old, _ in RENAMED:
        if cmd[0] == command:
            assert new[0] in text and f"{old} " not in text and f"{old}," not in text, old
    assert "(default: " in text


def test_every_option_of_every_command_states_its_default():
    """An option with a value shows its default in --help: argparse's, TrainConfig's for train, or words of its own."""
    from tttlm.cli import HelpFormatter

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        formatter = HelpFormatter(name)
        for action in p._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or action.nargs == 0 \
                    or isinstance(action, (argparse._HelpAction, argparse.BooleanOptionalAction)) or action.required:
                continue
            text = formatter._get_help_string(action)
            if "default" not in text:
                missing.append(f"{name} {action.option_strings[0]}")
    assert missing == [], missing


def test_train_help_shows_the_config_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("--seq-len TOKENS", "(default: 256)", "(default: ttt_linear-tiny)", "(default: cosine)",
                    "(default: 0.003)", "(default: stdlib)"):
        assert default.split(" ")[0] in text
    assert "(default: 256)" in text and "(default: cosine)" in text and "(default: ttt_linear-tiny)" in text


def test_the_corpus_positional_of_data_is_an_alias(tmp_path, capsys):
    old = parse(["data", "notes"])
    assert old.old_corpus == "notes" and old.corpus == "stdlib"
    (tmp_path / "a.txt").write_text("word " * 50)
    assert main(["data", str(tmp_path), "--vocab-size", "260", "--cache-dir", str(tmp_path / "c")]) == 0
    out, err = capsys.readouterr()
    assert f"corpus {tmp_path}:" in out and f"use --corpus {tmp_path}" in err


def test_report_output_file_is_an_alias(tmp_path, capsys):
    (tmp_path / "r.json").write_text('{"kind": "eval", "figure": null, "dtype": "float32", "non_finite": 0, '
                                     '"checkpoints": {}}')
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "x" / "mine.md")]) == 0
    assert (tmp_path / "x" / "mine.md").is_file() and "use --out-dir" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 0 and (tmp_path / "report.md").is_file()


@pytest.mark.parametrize("text, tokens", [("1000", 1000), ("5e8", 500_000_000), ("500M", 500_000_000),
                                          ("2.5B", 2_500_000_000), ("64k", 64_000), ("1_000_000", 1_000_000)])
def test_token_counts(text, tokens):
    from tttlm.commands.train import token_count

    assert token_count(text) == tokens


@pytest.mark.parametrize("bad", ["lots", "-5", "0", "1.5x"])
def test_bad_token_counts_are_refused(bad):
    from tttlm.commands.train import token_count

    with pytest.raises(argparse.ArgumentTypeError):
        token_count(bad)


def test_devices_are_one_vocabulary(capsys):
    for command in (["train"], ["eval", "c"], ["generate", "c"], ["positions", "c"], ["recall"], ["throughput"]):
        assert parse([*command, "--device", "cuda:1"]).device == "cuda:1"
        with pytest.raises(SystemExit):
            parse([*command, "--device", "gpu"])
        assert "expected auto (CUDA when present, else CPU), cpu, cuda or cuda:N" in capsys.readouterr().err


def test_bench_out_dir_becomes_the_scripts_json(tmp_path):
    from tttlm.commands.bench import _out_dir_as_json

    assert _out_dir_as_json("decode", ["--steps", "5", "--out-dir", str(tmp_path / "o"), "--mixers", "mesa"]) == [
        "--steps", "5", "--json", str(tmp_path / "o" / "decode.json"), "--mixers", "mesa"]
    assert _out_dir_as_json("mesa", [f"--out-dir={tmp_path}"]) == ["--json", str(tmp_path / "mesa.json")]
    assert _out_dir_as_json("mesa", ["--json", "x.json"]) == ["--json", "x.json"]


def test_info_says_which_vocabulary_it_counts(capsys):
    assert main(["info", "--sizes", "tiny", "--mixers", "ttt_linear"]) == 0
    default = capsys.readouterr().out
    assert main(["info", "--sizes", "tiny", "--mixers", "ttt_linear", "--vocab-size", "300"]) == 0
    small = capsys.readouterr().out
    assert "vocabulary of 32000 tokens" in default and "vocabulary of 300 tokens" in small

    def count(text):
        return int(next(line for line in text.splitlines() if line.startswith("ttt_linear-tiny")).split()[2]
                   .replace(",", ""))

    assert count(default) - count(small) == (32000 - 300) * 64  # the tied embedding of width 64
