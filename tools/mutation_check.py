"""Mutation check: plant known bug classes one at a time and see whether the tests catch them.

The tree is copied to a temporary folder (the working tree is never touched); for each
mutant of tools/mutants.py the snippet is replaced in the copy, the mutant's tests run there
(`python -m pytest -x`, single process, with a timeout), and the file is restored. A mutant
is `killed` when its tests fail, `survived` when they pass (a gap in the suite: add a test),
`timeout` when they run past --timeout, `stale` when the snippet is no longer in the code
(re-anchor it in tools/mutants.py), `invalid` when the mutated file does not compile, and
`error` when pytest could not run the tests (a bad selector). First, unless --no-baseline,
the union of the selected tests runs on the unmutated copy: a failing baseline makes every
kill meaningless, so the check stops there.

    python tools/mutation_check.py                     # all mutants (slow: see README)
    python tools/mutation_check.py --only 'model.*' 'optim.*' --jobs 2
    python tools/mutation_check.py --check             # only: is every snippet still there?
    python tools/mutation_check.py --only 'model.*' --tests tests/test_model.py   # other tests
    python tools/mutation_check.py --list

Prints a table and writes JSON (--json, default OUTPUT/mutation_report.json).
Exit status: 0 when every run mutant was killed, 1 when any survived or timed out, 2 when
any is stale or invalid or the baseline failed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import MUTANTS, Mutant  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Not needed to run the tests, and large or machine-specific.
IGNORED = shutil.ignore_patterns(".git", ".venv", "OUTPUT", "data", "__pycache__", "*.pyc", ".pytest_cache",
                                 "build", "*.egg-info", ".mypy_cache", ".ruff_cache")
TAIL_CHARS = 3000
# The pytest processes running now, each the leader of its own process group.
_RUNNING: set[subprocess.Popen] = set()


def _kill_running() -> None:
    for process in list(_RUNNING):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _occurrences(mutant: Mutant, source: str) -> int:
    return source.count(mutant.original)


def stale_reason(mutant: Mutant, root: Path) -> str | None:
    """Why the mutant cannot be planted in the tree at `root` as written, or None."""
    path = root / mutant.file
    if not path.is_file():
        return f"{mutant.file} does not exist"
    found = _occurrences(mutant, path.read_text())
    if found != mutant.count:
        return (f"{mutant.file} contains the snippet {found} time(s), expected {mutant.count}: "
                f"re-anchor mutant {mutant.name!r} in tools/mutants.py to the current code "
                f"(same bug class) or delete it. Snippet: {mutant.original!r}")
    return None


def mutated_source(mutant: Mutant, source: str) -> str:
    return source.replace(mutant.original, mutant.replacement)


def invalid_reason(mutant: Mutant, source: str) -> str | None:
    if not mutant.file.endswith(".py"):
        return None
    try:
        compile(mutated_source(mutant, source), mutant.file, "exec")
    except SyntaxError as err:
        return f"the mutated {mutant.file} does not compile: {err}"
    return None


def copy_tree(destination: Path) -> Path:
    tree = destination / "tree"
    shutil.copytree(REPO, tree, symlinks=True, ignore=IGNORED)
    # kernels/ is the package cvt_fast.kernels only through the install's package_dir mapping:
    # with the copy first on PYTHONPATH, an editable install would still import the original
    # checkout's kernels, and every kernel mutant would survive unseen. A link makes the copy
    # import its own (mutated) kernels.
    link = tree / "cvt_fast" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels", target_is_directory=True)
    return tree


def _test_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Restoring a file within the same second and at the same size as its mutant would let a
    # cached .pyc of the mutant survive: no bytecode cache at all.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_pytest(tree: Path, args: list[str], timeout: float) -> tuple[str, int | None, float, str]:
    """(outcome, return code, seconds, output); outcome is passed, failed, timeout or error."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:xdist", "-p", "no:cacheprovider", *args]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=tree, env=_test_env(tree), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _RUNNING.add(process)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the pytest we started and its children
        output, _ = process.communicate()
        return "timeout", None, time.perf_counter() - start, output
    finally:
        _RUNNING.discard(process)
    seconds = time.perf_counter() - start
    code = process.returncode
    # pytest: 0 all passed, 1 some failed, 2 interrupted (collection errors), 5 no tests collected.
    outcome = {0: "passed", 1: "failed", 2: "failed"}.get(code, "error")
    if code == 2 and "error" not in output.lower():
        outcome = "error"
    if code < 0:  # the tests crashed (a mutant that writes out of bounds can segfault the interpreter)
        outcome = "failed"
        output += f"\n(pytest killed by signal {-code})"
    return outcome, code, seconds, output


def _first_failure(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    if match:
        return match.group(1)
    crash = re.search(r"^\(pytest killed by signal (\d+)\)", output, re.MULTILINE)
    if not crash:
        return ""
    # Python's fault handler prints the stack: name the test that was running.
    where = re.search(r'File "[^"]*/(tests/test_\w+\.py)", line \d+ in (test_\w+)', output)
    return f"crash (signal {crash.group(1)})" + (f" in {where.group(1)}::{where.group(2)}" if where else "")


def check_mutant(mutant: Mutant, tree: Path, timeout: float) -> dict:
    result = {**asdict(mutant), "status": "", "seconds": 0.0, "killed_by": "", "detail": ""}
    reason = stale_reason(mutant, tree)
    if reason:
        return {**result, "status": "stale", "detail": reason}
    path = tree / mutant.file
    original = path.read_text()
    reason = invalid_reason(mutant, original)
    if reason:
        return {**result, "status": "invalid", "detail": reason}
    path.write_text(mutated_source(mutant, original))
    try:
        outcome, code, seconds, output = run_pytest(tree, [*mutant.tests, *mutant.pytest_args], timeout)
    finally:
        path.write_text(original)
    status = {"failed": "killed", "passed": "survived", "timeout": "timeout", "error": "error"}[outcome]
    killed_by = _first_failure(output) if status == "killed" else ""
    return {**result, "status": status, "seconds": round(seconds, 1), "killed_by": killed_by,
            "return_code": code, "detail": output[-TAIL_CHARS:] if status != "killed" else output[-800:]}


def select(names: list[str] | None) -> list[Mutant]:
    if not names:
        return list(MUTANTS)
    chosen = [m for m in MUTANTS if any(fnmatch.fnmatch(m.name, pattern) for pattern in names)]
    if not chosen:
        raise SystemExit(f"no mutant matches {names}; see --list")
    return chosen


def print_table(results: list[dict]) -> None:
    width = max(len(r["name"]) for r in results)
    print(f"\n{'mutant'.ljust(width)}  {'status':8}  {'seconds':>7}  killed by / detail")
    for r in results:
        note = r["killed_by"] or (r["detail"].splitlines()[-1] if r["detail"] and r["status"] != "survived" else "")
        if r["status"] == "survived":
            note = f"tests passed: {' '.join(r['tests'])}"
        print(f"{r['name'].ljust(width)}  {r['status']:8}  {r['seconds']:7.1f}  {note[:140]}")
    counts = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("\n" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="GLOB", help="mutant names to run (shell patterns)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true", help="only check that every snippet is still in the code")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's test run (default 900)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once, each in its own copy (default 1)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated tests")
    parser.add_argument("--json", default=str(REPO / "OUTPUT" / "mutation_report.json"),
                        help="where to write the JSON report (default OUTPUT/mutation_report.json, git-ignored)")
    parser.add_argument("--tests", nargs="+", metavar="PYTEST_ARG",
                        help="run these tests against every selected mutant instead of the ones it names "
                             "(e.g. to see whether older tests alone catch it)")
    args = parser.parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the running pytest is killed and
    # the temporary copies are removed.
    signal.signal(signal.SIGTERM, _interrupt)

    mutants = select(args.only)
    if args.tests:
        mutants = [replace(m, tests=tuple(args.tests), pytest_args=()) for m in mutants]
    if args.list:
        for m in mutants:
            print(f"{m.name:45} {m.file:32} {m.why}")
        return 0

    problems = [(m.name, stale_reason(m, REPO) or invalid_reason(m, (REPO / m.file).read_text()))
                for m in mutants]
    problems = [(name, reason) for name, reason in problems if reason]
    if args.check:
        for name, reason in problems:
            print(f"{name}: {reason}")
        print(f"{len(mutants) - len(problems)} of {len(mutants)} mutants can be planted")
        return 2 if problems else 0

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report: dict = {"repo": str(REPO), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": sys.version.split()[0],
                    "timeout_s": args.timeout, "jobs": args.jobs}
    try:
        report["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                          text=True).stdout.strip()
    except OSError:
        pass
    with tempfile.TemporaryDirectory(prefix="cvt_fast_mutation_") as scratch:
        copies = [copy_tree(Path(scratch) / str(i)) for i in range(max(1, args.jobs))]
        trees: queue.Queue[Path] = queue.Queue()
        for tree in copies:
            trees.put(tree)

        if not args.no_baseline:
            selectors = sorted({t for m in mutants for t in m.tests})
            print(f"baseline: {len(selectors)} test selector(s) on the unmutated tree ...", flush=True)
            try:
                outcome, _, seconds, output = run_pytest(copies[0], selectors, args.timeout * 4)
            except KeyboardInterrupt:
                _kill_running()
                raise
            report["baseline"] = {"outcome": outcome, "seconds": round(seconds, 1)}
            print(f"baseline {outcome} in {seconds:.0f} s", flush=True)
            if outcome != "passed":
                print(output[-TAIL_CHARS:])
                Path(args.json).write_text(json.dumps(report, indent=2))
                print(f"the unmutated tests do not pass ({outcome}): fix them first, or run with --no-baseline")
                return 2

        done: list[dict] = []

        def work(mutant: Mutant) -> dict:
            tree = trees.get()
            try:
                result = check_mutant(mutant, tree, args.timeout)
            finally:
                trees.put(tree)
            print(f"{mutant.name}: {result['status']} ({result['seconds']} s) {result['killed_by']}", flush=True)
            done.append(result)
            # Written after every mutant, so an interrupted run still leaves what it found.
            Path(args.json).write_text(json.dumps({**report, "partial": True, "mutants": done}, indent=2))
            return result

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs))
        try:
            results = list(pool.map(work, mutants))
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            _kill_running()
            raise
        pool.shutdown()

    report["total_seconds"] = round(time.time() - started, 1)
    report["summary"] = {s: sum(r["status"] == s for r in results)
                         for s in ("killed", "survived", "timeout", "stale", "invalid", "error")}
    report["mutants"] = results
    Path(args.json).write_text(json.dumps(report, indent=2))
    print_table(results)
    print(f"total {report['total_seconds']:.0f} s; JSON report: {args.json}")
    summary = report["summary"]
    if summary["stale"] or summary["invalid"]:
        return 2
    return 1 if summary["survived"] or summary["timeout"] or summary["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
