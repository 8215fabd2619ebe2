"""Mutation testing of one part of tttlm with mutmut (`pip install mutmut==3.8.1`): which small changes to the
code (an operator, a constant, a dropped argument...) the tests that cover it let through.

    python scripts/mutation.py layers                 # every mutant of src/tttlm/layers
    python scripts/mutation.py train --sample 150     # a random sample of 150 of src/tttlm/train's mutants
    python scripts/mutation.py ops --ref main         # the code and tests of the commit `main` instead
    python scripts/mutation.py ops --tests main       # today's code against the tests of the commit `main`
    python scripts/mutation.py ops --rerun OLD.json   # again the survivors of an earlier run, with today's tests

The part's files and the tests run against its mutants are in PARTS (Triton kernel files are left out: their
tests run under the slow interpreter; so are the tests SKIP_TESTS names). Each run works in a copy of the
repository under --work (the working tree, or --ref's commit), on one process at low priority (nice 10): mutmut
runs only the tests that reached the mutated function. Subprocesses (torchrun, the CLI) import the mutated package
too (PYTHONPATH). It writes WORK/PART/result.json (counts, score, every survivor's diff) and prints the counts and
the score: killed / (killed + survived; timeouts count as killed); mutants no test reaches are counted apart.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRITON = ["*triton*"]
PARTS = {  # part: (files mutated, files left alone, tests)
    "layers": (["src/tttlm/layers/*"], [], ["tests/layers", "tests/models"]),
    "models": (["src/tttlm/models/*"], [], ["tests/models", "tests/layers"]),
    "ops": (["src/tttlm/ops/*"], TRITON,
            ["tests/ops/test_ttt_ops.py", "tests/ops/test_mesa.py", "tests/ops/test_selective_scan.py",
             "tests/ops/test_backend.py", "tests/ops/test_linear_cross_entropy.py",
             "tests/ops/test_attention_cached.py", "tests/layers", "tests/models"]),
    "train": (["src/tttlm/train/*"], [], ["tests/train"]),
    "data": (["src/tttlm/data/*"], [], ["tests/data", "tests/train/test_trainer.py"]),
}
# Tests that compare compiled code or the model's Triton kernels with the plain model: they take most of the time
# (each surviving mutant runs every test that reaches it), and a mutant of code both sides run changes both alike;
# code only the kernel path runs (the fused loss branch) goes unmeasured.
SKIP_TESTS = "not compil and not kernels_in"
STATUS = re.compile(r"^\s+(\S+): (.+)$")


def copy_tree(dest: Path, ref: str | None, only: str = ".") -> None:
    """The repository's files (tracked and new, not ignored) at ref, or as they are in the working tree; those
    under the folder `only`."""
    if ref is not None:
        with tempfile.TemporaryFile() as f:
            subprocess.run(["git", "-C", str(ROOT), "archive", ref, only], stdout=f, check=True)
            f.seek(0)
            with tarfile.open(fileobj=f) as tar:
                tar.extractall(dest, filter="data")
        return
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", only],
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def configure(work: Path, part: str) -> None:
    mutate, skip, tests = PARTS[part]
    config = {
        "source_paths": ["src/"], "only_mutate": mutate, "do_not_mutate": skip,
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-k", SKIP_TESTS],
        "also_copy": ["configs", "benchmarks", "docs", "scripts"], "process_isolation": "forkserver",
    }
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in config.items()]
    with open(work / "pyproject.toml", "a") as f:
        f.write("\n".join(lines) + "\n")


def mutmut(work: Path, *args: str, capture: bool = False, allow: str | None = None) -> str:
    """Runs `mutmut ARGS` in work; a failure whose output holds `allow` is not one."""
    env = dict(os.environ, PYTHONPATH=str(work / "mutants" / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "mutmut", *args], cwd=work, env=env,
                          capture_output=capture, text=True)
    if proc.returncode != 0 and not (allow and allow in proc.stdout + proc.stderr):
        raise SystemExit(f"mutmut {' '.join(args)} failed ({proc.returncode})" +
                         (f":\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}" if capture else ""))
    return proc.stdout if capture else ""


def statuses(work: Path) -> dict[str, str]:
    out = mutmut(work, "results", "--all", "true", capture=True)
    return {m.group(1): m.group(2) for line in out.splitlines() if (m := STATUS.match(line))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tttlm-mutation")
    parser.add_argument("--ref", help="mutate and test this commit instead of the working tree")
    parser.add_argument("--tests", metavar="REF", help="run the tests/ folder of this commit (e.g. an earlier one, to "
                        "score the suite as it was) against the mutants of the code")
    parser.add_argument("--sample", type=int, help="run this many mutants drawn at random (seed 0)")
    parser.add_argument("--resume", action="store_true", help="continue the run already in WORK/PART")
    parser.add_argument("--score-only", action="store_true", help="run nothing: score the run in WORK/PART as it "
                        "stands (one stopped early: its mutants not yet run are counted as 'not checked')")
    parser.add_argument("--rerun", type=Path, help="a result.json of an earlier run of the same part and code: run "
                        "its survivors only and count its other mutants as they were")
    args = parser.parse_args()
    earlier = json.loads(args.rerun.read_text()) if args.rerun else None
    work = args.work / args.part
    if not (args.resume or args.score_only):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        copy_tree(work, args.ref)
        if args.tests is not None:
            shutil.rmtree(work / "tests")
            copy_tree(work, args.tests, only="tests")
        configure(work, args.part)
        (work / "mutants" / "src").mkdir(parents=True)  # on PYTHONPATH from the start
    names: list[str] = []
    if args.score_only:
        names = json.loads((work / "sample.json").read_text())["names"] if (work / "sample.json").is_file() else []
    elif earlier is not None:
        names = sorted(earlier["survivors"])
        if not names:
            raise SystemExit(f"{args.rerun} has no survivors")
        (work / "sample.json").write_text(json.dumps({"of": earlier["mutants"], "names": names}))
    elif args.sample:
        # makes the mutants and the test map (saved for the run below), then finds no mutant of that name to run
        mutmut(work, "run", "--max-children", "1", "no-such-mutant*", capture=True, allow="nothing matches")
        every = sorted(statuses(work))
        names = sorted(random.Random(0).sample(every, min(args.sample, len(every))))
        (work / "sample.json").write_text(json.dumps({"of": len(every), "names": names}))
    elif (work / "sample.json").is_file():
        names = json.loads((work / "sample.json").read_text())["names"]
    if not args.score_only:
        mutmut(work, "run", "--max-children", "1", *names)
    found = statuses(work)
    if names:
        found = {n: found[n] for n in names}
    counts: dict[str, int] = {}
    if earlier is not None:  # the earlier run's verdicts but for its survivors, which are counted again below
        counts = dict(earlier["counts"], survived=0)
    for status in found.values():
        counts[status] = counts.get(status, 0) + 1
    caught = counts.get("killed", 0) + counts.get("timeout", 0)
    tested = caught + counts.get("survived", 0)
    survivors = {n: mutmut(work, "show", n, capture=True) for n, s in sorted(found.items()) if s == "survived"}
    total = earlier["mutants"] if earlier is not None else len(found)
    result = {"part": args.part, "ref": args.ref, "tests": args.tests, "mutants": total, "counts": counts,
              "score": caught / tested if tested else None, "survivors": survivors}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(f"{args.part}: {total} mutants: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(f"score {caught}/{tested} = {result['score']:.1%}" if tested else "no mutant was tested")
    print(f"survivors' diffs in {work / 'result.json'}")


if __name__ == "__main__":
    main()
