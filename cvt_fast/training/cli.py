"""Command-line plumbing shared by cvt_fast.train and cvt_fast.test.

Expected failures (bad config, dataset, checkpoint, non-finite loss, an output folder that
cannot be written) end with one line `error: ...` on stderr and exit code 2, never a
traceback; set CVT_FAST_TRACEBACK=1 to see the traceback anyway. A run stopped by SIGTERM
or SIGINT after writing its checkpoint prints `stopped: ...` and exits with code 75.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

DEFAULT_CFG = "experiments/digits/cvt-digits.yaml"
EXIT_USAGE = 2


def repo_default_cfg() -> str:
    """The built-in digits experiment: relative to the working directory if present there,
    else next to the installed package's source tree."""
    if os.path.isfile(DEFAULT_CFG):
        return DEFAULT_CFG
    candidate = Path(__file__).resolve().parents[2] / DEFAULT_CFG
    return str(candidate)


def parse_args(prog: str, description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    """--cfg FILE and KEY VALUE overrides, in any order (`TRAIN.LR 0.1 --cfg x.yaml` too)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--cfg", default=None,
                        help=f"experiment YAML (default: the built-in digits experiment, {DEFAULT_CFG})")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. TRAIN.LR 0.001")
    # torchrun < 2.0 passes --local_rank; accepted and ignored (LOCAL_RANK is read instead).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # argparse's REMAINDER swallows every option after the first override: take them back.
    opts: list[str] = []
    rest = list(args.opts)
    while rest:
        item = rest.pop(0)
        name, has_value, value = item.partition("=")
        if name == "--cfg":
            if not has_value:
                if not rest:
                    parser.error("--cfg needs a file name")
                value = rest.pop(0)
            if args.cfg is not None:
                parser.error(f"--cfg given twice ({args.cfg} and {value})")
            args.cfg = value
        elif name in ("--local_rank", "--local-rank"):
            if not has_value and rest:
                rest.pop(0)
        else:
            opts.append(item)
    args.opts = opts
    return args


def load(cfg_path: str | None, opts: Sequence[str]) -> Any:
    from cvt_fast.config import load_config

    return load_config(cfg_path or repo_default_cfg(), list(opts))


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    # Errors re-raised from DataLoader workers carry the worker's traceback text;
    # the last line is the original message.
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
        text = text.split(": ", 1)[1] if ": " in text else text
    return " ".join(text.split())


def run_cli(main: Callable[[], int]) -> int:
    """Run `main`, turning expected failures into `error: ...` + exit code 2, and a stop on
    SIGTERM/SIGINT (a checkpoint was written) into its message + exit code EXIT_STOPPED."""
    from cvt_fast.checkpoint import CheckpointError
    from cvt_fast.training.outputs import OutputError

    expected = (ValueError, TypeError, OSError, CheckpointError, OutputError)
    try:
        return _run_expecting(main, expected)
    finally:
        # A failed run's DataLoader iterators sit in reference cycles with the traceback's
        # frames; collect them now, so their worker processes are shut down here and not at
        # some later moment (a caller's KeyboardInterrupt, interpreter exit).
        gc.collect()


def _run_expecting(main: Callable[[], int], expected: tuple) -> int:
    from cvt_fast.training.stop import EXIT_STOPPED, TrainingStopped

    try:
        return main()
    except TrainingStopped as stop:
        if stop.is_main:
            print(f"stopped: {stop}", file=sys.stderr)
        return EXIT_STOPPED
    except expected as err:
        if os.environ.get("CVT_FAST_TRACEBACK"):
            traceback.print_exc()
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:
        # DataLoader workers turn our ValueErrors into RuntimeErrors in some versions.
        if "Original Traceback" in str(err) and "ValueError" in str(err):
            print(f"error: {_one_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        raise
