"""Issue 21: the checkout's top-level folders never shadow an installed distribution.

CI runs `python -m pytest` from the checkout's root, and the README has users run
`python -m cvt_fast.train` there: both put the root first on sys.path. On 2026-12-07
transformers 5.25 began to import Hugging Face's `kernels` package, and the checkout's
`kernels/` folder (cvt_fast's Triton kernels) was found instead, so
`transformers.CvtForImageClassification` failed to import. Each child python here runs
with the root as its working directory and first on sys.path, as those commands do.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python_from_the_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)  # as `python -m pytest` / `python -m cvt_fast.train` from the root
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _comes_from_the_checkout(path: str, name: str) -> bool:
    """Whether a module's file or folder is the checkout's own `name` (not, say, a venv inside it)."""
    resolved = Path(path).resolve()
    return resolved == REPO / f"{name}.py" or resolved.is_relative_to(REPO / name)


def test_transformers_cvt_imports_from_the_checkout_root():
    pytest.importorskip("transformers")
    proc = _python_from_the_root("""
        from transformers import CvtConfig, CvtForImageClassification
        model = CvtForImageClassification(CvtConfig(num_labels=3, embed_dim=[8, 8, 8], num_heads=[1, 1, 1],
                                                    depth=[1, 2, 3]))
        print(type(model).__name__)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "CvtForImageClassification"


def test_transformers_cvt_imports_in_this_test_process():
    """The same in the pytest process itself, whose sys.path CI's `python -m pytest` set up."""
    pytest.importorskip("transformers")
    from transformers import CvtForImageClassification

    assert CvtForImageClassification.__name__ == "CvtForImageClassification"


def test_import_kernels_from_the_root_never_gives_the_checkout_folder():
    proc = _python_from_the_root("""
        try:
            import kernels
        except ModuleNotFoundError as err:
            print("refused", err)
        else:
            print("imported", kernels.__file__ or list(kernels.__path__))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome, _, where = proc.stdout.strip().partition(" ")
    assert outcome in ("refused", "imported"), proc.stdout
    if outcome == "imported":
        assert not _comes_from_the_checkout(where.strip("[]'"), "kernels"), f"`import kernels` gave the checkout's folder: {where}"


def test_import_kernels_is_refused_with_the_reason_when_no_other_kernels_is_installed():
    """Without Hugging Face's package (site-packages hidden), the folder still does not import
    as `kernels`, nor do its modules as `kernels.<name>`."""
    proc = _python_from_the_root("""
        import sys
        sys.path[:] = [p for p in sys.path if "site-packages" not in p and "dist-packages" not in p]
        for name in ("kernels", "kernels.attention"):
            try:
                __import__(name)
            except ModuleNotFoundError as err:
                print("refused", name, "|", err)
            else:
                print("imported", name)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [["refused", "kernels"], ["refused", "kernels.attention"]]
    assert "cvt_fast.kernels" in lines[0], lines[0]


def test_cvt_fast_kernels_is_the_checkout_folder():
    import cvt_fast.kernels

    assert Path(cvt_fast.kernels.__file__).resolve().parent == REPO / "kernels"


def _top_level_import_names_of_the_checkout() -> list[str]:
    """Every name the root on sys.path makes importable: folders holding Python files, and
    the root's own modules."""
    names = []
    for entry in sorted(REPO.iterdir()):
        if not entry.stem.isidentifier():
            continue  # .git, .venv, .ci and the like
        if entry.is_dir() and any(entry.glob("*.py")):
            names.append(entry.name)
        elif entry.suffix == ".py":
            names.append(entry.stem)
    return names


def test_the_scan_sees_the_folders_that_matter():
    names = _top_level_import_names_of_the_checkout()
    for expected in ("kernels", "bench", "tests", "tools", "cvt_fast", "setup"):
        assert expected in names


@pytest.mark.parametrize("name", _top_level_import_names_of_the_checkout())
def test_no_top_level_name_of_the_checkout_shadows_an_installed_distribution(name):
    """Where an installed distribution (other than cvt-fast) provides a top-level module of the
    same name, importing that name from the root must give the distribution's module.
    Today only `kernels` collides (Hugging Face's); the scan catches the next one."""
    providers = [dist for dist in importlib.metadata.packages_distributions().get(name, [])
                 if dist.lower().replace("_", "-") != "cvt-fast"]
    if not providers:
        pytest.skip(f"no installed distribution provides a top-level {name!r}")
    proc = _python_from_the_root(f"""
        import {name} as module
        print(module.__file__ or list(module.__path__))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = proc.stdout.strip().strip("[]'")
    assert not _comes_from_the_checkout(where, name), (
        f"from the checkout's root, `import {name}` gives the checkout's {where} instead of the module of "
        f"{', '.join(providers)}: make the folder {name}/ hand the import over as kernels/__init__.py does")
