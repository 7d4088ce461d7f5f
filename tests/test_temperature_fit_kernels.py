"""The one-pass temperature-fit kernels (C++, Triton, CUDA, torch composite) against the
float64 reference: odd shapes, all dtypes, hostile rows, ignored labels, strided rows;
the Triton kernel under TRITON_INTERPRET=1 and compiled ahead of time for sm_90; the CUDA
source compiled by nvcc for sm_90."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mllmcal import reference as R
from mllmcal._backends import unavailable_reason
from mllmcal.ops import temperature_fit_rows
from mllmcal.reference import HOSTILE_KINDS, make_labels, make_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_BACKENDS = ["cpu", "torch", "triton"]


def _need(backend, device="cpu"):
    why = unavailable_reason(backend, device, "temperature_fit")
    if why is not None:
        if os.environ.get("CI") == "true" and backend == "cpu":
            pytest.fail(f"the C++ fit kernel must be built in CI: {why}")
        pytest.skip(why)


def _betas(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    # log-uniform in [0.1, 100] (T in [0.01, 10]), with the ends included
    b = torch.exp(torch.empty(k, dtype=torch.float64).uniform_(-2.3026, 4.6052, generator=g))
    if k >= 2:
        b[0], b[-1] = 0.1, 100.0
    return b.sort().values


def _check(out, status, x, y, betas):
    ref, ref_status = R.temperature_fit_rows(x.cpu(), y.cpu(), betas)
    assert torch.equal(status.cpu(), ref_status)
    got = out.cpu().double()
    # fp32 sums over V terms: relative error ~V·2**-24 at worst; derivatives are O(range of x).
    scale = ref.abs() + 1.0
    err = ((got - ref).abs() / scale).max().item() if ref.numel() else 0.0
    assert err < 2e-4, err
    assert torch.all(got[ref_status != R.FIT_USED] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, v, k", [(1, 1, 1), (5, 7, 5), (33, 129, 37), (9, 1031, 16)])
def test_odd_shapes_and_dtypes_match_reference(backend, dtype, n, v, k):
    _need(backend)
    x = make_logits(n, v, dtype, "masked", seed=n + v)
    y = make_labels(n, v, seed=n + v)
    b = _betas(k, seed=k)
    out, status = temperature_fit_rows(x, y, b, backend)
    assert out.shape == (n, 3, k) and out.dtype == torch.float32 and status.dtype == torch.uint8
    _check(out, status, x, y, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_rows_match_reference(backend, kind):
    _need(backend)
    dtype = torch.float16 if kind == "huge" else torch.float32
    x = make_logits(24, 67, dtype, kind, seed=3)
    y = make_labels(24, 67, seed=3)
    # Labels on masked entries: probability 0 at every T, status "masked label".
    if kind == "masked":
        masked = torch.isinf(x) & (x < 0)
        rows = masked.any(1).nonzero().flatten()[:4]
        for r in rows.tolist():
            y[r] = int(masked[r].nonzero()[0])
    b = _betas(11, seed=1)
    out, status = temperature_fit_rows(x, y, b, backend)
    _check(out, status, x, y, b)
    if kind == "masked":
        assert (status == R.FIT_MASKED_LABEL).sum() >= 1
    if kind in ("nan", "posinf", "fully_masked"):
        assert (status == R.FIT_SKIPPED).sum() > (y == -100).sum() // 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_rows_and_all_ignored(backend):
    _need(backend)
    wide = make_logits(12, 90, torch.bfloat16, "normal", seed=5)
    x = wide[:, 10:73]  # row stride 90, V = 63
    y = make_labels(12, 63, seed=5)
    b = _betas(6)
    out, status = temperature_fit_rows(x, y, b, backend)
    _check(out, status, x, y, b)
    out, status = temperature_fit_rows(x, torch.full((12,), -100), b, backend)
    assert torch.all(status == R.FIT_SKIPPED) and torch.all(out == 0)


def test_fp64_goes_to_the_torch_composite_and_bad_backends_are_clear():
    x = make_logits(6, 20, torch.float64, "masked", seed=2)
    y = make_labels(6, 20, seed=2)
    b = _betas(4)
    out, status = temperature_fit_rows(x, y, b, "auto")
    assert out.dtype == torch.float64
    _check(out, status, x, y, b)
    # fp64 is the composite's whatever was asked, as for token_stats.
    out64, _ = temperature_fit_rows(x, y, b, "cpu")
    assert out64.dtype == torch.float64
    with pytest.raises(ValueError, match="backend must be one of"):
        temperature_fit_rows(x.float(), y, b, "tpu")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        temperature_fit_rows(x.float(), y, b, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["masked", "nan", "huge", "fully_masked"])
def test_gpu_backends_match_reference(backend, dtype, kind):
    _need(backend, "cuda")
    x = make_logits(70, 5003, dtype, kind, seed=7, device="cuda")
    y = make_labels(70, 5003, seed=7, device="cuda")
    b = _betas(37)
    out, status = temperature_fit_rows(x, y, b, backend)
    _check(out, status, x, y, b)


# --------------------------------------------------------------------------- compiled forms


def _run_python(code, **env):
    e = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=e, timeout=600)


def test_triton_kernel_compiles_ahead_of_time_for_sm90():
    pytest.importorskip("triton")
    res = _run_python(
        f"import json, sys; sys.path.insert(0, {os.path.join(ROOT, 'tools')!r}); import aot; "
        "print(json.dumps(aot.temperature_fit_report(90)))",
        TRITON_INTERPRET="0",
    )
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert {r["dtype"] for r in report} == {"float32", "float16", "bfloat16"}
    for r in report:
        assert r["ptx_chars"] > 0 and r["ex2"] >= 1, r
        assert r["mul_lo_s64"] >= 1, r  # 64-bit row offsets


def _tool(name):
    found = shutil.which(name)
    if found:
        return found
    path = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)
    return path if os.path.isfile(path) else None


@pytest.mark.skipif(_tool("nvcc") is None or _tool("ptxas") is None, reason="nvcc not found")
def test_cuda_kernel_compiles_for_sm90_without_spills(tmp_path):
    src = os.path.join(ROOT, "csrc", "cuda", "temperature_fit.cu")
    ptx, cubin = tmp_path / "tf.ptx", tmp_path / "tf.cubin"
    r = subprocess.run([_tool("nvcc"), "-O3", "-std=c++17", "-arch=sm_90", "-I",
                        os.path.join(ROOT, "csrc"), "-ptx", src, "-o", str(ptx)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([_tool("ptxas"), "-arch=sm_90", "-O3", "-v", str(ptx), "-o", str(cubin)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = r.stdout + r.stderr
    kernels = re.findall(r"Compiling entry function '(\S+)'", report)
    assert len(kernels) == 3 and all("temperature_fit_kernel" in k for k in kernels)
    assert "ex2.approx" in ptx.read_text()
    for spill in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report):
        assert spill == ("0", "0")
    for regs in re.findall(r"Used (\d+) registers", report):
        assert int(regs) <= 64


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["normal", "masked", "peaked", "huge"])
def test_default_doubling_grid_matches_reference(backend, kind):
    # The default grid's β double every 3 steps: the C++ kernel squares exps along those
    # chains (re-seeding every 4 steps) and skips tiles whose terms all underflow.
    from mllmcal.calibration.onepass import onepass_temperatures

    _need(backend)
    b = torch.tensor([1.0 / t for t in onepass_temperatures()], dtype=torch.float64)
    b32 = b.float()
    assert sum(bool((b32 == 2 * v).any()) for v in b32) == len(b) - 3
    x = make_logits(20, 2500, torch.float32, kind, seed=9)
    y = make_labels(20, 2500, seed=9)
    out, status = temperature_fit_rows(x, y, b, backend)
    _check(out, status, x, y, b)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 12), v=st.integers(1, 700), k=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    kind=st.sampled_from(HOSTILE_KINDS), seed=st.integers(0, 2**31 - 1),
)
def test_property_cpu_kernel_matches_reference(n, v, k, dtype, kind, seed):
    _need("cpu")
    if kind == "huge" and dtype != torch.float32:
        kind = "normal"
    x = make_logits(n, v, dtype, kind, seed=seed)
    y = make_labels(n, v, seed=seed)
    b = _betas(k, seed=seed)
    out, status = temperature_fit_rows(x, y, b, "cpu")
    _check(out, status, x, y, b)
