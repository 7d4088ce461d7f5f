"""The CUDA sources compile for sm_90 without spills and with 128-bit loads (no GPU needed).

Every ``csrc/cuda/*.cu`` is lowered by nvcc to PTX and assembled by ptxas for sm_90 with
the flags of setup.py; ptxas's resource report and the PTX text are then checked. Also
pins that the built extension (where there is one) imports, and that the ``cuda`` backend
degrades to a clear message on a machine without a device. Skips without nvcc.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
# Mirrors setup.py's nvcc flags (minus -c/-Xcompiler): what ships is what is inspected.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "-arch=sm_90", "-I", os.path.join(ROOT, "csrc")]
MAX_REGISTERS = 64  # __launch_bounds__(256, 4): 4 resident blocks need <= 64 per thread
DTYPE_MANGLING = {"fp32": "If", "fp16": "I6__half", "bf16": "I13__nv_bfloat16"}


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", name)
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


NVCC, PTXAS, CUOBJDUMP = _tool("nvcc"), _tool("ptxas"), _tool("cuobjdump")
needs_nvcc = pytest.mark.skipif(NVCC is None or PTXAS is None, reason="nvcc/ptxas not found")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{source: (ptx_text, ptxas_report, cubin_path)} for every .cu file."""
    out = {}
    tmp = tmp_path_factory.mktemp("cuda")
    for src in CU_SOURCES:
        stem = os.path.basename(src)
        ptx = tmp / f"{stem}.ptx"
        cubin = tmp / f"{stem}.cubin"
        r = subprocess.run([NVCC, *NVCC_FLAGS, "-ptx", src, "-o", str(ptx)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"nvcc failed on {stem}:\n{r.stderr}"
        r = subprocess.run([PTXAS, "-arch=sm_90", "-O3", "-v", str(ptx), "-o", str(cubin)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"ptxas failed on {stem}:\n{r.stderr}"
        out[stem] = (ptx.read_text(), r.stdout + r.stderr, cubin)
    return out


def _entries(report: str) -> dict[str, dict[str, int]]:
    """Per kernel: registers, stack frame and spill bytes from ``ptxas -v``."""
    res: dict[str, dict[str, int]] = {}
    name = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
            res[name] = {}
            continue
        if name is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            res[name].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            res[name]["registers"] = int(m[1])
    return res


def _ptx_functions(ptx: str) -> dict[str, str]:
    """Body of each ``.entry`` in a PTX file, by mangled name."""
    parts = re.split(r"\.visible \.entry |\.entry ", ptx)
    res = {}
    for part in parts[1:]:
        name = part.split("(", 1)[0].strip()
        res[name] = part
    return res


def test_sources_exist():
    assert CU_SOURCES, "no csrc/cuda/*.cu found"


@needs_nvcc
def test_every_cu_compiles_for_sm90(compiled):
    assert set(compiled) == {os.path.basename(s) for s in CU_SOURCES}
    for stem, (_, _, cubin) in compiled.items():
        assert cubin.stat().st_size > 0, stem


@needs_nvcc
def test_no_spills_no_local_memory_and_registers_within_launch_bounds(compiled):
    for stem, (_, report, _) in compiled.items():
        entries = _entries(report)
        assert entries, f"ptxas reported no kernels for {stem}:\n{report}"
        for name, info in entries.items():
            assert info.get("spill_stores") == 0 and info.get("spill_loads") == 0, (name, info)
            # a stack frame means a register array was indexed dynamically
            assert info.get("stack") == 0, (name, info)
            assert 0 < info.get("registers", 0) <= MAX_REGISTERS, (name, info)


@needs_nvcc
@pytest.mark.parametrize("dtype", sorted(DTYPE_MANGLING))
def test_every_dtype_variant_uses_128_bit_loads_and_stores(compiled, dtype):
    ptx, _, _ = compiled["token_stats.cu"]
    kernels = {k: body for k, body in _ptx_functions(ptx).items()
               if "token_stats_kernel" + DTYPE_MANGLING[dtype] + "L" in k}
    # 2 x 2 variants: with/without temperature division, with/without the scaled write
    assert len(kernels) == 4, sorted(_ptx_functions(ptx))
    load = re.compile(r"ld\.global(\.[\w:]+)*\.v4\.(u32|b32|f32)")
    store = re.compile(r"st\.global(\.[\w:]+)*\.v4\.")
    n_stores = {}
    for name, body in kernels.items():
        assert load.search(body), f"{name}: no 128-bit global load"
        n_stores[name] = len(store.findall(body))
    # The split path stores its partials as 16-byte vectors in every variant; the scaled
    # write must add 16-byte stores of its own on top.
    for name, count in n_stores.items():
        if re.search(r"Lb[01]ELb1E", name):
            plain = name.replace("ELb1E", "ELb0E", 1)
            assert count > n_stores[plain], f"{name}: the scaled write is not vectorised"


@needs_nvcc
@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not installed (PTX is checked instead)")
def test_sass_uses_ldg_128(compiled):
    _, _, cubin = compiled["token_stats.cu"]
    sass = subprocess.run([CUOBJDUMP, "-sass", str(cubin)], capture_output=True, text=True,
                          timeout=120).stdout
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    kernels = [f for f in functions if "token_stats_kernel" in f.split("\n", 1)[0]]
    assert len(kernels) == 12
    for f in kernels:
        assert "LDG.E.128" in f or re.search(r"LDG\.E\.EF\.128|LDG\.E\.\w*\.?128", f), \
            f.split("\n", 1)[0]


def test_built_extension_imports_or_is_absent():
    if importlib.util.find_spec("mllmcal._C_cuda") is None:
        pytest.skip("mllmcal._C_cuda is not built here")
    ext = importlib.import_module("mllmcal._C_cuda")
    assert ext.THREADS == 256 and ext.MAX_SPLITS >= 2
    assert ext.workspace_bytes(3, 1) == 0
    assert ext.workspace_bytes(3, 10) >= 3 * 10 * 32
    # Argument checks run before any CUDA call, so they work without a device: the shared
    # structural checks (csrc/common/bindings.h) raise ValueError, the launcher's RuntimeError.
    with pytest.raises(ValueError, match="dtype code"):
        ext.token_stats(x=16, dtype=9, n=2, v=5, stride_x=5, labels=0, ignore_index=-100,
                        temperature=1.0, temperature_rows=0, fstats=16, pred=16, flags=16,
                        scaled_out=0, stride_out=0, hist=0, n_bins=0, workspace=0, splits=1,
                        stream=0)
    with pytest.raises(RuntimeError, match="workspace"):
        ext.token_stats(x=16, dtype=0, n=2, v=5, stride_x=5, labels=0, ignore_index=-100,
                        temperature=1.0, temperature_rows=0, fstats=16, pred=16, flags=16,
                        scaled_out=0, stride_out=0, hist=0, n_bins=0, workspace=0, splits=4,
                        stream=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-device message")
def test_cuda_backend_without_device_names_what_is_missing():
    import mllmcal
    from mllmcal._backends import unavailable_reason

    assert "cuda" not in mllmcal.available_backends("cpu")
    msg = unavailable_reason("cuda", torch.device("cuda"))
    assert msg is not None and "mllmcal._C_cuda" in msg
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        mllmcal.token_stats(torch.randn(2, 5), backend="cuda")


def test_plan_splits_picks_path_a_for_large_batches_and_splits_small_ones():
    from mllmcal._backends.launch import MIN_SPLIT_ELEMENTS, plan_splits

    sm = 132
    assert plan_splits(1024, 128256, sm) == 1
    assert plan_splits(2 * sm, 32000, sm) == 1
    for n in (1, 2, 8, 64):
        for v in (7, 2048, 32000, 128256, 262144):
            s = plan_splits(n, v, sm)
            assert 1 <= s <= 256
            if s > 1:
                assert (v + s - 1) // s >= MIN_SPLIT_ELEMENTS // 2
    assert plan_splits(1, 128256, sm) > 32  # a single decode row must spread over the GPU
    assert plan_splits(1, 7, sm) == 1
