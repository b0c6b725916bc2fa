"""Run one of timm's scripts (train.py, validate.py, ... from a pytorch-image-models checkout)
with cvt_fast's CvTs registered: `python -m cvt_fast.timm_run SCRIPT [SCRIPT ARGS ...]`.

timm's scripts build models by name but import no plugins, so the CvT names are unknown to them
unless cvt_fast is imported in the same process; this does that, then runs the script as
`python SCRIPT ARGS` would (as __main__, its folder first on sys.path).
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Optional, Sequence

USAGE = ("usage: python -m cvt_fast.timm_run SCRIPT [ARGS ...]\n"
         "  e.g. python -m cvt_fast.timm_run pytorch-image-models/validate.py --model cvt_13 "
         "--checkpoint CvT-13-224x224-IN-1k.pth --data-dir imagenet/ --split val")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    script = Path(args[0])
    if not script.is_file():
        print(f"error: timm script {str(script)!r} does not exist\n{USAGE}", file=sys.stderr)
        return 2
    import cvt_fast.timm_models  # noqa: F401  (registers cvt_13, cvt_21, ... with timm)

    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *args[1:]]
    sys.path.insert(0, str(script.resolve().parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:  # argparse and scripts' own exits
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


if __name__ == "__main__":
    sys.exit(main())
