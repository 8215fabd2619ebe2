import os
import random

import pytest
import torch

# Triton kernels run under the interpreter on CPU-only machines; the flag must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_interpreter_scalars():
    """Triton 3.6's interpreter holds scalars as 1-element arrays, which numpy >= 2.4 refuses to turn into an
    int, so a loop with a run-time bound fails there; index with the element instead. The interpreter sets
    these attributes again at every jitted call, so the broken one is never set (a program running in another
    thread, `concurrent_programs`, could use it meanwhile)."""
    import triton.runtime.interpreter as interp

    patch = interp._patch_lang_tensor

    def index(self):
        return int(self.handle.data.reshape(-1)[0])

    def patched(tensor, scope):
        set_attr = scope.set_attr
        scope.set_attr = lambda obj, name, value: set_attr(obj, name, index if name == "__index__" else value)
        try:
            patch(tensor, scope)
        finally:
            del scope.set_attr

    interp._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_scalars()


@pytest.fixture
def concurrent_programs(monkeypatch):
    """Under the interpreter, run the programs of each kernel launch in threads of their own, all at once as
    on a GPU: the interpreter runs them one after another, so programs that wait for one another (the split
    TTT-Linear forward) would wait forever. Nothing changes on a GPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import inspect
    import threading
    import time

    import triton.runtime.interpreter as interp

    local = threading.local()  # each thread's program id, which the interpreter otherwise holds once
    monkeypatch.setattr(
        interp.InterpreterBuilder, "grid_idx",
        property(lambda self: local.idx, lambda self, idx: setattr(local, "idx", idx)), raising=False,
    )
    rewrite, lock = interp.InterpretedFunction.rewrite, threading.Lock()

    def locked_rewrite(self):  # a jitted function's first call parses its source: ast.parse is not thread-safe
        with lock:
            return rewrite(self)

    monkeypatch.setattr(interp.InterpretedFunction, "rewrite", locked_rewrite)
    init = interp.GridExecutor.__init__

    def concurrent_init(self, fn, *args, **kwargs):
        init(self, fn, *args, **kwargs)
        threads, errors = [], []

        def program(idx, call_args):
            local.idx = idx
            try:
                fn(**call_args)
            except BaseException as e:  # re-raised in the launching thread
                errors.append(e)

        class Launch:  # stands for the kernel function: its name, globals and signature, called per program id
            __name__, __globals__, __signature__ = fn.__name__, fn.__globals__, inspect.signature(fn)

            def __call__(self, **call_args):  # the last program id waits for all
                # daemons: programs still waiting on one that failed must not keep the tests from ending
                threads.append(threading.Thread(target=program, args=(local.idx, call_args), daemon=True))
                threads[-1].start()
                if local.idx == tuple(n - 1 for n in interp.interpreter_builder.grid_dim):
                    deadline = time.monotonic() + 600  # a kernel whose programs wait forever fails, not hangs
                    while not errors and any(t.is_alive() for t in threads):
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{fn.__name__}: programs still waiting after 600 s")
                        threads[0].join(0.05)
                    if errors:
                        raise errors[0]

        self.fn = Launch()

    monkeypatch.setattr(interp.GridExecutor, "__init__", concurrent_init)


_WORDS = ("def return self value index total count items result print while for if else import class "
          "data name list dict key lambda yield None True False").split()


@pytest.fixture(autouse=True)
def _one_thread():
    # the recurrent ops' many small tensor ops run far slower with 2 intra-op threads on the 2-core CI machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fake_source(rng: random.Random, lines: int) -> str:
    out = []
    for _ in range(lines):
        depth = rng.randint(0, 3)
        out.append("    " * depth + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 8))))
    return "\n".join(out) + "\n"


def _write_corpus(root):
    """30 small Python-like text documents doc00.txt ... doc29.txt, different in content and length."""
    rng = random.Random(0)
    root.mkdir(exist_ok=True)
    for i in range(30):
        (root / f"doc{i:02d}.txt").write_text(_fake_source(rng, rng.randint(10, 60)))
    return root


@pytest.fixture
def text_dir(tmp_path):
    """A corpus directory of the test's own, which it may change."""
    return _write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="module")
def shared_text_dir(tmp_path_factory):
    """A corpus directory shared by the tests of a module, read-only for them."""
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


# The table of faults in docs/reliability.md: tests that inflict a fault record what the user saw once they have
# checked it, and `pytest tests/train/test_faults.py --reliability-table docs/reliability.md` rewrites the table.
_FAULTS: list[tuple[str, str, str, str]] = []
_TABLE_START, _TABLE_END = "<!-- faults table: written by the tests -->", "<!-- end of the faults table -->"


def pytest_addoption(parser):
    parser.addoption("--reliability-table", metavar="MD", default=None,
                     help="rewrite the faults table of this markdown file (docs/reliability.md) from the cases the "
                          "tests that ran have recorded")


def _shown(text: str) -> str:
    """text as a table cell: pytest's temporary directories cut from paths, one line, pipes escaped."""
    import re

    text = re.sub(r"(?:/[^/\s'\"]+)*/pytest-\d+/[^/\s'\"]+/", "", text.strip())
    return " ".join(text.split()).replace("|", "\\|")


@pytest.fixture
def reliability():
    """record(command, fault, seen, kept): one row of the faults table, recorded by a test after checking it:
    the command as the user types it, the fault or bad input, what they see (the exit status and the output
    line) and what is kept."""

    def record(command: str, fault: str, seen: str, kept: str) -> None:
        _FAULTS.append((command, fault, seen, kept))

    return record


def pytest_sessionfinish(session):
    path = session.config.getoption("--reliability-table")
    if not path or not _FAULTS:
        return
    from pathlib import Path

    rows = ["| Command | Fault or bad input | What the user sees | What is kept |", "|---|---|---|---|"]
    rows += [f"| `{_shown(c)}` | {_shown(f)} | {_shown(s)} | {_shown(k)} |" for c, f, s, k in _FAULTS]
    doc = Path(path).read_text()
    head, rest = doc.split(_TABLE_START, 1)
    tail = rest.split(_TABLE_END, 1)[1]
    Path(path).write_text(f"{head}{_TABLE_START}\n{chr(10).join(rows)}\n{_TABLE_END}{tail}")
