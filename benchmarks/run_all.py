"""Run every benchmark script in benchmarks/ in turn, then print a summary (``make bench``).

Why: one command that exercises all benchmarks, quickly by default, and fails when any of them
fails. A script is a ``benchmarks/*.py`` file with a ``__main__`` guard (helpers such as
``common.py`` have none); it gets ``--quick`` when its source defines that option. Scripts run
as subprocesses one after another (they start vLLM servers and would compete for the CPU). A
script that outlives ``--timeout`` gets SIGTERM, so it can tear down its servers, then SIGKILL.

    .venv/bin/python benchmarks/run_all.py [--full] [--only NAME ...] [--timeout S]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# Known scripts first, cheapest first; any other script found runs after them.
ORDER = (
    "decode_encodings.py",
    "hostile_side_by_side.py",
    "latency_side_by_side.py",
    "multi_turn_references.py",
    "big_parts.py",
)
MAIN_GUARD = 'if __name__ == "__main__":'
# Scripts other benchmarks start for themselves, never run on their own.
HELPERS = frozenset({"floor_server.py"})
QUICK_FLAG = '"--quick"'
TERM_GRACE_S = 90.0  # servers take a while to stop


@dataclass
class Outcome:
    name: str
    command: list[str]
    status: str = "not run"
    returncode: int | None = None
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def find_scripts(only: list[str] | None) -> list[Path]:
    """Benchmark scripts in a stable order: ORDER first, then the others by name."""
    found = [
        path
        for path in sorted(HERE.glob("*.py"))
        if path.name != Path(__file__).name
        and path.name not in HELPERS
        and MAIN_GUARD in path.read_text(errors="replace")
    ]
    rank = {name: i for i, name in enumerate(ORDER)}
    found.sort(key=lambda path: (rank.get(path.name, len(ORDER)), path.name))
    if only:
        wanted = {name.removesuffix(".py") for name in only}
        unknown = wanted - {path.stem for path in found}
        if unknown:
            raise SystemExit(f"no benchmark script named {sorted(unknown)} in {HERE}")
        found = [path for path in found if path.stem in wanted]
    return found


def command_for(script: Path, quick: bool) -> list[str]:
    cmd = [sys.executable, str(script.relative_to(HERE.parent))]  # run from the repo root
    if quick and QUICK_FLAG in script.read_text(errors="replace"):
        cmd.append("--quick")
    return cmd


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the scripts turn it into a clean exit that stops their servers), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=TERM_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_one(outcome: Outcome, timeout_s: float) -> None:
    started = time.time()
    print(f"\n=== {outcome.name}: {' '.join(outcome.command[1:])}", flush=True)
    proc = subprocess.Popen(outcome.command, cwd=HERE.parent)
    try:
        outcome.returncode = proc.wait(timeout=timeout_s)
        outcome.status = "ok" if outcome.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        outcome.status = f"timeout after {timeout_s:.0f}s"
    finally:
        stop(proc)  # a no-op unless timed out or interrupted
        outcome.seconds = time.time() - started
    if RESULTS.is_dir():
        outcome.outputs = sorted(
            str(path.relative_to(HERE.parent))
            for path in RESULTS.iterdir()
            if path.is_file() and path.stat().st_mtime >= started
        )


def print_summary(outcomes: list[Outcome]) -> None:
    print("\n=== benchmark summary")
    width = max(len(o.name) for o in outcomes)
    for o in outcomes:
        quick = " --quick" if "--quick" in o.command else ""
        print(f"{o.name:<{width}}{quick:8}  {o.status:<24} {o.seconds:7.0f}s")
        for output in o.outputs:
            print(f"{'':<{width}}          -> {output}")
    failed = sum(not o.ok for o in outcomes)
    total = sum(o.seconds for o in outcomes)
    print(f"{len(outcomes) - failed}/{len(outcomes)} ok in {total:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="default sizes instead of --quick")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these scripts")
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds per script (default 3600)"
    )
    args = parser.parse_args(argv)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds run_one, which stops the running script

    signal.signal(signal.SIGTERM, on_sigterm)
    scripts = find_scripts(args.only)
    if not scripts:
        print(f"no benchmark scripts in {HERE}", file=sys.stderr)
        return 1
    outcomes = [Outcome(path.stem, command_for(path, not args.full)) for path in scripts]
    try:
        for outcome in outcomes:
            run_one(outcome, args.timeout)
    except (KeyboardInterrupt, SystemExit):
        for outcome in outcomes:
            if outcome.status == "not run":
                outcome.status = "interrupted"
                break
        print_summary(outcomes)
        raise
    print_summary(outcomes)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
