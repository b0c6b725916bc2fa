"""What the attention kernels compile to for sm_90, read without a GPU (issue 13's static targets).

nvcc compiles csrc/attention_fwd.cu and csrc/attention_bwd.cu for sm_90 with the extension's flags and
-Xptxas=-v; the test fails when any kernel spills registers or uses a stack frame, and when the d = 64
tensor-core forward cannot keep two blocks on an SM. The same code reads the SASS (cuobjdump, shipped
with Triton) and counts the instructions of every kernel's main loop; run this file as a script to print
the tables of csrc/NOTES.md:

    python tests/test_cuda_attention_static.py [csrc_dir ...]

(several csrc folders, e.g. an old checkout's and this one, give the before/after tables).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
ATTENTION_SOURCES = ("attention_fwd.cu", "attention_bwd.cu")
# sm_90 limits: registers per SM, shared memory per SM (and per block, opt-in, and the 1 KB the
# system reserves per block), threads per SM.
REGISTERS_PER_SM = 65536
SHARED_MEMORY_PER_SM = 228 * 1024
SHARED_MEMORY_PER_BLOCK = 227 * 1024
RESERVED_SHARED_PER_BLOCK = 1024
THREADS_PER_SM = 2048
SIMT_THREADS = {32: 64, 64: 128, 128: 256}  # 64 * d / 32 threads (RowSplit in both .cu files)


def tile_launch_shapes(csrc: pathlib.Path, out_dir: pathlib.Path) -> dict[str, dict[int, tuple[int, int]]]:
    """(threads, dynamic shared bytes) of the tensor-core kernels, read from FwdTile / BwdTile by
    compiling the kernel half of each .cu for the host (as csrc/emulate/ does)."""
    from torch.utils.cpp_extension import include_paths

    shapes = {}
    for source, tile, kernel in (("attention_fwd.cu", "FwdTile", "attention_fwd_tc_kernel"),
                                 ("attention_bwd.cu", "BwdTile", "attention_bwd_tc_kernel")):
        program = out_dir / f"{tile}.cpp"
        fields = ", ".join(f"cvt_fast::{tile}<{d}>::kThreads, cvt_fast::{tile}<{d}>::kSmemBytes" for d in (32, 64, 128))
        program.write_text(f'#define CVT_FAST_HOST_EMULATION\n#include "{source}"\n#include <cstdio>\n'
                           f'int main() {{ std::printf("%d %d %d %d %d %d\\n", {fields}); }}\n')
        binary = out_dir / tile
        subprocess.run(["g++", "-std=c++20", "-O0", f"-I{csrc}", f"-I{include_paths()[0]}", str(program), "-o",
                        str(binary), "-pthread"], check=True, capture_output=True)
        values = list(map(int, subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.split()))
        shapes[kernel] = {d: (values[2 * i], values[2 * i + 1]) for i, d in enumerate((32, 64, 128))}
    return shapes


def nvcc_command(source: pathlib.Path, cubin: pathlib.Path) -> list[str]:
    """The extension's nvcc flags (setup.py and torch's BuildExtension), device code only."""
    from torch.utils.cpp_extension import include_paths

    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        nvcc = shutil.which("nvcc") or nvcc
    python_include = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"],
                                    capture_output=True, text=True, check=True).stdout.strip()
    return [nvcc, "-cubin", "-arch=sm_90", "-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
            "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-Xptxas=-v",
            f"-I{source.parent}", *(f"-I{p}" for p in include_paths()), f"-I{python_include}",
            str(source), "-o", str(cubin)]


@dataclasses.dataclass
class KernelResources:
    name: str  # demangled, namespaces dropped: "attention_fwd_tc_kernel<c10::Half, 64>"
    registers: int
    static_smem: int
    stack: int
    spill_stores: int
    spill_loads: int


def short_name(mangled: str) -> str:
    demangled = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() \
        if shutil.which("c++filt") else mangled
    demangled = re.sub(r"^(void )?cvt_fast::\(anonymous namespace\)::", "", demangled).split("(")[0]
    return (demangled.replace("c10::BFloat16", "bf16").replace("c10::Half", "fp16").replace("float", "fp32")
            .replace(", ", ","))


def parse_ptxas(text: str) -> list[KernelResources]:
    kernels = []
    current = None
    for line in text.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)'", line)
        if entry:
            current = KernelResources(short_name(entry.group(1)), 0, 0, 0, 0, 0)
            kernels.append(current)
            continue
        if current is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame:
            current.stack, current.spill_stores, current.spill_loads = map(int, frame.groups())
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current.registers = int(used.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current.static_smem = int(smem.group(1)) if smem else 0
    return kernels


def compile_attention(csrc: pathlib.Path, out_dir: pathlib.Path) -> dict[str, tuple[list[KernelResources], pathlib.Path]]:
    """Per source: the ptxas report of every kernel and the cubin."""
    results = {}
    for source in ATTENTION_SOURCES:
        cubin = out_dir / (source + ".cubin")
        done = subprocess.run(nvcc_command(csrc / source, cubin), capture_output=True, text=True, timeout=3000)
        assert done.returncode == 0, f"nvcc failed on {source}:\n{done.stderr[-4000:]}"
        results[source] = (parse_ptxas(done.stdout + done.stderr), cubin)
    return results


def cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                            "cuobjdump")]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.exists(c)), None)


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
CLASSES = [("HMMA", "HMMA"), ("LDSM", "LDSM"), ("LDGSTS", "LDGSTS"), ("MUFU", "MUFU"), ("BAR", "BAR"),
           ("SHFL", "SHFL"), ("RED/ATOM", ("RED", "ATOM")), ("LDS/STS", ("LDS", "STS")),
           ("LDG/STG", ("LDG", "STG")), ("F2FP", "F2FP"),
           ("FP32", ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP"))]


@dataclasses.dataclass
class Loop:
    start: int
    end: int
    opcodes: list[str]

    def counts(self) -> dict[str, int]:
        counts = collections.Counter()
        for op in self.opcodes:
            for label, prefixes in CLASSES:
                if op.startswith(prefixes):
                    counts[label] += 1
                    break
        counts["total"] = len(self.opcodes)
        return counts


def sass_functions(cubin: pathlib.Path) -> dict[str, list[tuple[int, str, str]]]:
    """Per kernel (short name): (address, opcode, operands) of every instruction."""
    tool = cuobjdump()
    text = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    functions = {}
    current = None
    for line in text.splitlines():
        head = re.search(r"Function : (\w+)", line)
        if head:
            current = functions.setdefault(short_name(head.group(1)), [])
            continue
        match = SASS_LINE.search(line)
        if match and current is not None:
            current.append((int(match.group(1), 16), match.group(3), match.group(4).strip()))
    return functions


def outer_loops(instructions: list[tuple[int, str, str]]) -> list[Loop]:
    """Loops from backward branches, keeping those not nested in another one (unrolled inner loops are
    straight code; what remains nested is a data-dependent loop such as the SIMT kernels' tile loads)."""
    spans = []
    for address, op, operands in instructions:
        if op.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) < address:
                spans.append((int(target.group(1), 16), address))
    outer = [s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans)]
    return [Loop(start, end, [op for address, op, _ in instructions if start <= address <= end])
            for start, end in sorted(set(outer))]


def blocks_per_sm(registers: int, threads: int, smem: int) -> int:
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_registers = REGISTERS_PER_SM // (regs_per_warp * (threads // 32))
    by_smem = SHARED_MEMORY_PER_SM // (smem + RESERVED_SHARED_PER_BLOCK) if smem else 32
    return min(by_registers, by_smem, THREADS_PER_SM // threads, 32)


def launch_shape(kernel: KernelResources, tiles: dict[str, dict[int, tuple[int, int]]]) -> tuple[int, int]:
    """(threads, shared bytes in all) a kernel is launched with."""
    name = kernel.name
    dim = int(re.search(r",(\d+)>", name).group(1))
    base = name.split("<")[0]
    if base in tiles and kernel.static_smem == 0:
        threads, smem = tiles[base][dim]
        return threads, smem
    if base in ("attention_bwd_prep_kernel", "attention_bwd_dq_convert_kernel", "attention_fwd_tc_kernel"):
        return 128, kernel.static_smem  # (the last: the WMMA forward this replaced)
    if base in ("attention_bwd_dq_tc_kernel", "attention_bwd_dkdv_tc_kernel"):  # the WMMA backward it replaced
        return 64, kernel.static_smem
    return SIMT_THREADS[dim], kernel.static_smem


# ---------------------------------------------------------------- the test

def _toolchain_or_skip():
    pytest.importorskip("torch")
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not (os.path.exists(nvcc) or shutil.which("nvcc")):
        pytest.skip("no nvcc (CUDA toolkit) to compile the attention kernels for sm_90")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    _toolchain_or_skip()
    return compile_attention(CSRC, tmp_path_factory.mktemp("sm90"))


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++ to read the tile shapes")
    return tile_launch_shapes(CSRC, tmp_path_factory.mktemp("tiles"))


@pytest.mark.slow
def test_attention_kernels_compile_for_sm90_without_spills(compiled):
    kernels = [k for resources, _ in compiled.values() for k in resources]
    assert len(kernels) >= 18, [k.name for k in kernels]
    for k in kernels:
        assert k.spill_stores == 0 and k.spill_loads == 0 and k.stack == 0, (
            f"{k.name}: {k.registers} registers, {k.stack} bytes stack, spills {k.spill_stores}/{k.spill_loads}")


@pytest.mark.slow
def test_tensor_core_kernels_fit_their_occupancy_targets(compiled, tiles):
    kernels = {k.name: k for resources, _ in compiled.values() for k in resources}
    for dtype in ("bf16", "fp16"):
        for dim in (32, 64, 128):
            for kind in ("attention_fwd_tc_kernel", "attention_bwd_tc_kernel"):
                k = kernels[f"{kind}<{dtype},{dim}>"]
                threads, smem = launch_shape(k, tiles)
                assert smem <= SHARED_MEMORY_PER_BLOCK, k.name
                # Two blocks per SM for every tensor-core kernel (the issue asks it of the d = 64 forward).
                assert blocks_per_sm(k.registers, threads, smem) >= 2, (k.name, k.registers)


@pytest.mark.slow
def test_tensor_core_main_loops_use_mma_ldmatrix_and_cp_async(compiled):
    if cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton) to read the SASS")
    functions = {}
    for _, cubin in compiled.values():
        functions.update(sass_functions(cubin))
    for name, instructions in functions.items():
        if "_tc_kernel" not in name:
            continue
        loops = [loop.counts() for loop in outer_loops(instructions)]
        main = max(loops, key=lambda c: c["HMMA"])
        # One main loop: tensor-core products whose operands come by ldmatrix (an .x4 feeds at most four
        # mma), the next tile by cp.async, at most two barriers per tile (the forward needs one).
        assert main["HMMA"] > 0 and main["LDSM"] * 4 >= main["HMMA"] and main["LDGSTS"] > 0, (name, main)
        assert main["BAR"] <= (1 if "fwd" in name else 2), (name, main)


# ---------------------------------------------------------------- the NOTES.md tables

def report(csrc_dirs: list[pathlib.Path]) -> None:
    for csrc in csrc_dirs:
        with tempfile.TemporaryDirectory() as tmp:
            compiled = compile_attention(csrc, pathlib.Path(tmp))
            try:
                tiles = tile_launch_shapes(csrc, pathlib.Path(tmp))
            except subprocess.CalledProcessError:  # sources without FwdTile / BwdTile (the WMMA kernels)
                tiles = {}
            print(f"\n### {csrc}\n")
            print("| kernel | registers | smem (bytes) | stack | spill st/ld | blocks/SM |")
            print("|---|---|---|---|---|---|")
            for resources, _ in compiled.values():
                for k in sorted(resources, key=lambda k: k.name):
                    threads, smem = launch_shape(k, tiles)
                    print(f"| `{k.name}` | {k.registers} | {smem} | {k.stack} | {k.spill_stores}/{k.spill_loads} "
                          f"| {blocks_per_sm(k.registers, threads, smem)} |")
            if cuobjdump() is None:
                continue
            print("\n| kernel | loop | instructions | " + " | ".join(label for label, _ in CLASSES) + " |")
            print("|---|---|---|" + "---|" * len(CLASSES))
            for _, cubin in compiled.values():
                for name, instructions in sorted(sass_functions(cubin).items()):
                    for loop in outer_loops(instructions):
                        c = loop.counts()
                        print(f"| `{name}` | {loop.start:#x}-{loop.end:#x} | {c['total']} | "
                              + " | ".join(str(c.get(label, 0)) for label, _ in CLASSES) + " |")


if __name__ == "__main__":
    report([pathlib.Path(p) for p in sys.argv[1:]] or [CSRC])
