"""What the Triton kernels compile to for Hopper, checked without a GPU (bench/kernels_report.py).

The report compiles the kernels ahead of time for sm_90 (triton.compile with
GPUTarget("cuda", 90, 32)) and reads them with ptxas -v and cuobjdump, the tools Triton ships.
In CI it runs its 'ci' subset, in a process of its own (the kernels must be decorated as GPU
kernels, not interpreted): bf16, attention at head sizes 64 and 128 in every config of their
autotune lists (the autotuner may pick any, and 'auto' is Triton on CUDA), conv_proj's eval
and training forward and its backward at CvT-13's stage-1 and stage-3 shapes: 25 compiles
plus the CUDA extension's cuobjdump, measured at 1m46 of CPU time with an empty Triton cache
(6 minutes of wall time on the shared 2-core machine). The full report (every head size, dtype
and geometry, about 140 compiles) is `python bench/kernels_report.py`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import kernels_report  # noqa: E402  (importing it compiles nothing)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _tools_missing():
    try:
        kernels_report.tool("ptxas")
        kernels_report.tool("cuobjdump")
    except FileNotFoundError as error:
        return str(error)
    return None


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_no_config_auto_can_pick_spills_or_leaves_wgmma(tmp_path):
    """One test for the whole CI report (minutes): split, pytest-xdist could run it twice."""
    missing = _tools_missing()
    if missing:
        pytest.skip(missing)
    out = tmp_path / "kernels.json"
    done = _run("bench/kernels_report.py", "--subset", "ci", "--check", "--out", str(out))
    assert done.returncode == 0, f"report failed or found violations:\n{done.stdout[-4000:]}\n{done.stderr[-3000:]}"
    payload = json.loads(out.read_text())
    assert payload["violations"] == []
    triton_rows = [r for r in payload["rows"] if r["source"] == "triton"]
    kernels = {r["kernel"] for r in triton_rows}
    assert {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_delta_kernel",
            "_fwd_s1s2_kernel", "_bwd_s1s2_kernel"} <= kernels
    for row in triton_rows:
        assert row["checked"] and row["registers"] > 0 and row["threads"] > 0, row
        assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0, row
        assert 1 <= row["ctas_per_sm"] <= 32, row
        if row["kernel"] in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
            assert row["has_dot"] and row["sass"]["wgmma"] > 0 and row["sass"]["mma_sync"] == 0, row
    # Every config of the autotune lists was compiled (d=64: 4 forward, 3 dK/dV, 3 dQ configs).
    d64 = [r for r in triton_rows if r["case"] == "attention d=64 bfloat16"]
    assert sorted(r["kernel"] for r in d64).count("_attn_fwd_kernel") == 4
    assert sorted(r["kernel"] for r in d64).count("_attn_bwd_dkdv_kernel") == 3
    # conv_proj's weights are read tap-major: every global load of the eval forward is 16 bytes wide.
    eval_fwd = next(r for r in triton_rows if r["case"].startswith("conv_proj eval-fwd s1s2 56x56"))
    assert eval_fwd["sass"]["ldg"] == eval_fwd["sass"]["ldg128"], eval_fwd
    assert out.with_suffix(".md").read_text().count("\n|") > len(triton_rows)

    # The CUDA extension is reported, not checked (another rewrite owns its spills).
    cuda_rows = [r for r in payload["rows"] if r["source"] == "cuda"]
    if kernels_report.extension_path() is None:
        assert not cuda_rows and "no CUDA extension built" in done.stdout
        return
    families = {r["kernel"].split("_")[0] for r in cuda_rows}
    assert {"attention", "conv"} <= families, sorted({r["kernel"] for r in cuda_rows})
    for row in cuda_rows:
        assert row["registers"] > 0 and row["threads"] and row["violations"] == [], row
        if row["stack_bytes"] or row["sass"]["local"]:
            assert "local memory" in row["note"], row


def test_the_check_catches_a_config_that_falls_back_to_mma_sync():
    """The rule can fail: a 32-row K/V tile in dK/dV (listed until the report found it) runs on mma.sync."""
    missing = _tools_missing()
    if missing:
        pytest.skip(missing)
    script = """
import dataclasses, json, sys
from bench import kernels_report as kr
launch = next(l for l in kr.attention_launches("ci")
              if l.kernel.__name__ == "_attn_bwd_dkdv_kernel" and l.meta["BLOCK_N"] == 64 and l.meta["num_warps"] == 4)
planted = dataclasses.replace(launch, meta={**launch.meta, "BLOCK_M": 32, "BLOCK_N": 32})
row = kr.analyse_triton(planted, kr._target(), {})
print(json.dumps({"violations": row.violations, "sass": row.sass}))
"""
    done = _run("-c", script)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sass"]["mma_sync"] > 0 and result["sass"]["wgmma"] == 0
    assert any("wgmma" in v for v in result["violations"])


def test_spills_and_tensor_core_rules():
    row = kernels_report.Row("triton", "_attn_fwd_kernel", "case", "cfg", spill_store_bytes=0, spill_load_bytes=0,
                             sass={"wgmma": 8, "mma_sync": 0}, has_dot=True, sixteen_bit=True)
    assert kernels_report.triton_violations(row) == []
    assert "spills" in kernels_report.triton_violations(dataclasses.replace(row, spill_store_bytes=8))[0]
    assert "mma.sync" in kernels_report.triton_violations(dataclasses.replace(row, sass={"wgmma": 4, "mma_sync": 2}))[0]
    assert kernels_report.triton_violations(dataclasses.replace(row, sass={"wgmma": 0, "mma_sync": 0}))
    # fp32 attention is the accuracy path (FMA units by design), conv_proj has no matrix products.
    assert kernels_report.triton_violations(dataclasses.replace(row, sixteen_bit=False, sass={})) == []
    assert kernels_report.triton_violations(dataclasses.replace(row, kernel="_fwd_s1s2_kernel", sass={})) == []


def test_ctas_per_sm_follows_the_sm90_limits():
    # 128 threads at 255 registers: 255*32 rounds up to 8192 registers a warp, 8 warps fit, 2 CTAs.
    assert kernels_report.ctas_per_sm(255, 0, 128) == (2, "registers")
    assert kernels_report.ctas_per_sm(32, 100 * 1024, 128) == (2, "shared")
    assert kernels_report.ctas_per_sm(16, 0, 1024) == (2, "threads")
    assert kernels_report.ctas_per_sm(16, 0, 32) == (32, "ctas")
