"""What the fused elementwise and MLP-product kernels compile to for an H100 (sm_90), without a GPU:
every configuration the GPU may pick compiles, and ptxas reports no register spills.

Triton compiles ahead of time for a GPUTarget and ships ptxas; the kernels are compiled in a
subprocess because this suite runs them under TRITON_INTERPRET=1, and a kernel decorated under the
interpreter cannot be compiled for a GPU. bf16 with exact GELU, the heavier epilogue.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]

COMPILE_SCRIPT = r'''
import json, os, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cvt_fast.kernels import linear_activation as la, mlp_activation as ma, residual_layer_norm as rl

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
TARGET = GPUTarget("cuda", 90, 32)
B, F = "*bf16", "*fp32"


def spills(kernel, signature, constexprs, num_warps, num_stages=3):
    types = {name: ("constexpr" if name in constexprs else signature[name]) for name in signature}
    compiled = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=constexprs), target=TARGET,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    report = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    return [int(word) for line in report.splitlines() if "spill stores" in line
            for word in [line.split("bytes spill stores")[0].split(",")[-1].strip()]]


results = {}
gemm = {"M": "i32", "N": "i32", "K": "i32"}
common = dict(HAS_BIAS=True, ACT=1, BLOCK_M=la._BLOCK_M, GROUP_M=la._GROUP_M, UPCAST=False, ACC=tl.float32,
              DOT_PRECISION="tf32")
forward_sig = dict(x_ptr=B, w_ptr=B, bias_ptr=B, y_ptr=B, hidden_ptr=B, **gemm, HAS_BIAS=0, KEEP_HIDDEN=0, ACT=0,
                   BLOCK_M=0, BLOCK_N=0, BLOCK_K=0, GROUP_M=0, UPCAST=0, ACC=0, DOT_PRECISION=0)
backward_sig = dict(grad_ptr=B, w_ptr=B, hidden_ptr=B, bias_ptr=B, grad_hidden_ptr=B, act_ptr=B, partial_ptr=F, **gemm,
                    HAS_BIAS=0, WITH_ACTIVATION=0, ACT=0, BLOCK_M=0, BLOCK_N=0, BLOCK_K=0, GROUP_M=0, UPCAST=0,
                    ACC=0, DOT_PRECISION=0)
for direction, kernel, signature, flag in (("forward", la._linear_activation_kernel, forward_sig, "KEEP_HIDDEN"),
                                           ("backward", la._activation_grad_kernel, backward_sig, "WITH_ACTIVATION")):
    for config in la._GPU_CONFIGS[direction]:
        name = f"linear_activation {direction} {config.kwargs} w{config.num_warps} s{config.num_stages}"
        results[name] = spills(kernel, signature, dict(common, **config.kwargs, **{flag: True}),
                               config.num_warps, config.num_stages)

rows = {"M": "i32", "N": "i32"}
results["mlp_activation forward"] = spills(
    ma._mlp_activation_fwd_kernel, dict(x_ptr=B, bias_ptr=F, y_ptr=B, **rows),
    dict(HAS_BIAS=True, ACT=1, BLOCK_M=ma._BLOCK_M, BLOCK_N=ma._BLOCK_N_MAX, ACC=tl.float32), ma._NUM_WARPS)
results["mlp_activation backward"] = spills(
    ma._mlp_activation_bwd_kernel, dict(grad_ptr=B, x_ptr=B, bias_ptr=F, grad_x_ptr=B, act_ptr=B, partial_ptr=F, **rows),
    dict(HAS_BIAS=True, WITH_ACTIVATION=True, ACT=1, ROWS_PER_PROGRAM=256, BLOCK_M=ma._BLOCK_M,
         BLOCK_N=ma._BLOCK_N_MAX, ACC=tl.float32), ma._NUM_WARPS)
for channels in (384, 1024):  # CvT-13's widest stage, CvT-W24's
    block_m, block_c = rl._block_shape(channels, rl._TILE_ELEMENTS_FWD)
    results[f"residual_layer_norm forward C={channels}"] = spills(
        rl._residual_layer_norm_fwd_kernel,
        dict(x_ptr=B, branch_ptr=B, branch_bias_ptr=B, scale_ptr=F, weight_ptr=F, bias_ptr=F, out_ptr=B, normed_ptr=B,
             mean_ptr=F, rstd_ptr=F, M="i32", C="i32", ROWS_PER_SAMPLE="i32", eps="fp32"),
        dict(HAS_BRANCH_BIAS=True, HAS_SCALE=True, BLOCK_M=block_m, BLOCK_C=block_c, ACC=tl.float32), rl._NUM_WARPS)
    block_m, block_c = rl._block_shape(channels, rl._TILE_ELEMENTS_BWD)
    results[f"residual_layer_norm backward C={channels}"] = spills(
        rl._residual_layer_norm_bwd_kernel,
        dict(grad_out_ptr=B, grad_normed_ptr=B, out_ptr=B, mean_ptr=F, rstd_ptr=F, scale_ptr=F, weight_ptr=F,
             grad_x_ptr=B, grad_branch_ptr=B, partial_ptr=F, M="i32", C="i32", ROWS_PER_SAMPLE="i32", PROGRAMS="i32"),
        dict(HAS_SCALE=True, ROWS_PER_PROGRAM=256, BLOCK_M=block_m, BLOCK_C=block_c, ACC=tl.float32), rl._NUM_WARPS)
print(json.dumps(results))
'''


def test_every_gpu_configuration_compiles_for_sm90_without_register_spills():
    import os

    import triton

    if not Path(triton.__file__).parent.joinpath("backends", "nvidia", "bin", "ptxas").exists():
        pytest.skip("this Triton installation ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 13, sorted(results)
    spilled = {name: bytes_ for name, bytes_ in results.items() if any(bytes_)}
    assert not spilled, spilled
