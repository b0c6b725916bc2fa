"""Issue 11, fault 8: `import cvt_fast` registers torch.ops.cvt_fast.*, so a program saved
with torch.export.save loads and runs in a fresh process that imported nothing else; the
registration is cheap and leaves Triton unimported.

Fault reproduced: after a bare `import cvt_fast`, torch.ops.cvt_fast had no ops (only
building a model imported cvt_fast.ops), and torch.export.load of a saved CvT program failed.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from test_train_utils import subprocess_env


def _python(code: str, cwd) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_a_bare_import_registers_every_op(tmp_path):
    out = _python("""
        import torch
        import cvt_fast
        names = ("attention", "attention_backward", "conv_proj", "conv_proj_backward")
        print(all(hasattr(torch.ops.cvt_fast, n) for n in names))
    """, tmp_path)
    assert out.split() == ["True"]


def test_a_bare_import_leaves_triton_unimported(tmp_path):
    out = _python("""
        import sys
        import cvt_fast
        print("triton" in sys.modules)
    """, tmp_path)
    assert out.split() == ["False"]


def test_trace_time_constants_are_marked_as_torch_marks_them():
    # cvt_fast marks its backend probes without importing torch._dynamo; if torch changes how
    # assume_constant_result marks a function, this fails before torch.compile traces into them.
    import torch._dynamo

    from cvt_fast.ops.backend import constant_at_trace_time

    def theirs():
        return 1

    def ours():
        return 1

    torch._dynamo.assume_constant_result(theirs)
    constant_at_trace_time(ours)
    assert vars(theirs) == vars(ours) == {"_dynamo_marked_constant": True}


def test_an_exported_program_loads_after_only_import_cvt_fast(tmp_path):
    # Saved in one process (the reference backend: runs on the CPU), loaded in a fresh one.
    _python("""
        import torch
        from cvt_fast.model import build_model
        from cvt_fast.specs import MODEL_SPECS

        spec = dict(MODEL_SPECS["cvt-13"], PATCH_SIZE=[3, 3, 3], PATCH_STRIDE=[2, 2, 2], PATCH_PADDING=[1, 1, 1],
                    DIM_EMBED=[16, 32, 48], NUM_HEADS=[1, 2, 3], DEPTH=[1, 1, 1])
        torch.manual_seed(0)
        model = build_model(spec, num_classes=3, backend="reference").eval()
        x = torch.randn(2, 3, 16, 16)
        program = torch.export.export(model, (x,))
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any(op.startswith("cvt_fast.") for op in ops), ops
        torch.export.save(program, "cvt.pt2")
        torch.save({"x": x, "logits": model(x)}, "expected.pt")
    """, tmp_path)
    out = _python("""
        import torch
        import cvt_fast

        program = torch.export.load("cvt.pt2")
        expected = torch.load("expected.pt")
        logits = program.module()(expected["x"])
        torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-6)
        print("ok")
    """, tmp_path)
    assert out.split() == ["ok"]
