"""What the Triton kernels compile to for Hopper, checked without a GPU (bench/kernels_report.py).

The report compiles the kernels ahead of time for sm_90 (triton.compile with
GPUTarget("cuda", 90, 32)) and reads them with ptxas -v and cuobjdump, the tools Triton ships.
In CI it runs its 'ci' subset, in a process of its own (the kernels must be decorated as GPU
kernels, not interpreted): bf16, attention at head sizes 64 and 128 in every config of their
autotune lists (the autotuner may pick any, and 'auto' is Triton on CUDA), conv_proj's eval
and training forward and its backward, and training with BatchNorm (conv_proj_bn: statistics,
normalising forward, backward), at CvT-13's stage-1 and stage-3 shapes (33 compiles, and 14 more
for the one-pass attention backward with stored and with atomic dQ), and
the fused elementwise kernels (13 compiles): the MLP's two fused products in every autotune config
with exact GELU (the heavier epilogue) at CvT-13's stage 3, the activation alone, and residual +
LayerNorm at CvT-13's stage 3 and CvT-W24's widest (C = 1024) row. Measured: 1m46 of CPU time for
the first 25 with an empty Triton cache, about 20 s for the 13 more; plus the CUDA extension's
cuobjdump. The full report (every head size, dtype, stage, activation and flag, about 400
compiles) is `python bench/kernels_report.py`.
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

# Kernels with matrix products (16-bit: all of them on wgmma), and the fused elementwise kernels
# of the CI subset with their number of rows: the products in every autotune config, the others
# once per case (residual + LayerNorm at two widths).
MATRIX_PRODUCT_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_fused_kernel",
                          "_linear_activation_kernel", "_activation_grad_kernel")
FUSED_KERNELS = {"_linear_activation_kernel": 4, "_activation_grad_kernel": 3, "_mlp_activation_fwd_kernel": 1,
                 "_mlp_activation_bwd_kernel": 1, "_residual_layer_norm_fwd_kernel": 2,
                 "_residual_layer_norm_bwd_kernel": 2}


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
    assert {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_fused_kernel",
            "_attn_bwd_delta_kernel",
            "_fwd_s1s2_kernel", "_bwd_s1s2_kernel", "_stats_s1s2_kernel"} | set(FUSED_KERNELS) <= kernels
    for row in triton_rows:
        assert row["checked"] and row["registers"] > 0 and row["threads"] > 0, row
        assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0, row
        assert 1 <= row["ctas_per_sm"] <= 32, row
        if row["kernel"] in MATRIX_PRODUCT_KERNELS:
            assert row["has_dot"] and row["sass"]["wgmma"] > 0 and row["sass"]["mma_sync"] == 0, row
        elif row["kernel"] in FUSED_KERNELS:  # elementwise: no matrix products
            assert not row["has_dot"] and row["sass"]["wgmma"] == row["sass"]["mma_sync"] == 0, row
    # Every config of the autotune lists was compiled (d=64: 4 forward, 3 dK/dV, 3 dQ, 3 one-pass
    # backward configs, the one-pass ones also with atomic dQ; the MLP's products: 4 forward, 3 backward).
    d64 = [r["kernel"] for r in triton_rows if r["case"] == "attention d=64 bfloat16"]
    assert d64.count("_attn_fwd_kernel") == 4 and d64.count("_attn_bwd_dkdv_kernel") == 3
    assert d64.count("_attn_bwd_dq_kernel") == 3 and d64.count("_attn_bwd_fused_kernel") == 3
    atomic = [r["kernel"] for r in triton_rows if r["case"] == "attention atomic-dq d=64 bfloat16"]
    assert atomic.count("_attn_bwd_fused_kernel") == 3
    fused = [r["kernel"] for r in triton_rows if r["kernel"] in FUSED_KERNELS]
    assert {kernel: fused.count(kernel) for kernel in FUSED_KERNELS} == FUSED_KERNELS
    gemm = {r["config"] for r in triton_rows if r["kernel"] == "_linear_activation_kernel"}
    assert any("BLOCK_N=256" in c for c in gemm) and any("warps=4" in c for c in gemm), gemm
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


def test_the_report_records_the_fused_kernels_launches_and_catches_a_spilling_one():
    """The fused modules launch their kernels directly (no `_run` seam): the report records them by
    swapping the kernels for recorders, with the arguments a real call passes. Planted: fp64's
    backward product on 4 warps (its config until this report found it spilling)."""
    missing = _tools_missing()
    if missing:
        pytest.skip(missing)
    script = """
import dataclasses, json
from bench import kernels_report as kr
from cvt_fast.kernels import linear_activation, mlp_activation, residual_layer_norm
launches = kr.linear_activation_launches("all")
# Every @triton.jit function is back in place, and nothing was launched for real.
assert all(type(m.__dict__[n]).__name__ == "JITFunction" for m in (linear_activation, mlp_activation, residual_layer_norm)
           for n in vars(m) if n.endswith("_kernel"))
launch = next(l for l in launches if l.kernel.__name__ == "_activation_grad_kernel" and "s3" in l.case
              and "float64" in l.case and " gelu" in l.case and "no-act" not in l.case)
planted = dataclasses.replace(launch, meta={**launch.meta, "num_warps": 4})
row = kr.analyse_triton(planted, kr._target(), {})
print(json.dumps({"shipped_warps": launch.meta["num_warps"], "violations": row.violations,
                  "counts": {f: len(kr.FAMILIES[f]("all")) for f in ("mlp_activation", "residual_layer_norm")},
                  "n": len(launches)}))
"""
    done = _run("-c", script)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shipped_warps"] == 8
    assert any("spills" in v for v in result["violations"]), result
    # The full report: 2 stages x 2 activations x 2 flags, then the forward and backward configs
    # (4 + 3 autotuned in each 16-bit dtype, 1 + 1 in fp32 and fp64); the activation and
    # residual + LayerNorm kernels once per case.
    assert result["n"] == 2 * 2 * 2 * (2 * (4 + 3) + 2 * (1 + 1))
    assert result["counts"] == {"mlp_activation": 2 * 4 * 2 * 2, "residual_layer_norm": 4 * 4 * (4 + 2)}


def test_spills_and_tensor_core_rules():
    row = kernels_report.Row("triton", "_attn_fwd_kernel", "case", "cfg", spill_store_bytes=0, spill_load_bytes=0,
                             sass={"wgmma": 8, "mma_sync": 0}, has_dot=True, sixteen_bit=True)
    assert kernels_report.triton_violations(row) == []
    assert "spills" in kernels_report.triton_violations(dataclasses.replace(row, spill_store_bytes=8))[0]
    assert "mma.sync" in kernels_report.triton_violations(dataclasses.replace(row, sass={"wgmma": 4, "mma_sync": 2}))[0]
    assert kernels_report.triton_violations(dataclasses.replace(row, sass={"wgmma": 0, "mma_sync": 0}))
    # The MLP's fused products are held to the same rule.
    gemm = dataclasses.replace(row, kernel="_activation_grad_kernel")
    assert kernels_report.triton_violations(gemm) == []
    assert "mma.sync" in kernels_report.triton_violations(dataclasses.replace(gemm, sass={"wgmma": 2, "mma_sync": 4}))[0]
    # fp32 and fp64 are the accuracy paths (FMA units by design); conv_proj and the elementwise
    # kernels have no matrix products.
    assert kernels_report.triton_violations(dataclasses.replace(row, sixteen_bit=False, sass={})) == []
    assert kernels_report.triton_violations(dataclasses.replace(row, kernel="_fwd_s1s2_kernel", has_dot=False,
                                                                sass={})) == []
    assert "spills" in kernels_report.triton_violations(
        dataclasses.replace(row, kernel="_residual_layer_norm_bwd_kernel", has_dot=False, sass={},
                            spill_load_bytes=4))[0]


def test_ctas_per_sm_follows_the_sm90_limits():
    # 128 threads at 255 registers: 255*32 rounds up to 8192 registers a warp, 8 warps fit, 2 CTAs.
    assert kernels_report.ctas_per_sm(255, 0, 128) == (2, "registers")
    assert kernels_report.ctas_per_sm(32, 100 * 1024, 128) == (2, "shared")
    assert kernels_report.ctas_per_sm(16, 0, 1024) == (2, "threads")
    assert kernels_report.ctas_per_sm(16, 0, 32) == (32, "ctas")
