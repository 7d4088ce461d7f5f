"""Ahead-of-time compile checks of the Triton kernels: lower them for ``sm_<arch>``
without a GPU and summarise the PTX (vector loads, 64-bit row offsets, exps) and what ptxas
reports (registers, spills).

Run in a process where ``TRITON_INTERPRET`` is unset or 0 *before* the kernels are
imported (kernels created under the interpreter are not compilable objects)::

    TRITON_INTERPRET=0 python tools/aot.py            # both reports as JSON
    TRITON_INTERPRET=0 python tools/aot.py token_stats

``tests/test_triton_kernels.py`` and ``tests/test_temperature_fit_kernels.py`` run these
in a subprocess. Not part of the package: nothing at runtime compiles ahead of time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

__all__ = [
    "compile_linear_token_stats", "compile_temperature_fit", "compile_token_stats",
    "linear_token_stats_report", "temperature_fit_report", "token_stats_report",
]

_PTR_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


# --------------------------------------------------------------------------- token_stats

def _aot_signature(name: str, dtype: torch.dtype) -> dict[str, str]:
    """Argument types of kernel ``name`` as the JIT would specialise them for an
    ``[N, V]`` input of ``dtype`` with i32-sized scalars."""
    xt = _PTR_TYPES[dtype]
    row_head = {
        "x_ptr": xt, "stride_x": "i32", "out_ptr": xt, "stride_out": "i32",
        "labels_ptr": "*i64", "t_ptr": "*fp32", "t_scalar": "fp32",
    }
    if name == "row":
        return {
            **row_head, "fstats_ptr": "*fp32", "pred_ptr": "*i64", "flags_ptr": "*u8",
            "hist_ptr": "*i64", "n_rows": "i32", "n_cols": "i32", "n_bins": "i32",
            "ignore_index": "i32",
        }
    if name == "split":
        return {
            **row_head, "ws_f_ptr": "*fp32", "ws_i_ptr": "*i64", "ws_zy_ptr": "*fp32",
            "n_cols": "i32", "split_len": "i32", "n_splits": "i32", "ignore_index": "i32",
        }
    return {
        "ws_f_ptr": "*fp32", "ws_i_ptr": "*i64", "ws_zy_ptr": "*fp32", "labels_ptr": "*i64",
        "fstats_ptr": "*fp32", "pred_ptr": "*i64", "flags_ptr": "*u8", "hist_ptr": "*i64",
        "n_rows": "i32", "n_splits": "i32", "n_bins": "i32", "ignore_index": "i32",
    }


def compile_token_stats(
    name: str, dtype: torch.dtype = torch.float32, *, arch: int = 90, block_v: int = 2048,
    num_warps: int = 8, features: bool = True, aligned: bool = True,
):
    """Compile kernel ``name`` (``"row"``, ``"split"`` or ``"merge"``) for ``sm_<arch>``
    without a GPU and return Triton's ``CompiledKernel`` (``.asm["ptx"]``, ``.asm["cubin"]``).

    ``features`` switches labels, per-row temperature, scaled write and histogram all on
    (the largest variant) or all off. ``aligned`` adds the 16-byte divisibility hints the
    JIT gives to aligned pointers and strides divisible by 16 (what enables vector loads).
    Needs ``TRITON_INTERPRET`` unset or 0 when the kernels were imported: interpreted
    kernels are not compilable objects.
    """
    from mllmcal.kernels import token_stats as ts

    kernel = ts.KERNELS[name]
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError(
            "kernels were created under TRITON_INTERPRET=1; compile in a process without it"
        )
    signature = _aot_signature(name, dtype)
    flags: dict[str, bool | int] = {"HAS_LABELS": features}
    if name in ("row", "split"):
        flags.update(
            HAS_T_ROWS=features, WRITE_SCALED=features, APPLY_T=features, BLOCK_V=block_v
        )
    if name in ("row", "merge"):
        flags["HAS_HIST"] = features
    if name == "merge":
        flags["SPLITS_P2"] = 128
    for k in flags:
        signature[k] = "constexpr"
    # The JIT marks pointers and integers divisible by 16 (aligned rows, V % 16 == 0);
    # without it on the column bound the tail mask blocks vectorised loads.
    hinted = ("stride_x", "stride_out", "n_cols", "split_len")
    attrs = {}
    if aligned:
        for i, arg in enumerate(kernel.arg_names):
            if signature[arg].startswith("*") or arg in hinted:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=flags, attrs=attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
    )


def _ptxas_info(ptx: str, arch: int) -> dict[str, int] | None:
    """Registers and spill bytes that ptxas reports for ``ptx`` (None without ptxas)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 -- any failure just means "no bundled ptxas"
        ptxas = shutil.which("ptxas")
    if not ptxas:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "spill_stores": int(stores.group(1)) if stores else -1,
        "spill_loads": int(loads.group(1)) if loads else -1,
    }


def token_stats_report(arch: int = 90) -> list[dict]:
    """Compile every kernel for ``sm_<arch>`` in every variant CI checks and summarise the
    PTX: one dict per variant with the vector-load count (``ld.global.v4``), all global
    loads, and ptxas's register/spill report. Run without ``TRITON_INTERPRET=1``."""
    variants = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for name in ("row", "split"):
            for features in (True, False):
                variants.append((name, dtype, features, True))
        variants.append(("row", dtype, True, False))
    variants += [("merge", torch.float32, True, True), ("merge", torch.float32, False, True)]
    report = []
    for name, dtype, features, aligned in variants:
        ptx = compile_token_stats(name, dtype, arch=arch, features=features, aligned=aligned).asm["ptx"]
        entry = {
            "kernel": name, "dtype": str(dtype).removeprefix("torch."), "features": features,
            "aligned": aligned, "ptx_chars": len(ptx), "ld_global_v4": ptx.count("ld.global.v4"),
            "ld_global": ptx.count("ld.global"), "st_global_v4": ptx.count("st.global.v4"),
            "mul_lo_s64": ptx.count("mul.lo.s64"),
        }
        entry.update(_ptxas_info(ptx, arch) or {})
        report.append(entry)
    return report

# --------------------------------------------------------------------------- temperature_fit

def compile_temperature_fit(dtype: torch.dtype = torch.float32, *, arch: int = 90, block_v: int = 512,
                block_k: int = 16, num_warps: int = 8):
    """Compile the kernel for ``sm_<arch>`` without a GPU (``TRITON_INTERPRET`` unset or 0
    when the kernel was imported) and return Triton's ``CompiledKernel``."""
    from mllmcal.kernels.temperature_fit import _fit_kernel

    if not isinstance(_fit_kernel, triton.runtime.JITFunction):
        raise RuntimeError(
            "kernels were created under TRITON_INTERPRET=1; compile in a process without it"
        )
    signature = {
        "x_ptr": _PTR_TYPES[dtype], "stride_x": "i32", "labels_ptr": "*i64",
        "betas_ptr": "*fp32", "out_ptr": "*fp32", "status_ptr": "*u8", "n_cols": "i32",
        "n_temps": "i32", "ignore_index": "i32", "BLOCK_V": "constexpr", "BLOCK_K": "constexpr",
    }
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(_fit_kernel.arg_names)
             if signature[a].startswith("*") or a in ("stride_x", "n_cols")}
    src = ASTSource(fn=_fit_kernel, signature=signature,
                    constexprs={"BLOCK_V": block_v, "BLOCK_K": block_k}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def temperature_fit_report(arch: int = 90) -> list[dict]:
    """PTX summary of the kernel for each input dtype, compiled for ``sm_<arch>``."""
    report = []
    for dtype in _PTR_TYPES:
        ptx = compile_temperature_fit(dtype, arch=arch).asm["ptx"]
        report.append({
            "dtype": str(dtype).removeprefix("torch."), "ptx_chars": len(ptx),
            "ld_global_v4": ptx.count("ld.global.v4"), "mul_lo_s64": ptx.count("mul.lo.s64"),
            "ex2": ptx.count("ex2.approx"),
        })
    return report

# --------------------------------------------------------------------------- linear_token_stats

def compile_linear_token_stats(
    dtype: torch.dtype = torch.float32, *, arch: int = 90, features: bool = True,
    block_m: int = 64, block_v: int = 128, block_k: int = 64, num_warps: int = 8,
):
    """Compile the fused linear kernel for ``sm_<arch>`` without a GPU; returns Triton's
    ``CompiledKernel``. ``features`` turns bias, labels and per-row temperature all on or
    all off. Needs ``TRITON_INTERPRET`` unset or 0 when the kernel was imported."""
    from mllmcal.kernels.linear_token_stats import linear_token_stats_kernel as kernel

    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError("kernel was created under TRITON_INTERPRET=1; compile without it")
    xt = _PTR_TYPES[dtype]
    signature = {
        "h_ptr": xt, "stride_h": "i32", "w_ptr": xt, "stride_w": "i32", "bias_ptr": "*fp32",
        "labels_ptr": "*i64", "t_ptr": "*fp32", "t_scalar": "fp32", "fstats_ptr": "*fp32",
        "pred_ptr": "*i64", "flags_ptr": "*u8", "n_rows": "i32", "n_cols": "i32",
        "n_hidden": "i32", "ignore_index": "i32",
    }
    flags = {
        "HAS_BIAS": features, "HAS_LABELS": features, "HAS_T_ROWS": features,
        "APPLY_T": features, "BLOCK_M": block_m, "BLOCK_V": block_v, "BLOCK_K": block_k,
        "WIDEN_DOT": False,
    }
    for k in flags:
        signature[k] = "constexpr"
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names)
             if signature[a].startswith("*") or a in ("stride_h", "stride_w", "n_hidden")}
    src = ASTSource(fn=kernel, signature=signature, constexprs=flags, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def linear_token_stats_report(arch: int = 90) -> list[dict]:
    """Every dtype with all features on and off, compiled for ``sm_<arch>``: PTX size and
    MMA, ex2 and 64-bit multiply counts."""
    out = []
    for dtype in _PTR_TYPES:
        for features in (True, False):
            ptx = compile_linear_token_stats(dtype, arch=arch, features=features).asm["ptx"]
            out.append({
                "dtype": str(dtype).removeprefix("torch."), "features": features,
                "ptx_chars": len(ptx), "mma": ptx.count("mma.") + ptx.count("wgmma."),
                "ex2": ptx.count("ex2.approx"), "mul_lo_s64": ptx.count("mul.lo.s64"),
            })
    return out

REPORTS = {
    "token_stats": token_stats_report, "temperature_fit": temperature_fit_report,
    "linear_token_stats": linear_token_stats_report,
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(REPORTS)
    print(json.dumps({name: REPORTS[name](90) for name in names}))
