"""The tttlm command line of data / train / eval / generate: help, cache reuse, and user mistakes ending in one
error line with exit code 2."""

import subprocess
import sys

import pytest

from tttlm.cli import main


def write_docs(root, n=12, lines=40):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = "\n".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}" for j in range(lines))
        (root / f"m{i}.py").write_text(body + "\n")
    return root


def one_error_line(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


@pytest.mark.parametrize("command", ["data", "train", "eval", "generate"])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_second_data_run_reuses_the_cache_and_prints_the_time(tmp_path, capsys):
    corpus = write_docs(tmp_path / "src")
    argv = ["data", "--corpus", str(corpus), "--vocab-size", "300", "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "tokenized into new shards in" in first and "unigram baseline" in first
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "reused the cached shards in" in second and " s: " in second


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    one_error_line(capsys, ["data", "--corpus", str(tmp_path / "missing"), *cache], "does not exist")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.dat").write_bytes(b"\x00\x01" * 64)
    (tmp_path / "bin" / "b.txt").write_bytes(b"\xff\xfe\xfa")
    one_error_line(capsys, ["data", "--corpus", str(tmp_path / "bin"), *cache], "is empty", "1 binary", "1 non-UTF-8")
    corpus = write_docs(tmp_path / "src")
    train = ["train", "--corpus", str(corpus), "--vocab-size", "300", "--out-dir", str(tmp_path / "run"), *cache]
    one_error_line(capsys, [*train, "--seq-len", "100000"], "longer than every document")
    one_error_line(capsys, [*train, "--model", "ttt_linear-huge"], "unknown size 'huge'")
    one_error_line(capsys, [*train, "--model", "gru-tiny"], "unknown mixer 'gru'")
    one_error_line(capsys, ["train", "--config", str(tmp_path / "none.toml")], "does not exist")
    one_error_line(capsys, [*train, "--resume"], "nothing to resume")
    one_error_line(capsys, ["eval", str(tmp_path)], "no checkpoint")
    one_error_line(capsys, ["generate", str(tmp_path / "run")], "no checkpoint")


def test_exit_code_and_stderr_of_the_real_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tttlm", "data", "--corpus", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("tttlm data: error:") and "Traceback" not in r.stderr


def test_entry_point_exit_status(monkeypatch):
    """`tttlm` exits with main()'s status; a process that joined a torchrun group leaves through os._exit (after
    flushing), skipping the interpreter teardown in which torch's gloo threads can abort it (`tttlm.cli.run`)."""
    import os

    from tttlm import cli
    from tttlm.train import distributed

    monkeypatch.setattr(cli, "main", lambda: 75)
    with pytest.raises(SystemExit) as exited:
        cli.run()
    assert exited.value.code == 75
    class Left(Exception):
        pass

    def left(code):
        raise Left(code)

    monkeypatch.setattr(distributed, "_joined", True)
    monkeypatch.setattr(os, "_exit", left)
    with pytest.raises(Left) as exited:
        cli.run()
    assert exited.value.args == (75,)
