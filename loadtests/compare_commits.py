"""The in-process handler cost (``loadtests.handler_cost``) of several commits, measured in one
run: each commit checked out in a temporary worktree, the current ``handler_cost.py`` and
``bare.py`` copied into it (the same measuring code for every commit), the commits run in turn
for several iterations, each pinned to one CPU. Prints, per commit and policy, the median over
iterations of the Turnout ÷ bare throughput ratio (each itself a median of paired rounds) and
its change against the first commit; ``--write`` puts the table into docs/benchmarks.md.

Run: ``.venv/bin/python -m loadtests.compare_commits 5665573 HEAD [--iterations 3] [--write]``.
A ratio to the bare handler measured in the same process cancels most of a shared machine's
drift; what remains shows as the spread between iterations, quoted beside each median.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- compare_commits:start -->", "<!-- compare_commits:end -->"
_RATIO = re.compile(r"Turnout ÷ bare:\s+([0-9.]+)")
_TURNOUT_US = re.compile(r"^turnout\s+([0-9.]+) µs", re.M)


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def _run(
    tree: Path,
    policy: str,
    rounds: int,
    n: int,
    request_id: str | None = None,
    clock: str = "wall",
) -> tuple[float, float]:
    """(Turnout ÷ bare throughput, Turnout µs/request) of one handler_cost run in ``tree``."""
    cmd = [sys.executable, "-m", "loadtests.handler_cost", "--rounds", str(rounds), "-n", str(n)]
    cmd += ["--clock", clock]
    if policy != "none":
        cmd += ["--policy", policy]
    if request_id is not None:
        cmd += ["--id", request_id]
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        cmd = ["taskset", "-c", "1", *cmd]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True)
    ratio, us = _RATIO.search(out.stdout), _TURNOUT_US.search(out.stdout)
    if ratio is None or us is None:
        raise RuntimeError(f"unexpected handler_cost output:\n{out.stdout}\n{out.stderr}")
    return float(ratio.group(1)), float(us.group(1))


def measure(
    commits: Sequence[str],
    policies: Sequence[str],
    iterations: int,
    rounds: int,
    n: int,
    request_id: str | None = None,
    clock: str = "wall",
) -> dict[tuple[str, str], list[tuple[float, float]]]:
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for commit in commits:
            tree = Path(tmp) / commit.replace("/", "_")
            _git("worktree", "add", "--detach", str(tree), commit)
            for name in ("handler_cost.py", "bare.py"):
                shutil.copy(ROOT / "loadtests" / name, tree / "loadtests" / name)
            trees[commit] = tree
        try:
            for i in range(iterations):
                # rotate the order: a commit measured first in an iteration is not always first
                order = list(commits)[i % len(commits) :] + list(commits)[: i % len(commits)]
                for commit in order:
                    for policy in policies:
                        figure = _run(trees[commit], policy, rounds, n, request_id, clock)
                        results.setdefault((commit, policy), []).append(figure)
                        print(f"{i + 1} {commit:10s} {policy:7s} ratio {figure[0]:.3f} "
                              f"turnout {figure[1]:.1f} µs", flush=True)  # fmt: skip
        finally:
            for tree in trees.values():
                _git("worktree", "remove", "--force", str(tree))
    return results


def table(
    commits: Sequence[str],
    policies: Sequence[str],
    results: dict[tuple[str, str], list[tuple[float, float]]],
) -> str:
    lines = [
        "| commit | policy | Turnout ÷ bare (median) | each iteration | vs first commit | Turnout µs/request (median) |",  # noqa: E501
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for policy in policies:
        base = statistics.median(r for r, _ in results[(commits[0], policy)])
        for commit in commits:
            figures = results[(commit, policy)]
            ratio = statistics.median(r for r, _ in figures)
            each = ", ".join(f"{r:.3f}" for r, _ in figures)
            us = statistics.median(u for _, u in figures)
            change = f"{(ratio / base - 1) * 100:+.1f} %"
            label = f"{commit} ({_git('rev-parse', '--short', commit)})"
            lines.append(f"| {label} | {policy} | {ratio:.3f} | {each} | {change} | {us:.1f} |")
    return "\n".join(lines)


def section(text: str, args: argparse.Namespace) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "\n".join([
        START,
        "## Commits compared: in-process handler cost",
        "",
        f"`python -m loadtests.compare_commits {' '.join(args.commits)} --iterations "
        f"{args.iterations} --clock {args.clock}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{os.cpu_count()} CPUs, load average at the end {load}): `loadtests/handler_cost.py` "
        f"({args.rounds} rounds of {args.n} batch-1 `fraud` requests per app) run in a worktree of "
        "each commit, pinned to CPU 1. The ratio is Turnout's throughput over the bare starlette + "
        "onnxruntime handler's in the same process; `canary` routes Turnout through a 50 % canary.",
        "",
        text,
        END,
    ])  # fmt: skip


def write(block: str, start: str = START, end: str = END) -> None:
    """Put ``block`` (which begins with ``start`` and ends with ``end``) into
    docs/benchmarks.md in place of the section between those markers, else at its end."""
    doc = BENCHMARKS.read_text()
    if start in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end) :]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    BENCHMARKS.write_text(doc)


def kept_section(doc: str, start: str = START, end: str = END) -> str:
    """The section between ``start`` and ``end`` (default: the compared commits) of an
    existing docs/benchmarks.md ('' if none), for ``loadtests.run`` to keep when it rewrites
    the file."""
    if start not in doc:
        return ""
    return doc[doc.index(start) : doc.index(end) + len(end)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtests.compare_commits", description=__doc__)
    p.add_argument("commits", nargs="+", help="commits to compare; the first is the base")
    p.add_argument("--policies", nargs="+", default=["none", "canary"])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("-n", type=int, default=8000, help="requests per app per round")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    p.add_argument("--id", dest="request_id", help="handler_cost --id: send an inference id")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="handler_cost --clock")
    args = p.parse_args(argv)
    results = measure(
        args.commits,
        args.policies,
        args.iterations,
        args.rounds,
        args.n,
        args.request_id,
        args.clock,
    )
    text = table(args.commits, args.policies, results)
    print(text)
    if args.write:
        write(section(text, args))
        print(f"wrote {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
