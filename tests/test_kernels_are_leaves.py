"""Issue 22, deliverable 2: the kernels are leaves.

kernels/ (installed as cvt_fast.kernels) imports nothing of cvt_fast: what a kernel needs is
defined in kernels/ or passed in by its caller, and what the ops layer needs to know about the
kernels (dtypes, head sizes, kernel sizes) is declared in kernels/supported.py, which the
backend table reads. What every launch needs (interpreter detection, the device check, the
accumulator dtype, the device guard, the grid check) is defined once, in kernels/_launch.py.
Read from the source with `ast`, so these hold without Triton.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
FILES = sorted(KERNELS.glob("*.py"))
LAUNCH = KERNELS / "_launch.py"
# The names kernels/_launch.py defines once, and the forms of them that once had copies elsewhere.
LAUNCH_ONLY_FUNCTIONS = {"interpreter_on", "_interpreting", "check_device", "_check_device",
                         "acc_dtype", "_acc_dtype", "tl_acc_dtype", "_acc_torch_dtype",
                         "device_guard", "check_grid"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported_modules(tree: ast.Module) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return names


def test_the_kernel_files_are_found():
    assert {"attention.py", "conv_proj.py", "_launch.py", "supported.py"} <= {f.name for f in FILES}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_kernel_module_imports_cvt_fast(path):
    imports = [name for name in _imported_modules(_tree(path)) if name == "cvt_fast" or name.startswith("cvt_fast.")]
    assert not imports, f"kernels/{path.name} imports {imports}: kernels/ is a leaf (define it there or take it as an argument)"


@pytest.mark.parametrize("path", [f for f in FILES if f != LAUNCH], ids=lambda p: p.name)
def test_launch_concerns_are_defined_only_in_launch_module(path):
    tree = _tree(path)
    defined = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert not defined & LAUNCH_ONLY_FUNCTIONS, f"kernels/{path.name} defines {defined & LAUNCH_ONLY_FUNCTIONS}"
    constants = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    # The environment variable is read, and Triton's interpreted kernel type recognised, in _launch.py only
    # (messages may name TRITON_INTERPRET=1; no other file names the variable alone).
    assert "TRITON_INTERPRET" not in constants and "InterpretedFunction" not in constants, path.name
    # No accumulator choice of its own: `tl.float64 if ... else tl.float32` and the torch form.
    for node in ast.walk(tree):
        if isinstance(node, ast.IfExp):
            branches = {ast.unparse(node.body), ast.unparse(node.orelse)}
            assert branches not in ({"tl.float64", "tl.float32"}, {"torch.float64", "torch.float32"}), (
                f"kernels/{path.name}:{node.lineno} chooses an accumulator dtype: use _launch.acc_dtype")


def test_launch_module_defines_each_once():
    tree = _tree(LAUNCH)
    names = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert {"interpreter_on", "check_device", "acc_dtype", "tl_acc_dtype", "device_guard", "check_grid"} <= set(names)
    assert len(names) == len(set(names))
    # No Triton at import: the backend probe imports this module on every op call.
    top_level = ast.Module(body=[node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))],
                           type_ignores=[])
    assert not [name for name in _imported_modules(top_level) if name.split(".")[0] == "triton"]


def test_the_backend_table_reads_what_the_kernels_declare():
    from cvt_fast.kernels import supported
    from cvt_fast.ops.backends import TABLE

    record = TABLE["triton"]
    assert record.dtypes == supported.DTYPES
    assert record.head_dims == supported.ATTENTION_HEAD_DIMS
    assert {(limit.op, limit.device_type, limit.dtype) for limit in record.dtype_limits} == set(supported.DTYPE_LIMITS)
    assert record.kernel_rule("triton", (3, 3, 3)) is None
    assert "odd kernel size, got 4" in record.kernel_rule("triton", (4, 4, 4))
    assert "one kernel size" in record.kernel_rule("triton", (3, 5, 3))


def test_the_kernels_check_against_their_declarations():
    pytest.importorskip("triton")
    from cvt_fast.kernels import attention, linear_activation, mlp_activation, residual_layer_norm, supported

    assert attention.SUPPORTED_HEAD_DIMS is supported.ATTENTION_HEAD_DIMS
    for module in (linear_activation, mlp_activation, residual_layer_norm):
        assert "supported" in vars(module) and module.supported is supported


def test_conv_proj_output_sizes_agree_with_the_op_contract():
    pytest.importorskip("triton")
    from cvt_fast.kernels import conv_proj
    from cvt_fast.ops.contract import output_size

    for size in range(1, 12):
        for kernel in (1, 3, 5, 7):
            for stride in (1, 2, 3, 4):
                for padding in range(kernel):
                    assert conv_proj._output_size(size, kernel, stride, padding) == output_size(size, kernel, stride, padding)


def test_accumulator_dtype():
    pytest.importorskip("triton")
    import triton.language as tl

    from cvt_fast.kernels import _launch

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert _launch.acc_dtype(dtype) == torch.float32 and _launch.tl_acc_dtype(dtype) == tl.float32
    assert _launch.acc_dtype(torch.float64) == torch.float64 and _launch.tl_acc_dtype(torch.float64) == tl.float64


def test_device_check_names_the_fix():
    from cvt_fast.kernels import _launch

    _launch.check_device(torch.zeros(1), True, "k")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _launch.check_device(torch.zeros(1), False, "the Triton k kernels")
    with pytest.raises(ValueError, match="got device meta"):
        _launch.check_device(torch.zeros(1, device="meta"), True, "k")
