"""The benchmark suite of the fused token-statistics op (``mllmcal bench``, ``bench/``).

On a GPU it times, per shape ``[batch, vocab]`` and dtype, the ``triton`` and ``cuda``
backends against the torch eager composite (:func:`mllmcal.reference.eager_composite`, the
same function the tests use) and ``torch.compile`` of it:

* cold L2: a 256 MB buffer is overwritten before every repetition (the H200's L2 is 50 MB);
* the median of CUDA-event timings of single calls;
* GB/s counting the logits' bytes read once (``batch * vocab * itemsize``);
* the fraction of device-to-device copy bandwidth measured in the same run (a large
  ``dst.copy_(src)``, counted as read + write bytes, which is what HBM can stream);
* ``speedup_vs_eager`` against the eager composite on the same shape.

Without a GPU it runs a CPU mode (backends ``cpu``, ``torch``, ``eager``, ``compile``, a
reduced shape set, wall-clock medians; the copy reference is a CPU ``copy_``).

Results go to ``bench/results/`` as JSON (device name, versions, date, records), a
Markdown table and a matplotlib plot. ``bench/bench_gpu.py --write-autotune`` turns a GPU
run into ``mllmcal/_autotune.json``, from which :func:`mllmcal._autotune.preferred_cuda_backend`
picks Triton or CUDA per shape.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._backends import unavailable_reason
from .reference import eager_composite, make_labels, make_logits

__all__ = [
    "GPU_BATCHES", "GPU_VOCABS", "CPU_BATCHES", "CPU_VOCABS", "Record", "run_suite",
    "markdown_table", "plot_records",
]

GPU_BATCHES = (1, 8, 64, 256, 1024)
GPU_VOCABS = (32000, 128256, 151936, 262144)
CPU_BATCHES = (1, 8, 64)
CPU_VOCABS = (32000, 128256)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GPU_BACKENDS = ("triton", "cuda", "eager", "compile")
CPU_BACKENDS = ("cpu", "torch", "eager", "compile")
L2_FLUSH_BYTES = 256 << 20
COPY_BYTES = 1 << 30


@dataclass
class Record:
    batch: int
    vocab: int
    dtype: str
    backend: str
    median_us: float
    gbps: float
    bandwidth_fraction: float
    speedup_vs_eager: float | None = None


# --------------------------------------------------------------------------- timing


def _time_cuda(fn: Callable[[], object], reps: int, flush: torch.Tensor) -> float:
    """Median µs of ``fn`` over ``reps`` single calls, each after evicting L2."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for _ in range(3):
        fn()
    for s, e in zip(starts, ends, strict=True):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True))


def _time_cpu(fn: Callable[[], object], reps: int) -> float:
    """Median wall-clock µs of ``fn`` over ``reps`` calls (after two warm-up calls)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, reps: int = 20, nbytes: int = COPY_BYTES) -> float:
    """Device-to-device (or host memcpy) bandwidth in GB/s, counting read + write bytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        us = _time_cuda(lambda: dst.copy_(src), reps, flush)
    else:
        us = _time_cpu(lambda: dst.copy_(src), reps)
    return 2 * nbytes / (us * 1e-6) / 1e9


# --------------------------------------------------------------------------- the suite


def _callable(backend: str, x: torch.Tensor, y: torch.Tensor,
              compiled: Callable | None) -> Callable[[], object]:
    import mllmcal

    if backend == "eager":
        return lambda: eager_composite(x, y)
    if backend == "compile":
        assert compiled is not None
        return lambda: compiled(x, y)
    return lambda: mllmcal.token_stats(x, y, backend=backend, validate=False)


def _available(backends: Iterable[str], device: torch.device) -> tuple[list[str], dict[str, str]]:
    ok, skipped = [], {}
    for b in backends:
        why = None if b in ("eager", "compile") else unavailable_reason(b, device)
        if why is None:
            ok.append(b)
        else:
            skipped[b] = why
    return ok, skipped


def _metadata(device: torch.device, copy_gbps: float, mode: str) -> dict:
    import mllmcal

    meta = {
        "mode": mode,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores",
        "copy_gbps": round(copy_gbps, 2),
        "versions": {
            "mllmcal": mllmcal.__version__, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
        },
        "timing": "median of CUDA events, L2 flushed (256 MB) before each rep"
        if device.type == "cuda" else "median wall clock, warm caches",
        "bytes_counted": "batch * vocab * itemsize (logits read once)",
    }
    try:
        import triton

        meta["versions"]["triton"] = triton.__version__
    except ImportError:
        meta["versions"]["triton"] = None
    return meta


def run_suite(
    device: str | torch.device | None = None,
    batches: Sequence[int] | None = None,
    vocabs: Sequence[int] | None = None,
    dtypes: Sequence[str] = ("bf16", "fp32"),
    backends: Sequence[str] | None = None,
    reps: int | None = None,
    out_dir: str | os.PathLike = "bench/results",
    tag: str | None = None,
    progress: bool = True,
) -> dict:
    """Time every (shape, dtype, backend) and write JSON, Markdown and a plot.

    Args:
        device: ``"cuda"``, ``"cpu"`` or None (CUDA when available).
        batches, vocabs: the shape grid; defaults to the full GPU grid
            (``GPU_BATCHES x GPU_VOCABS``) on CUDA, ``CPU_BATCHES x CPU_VOCABS`` on the CPU.
        dtypes: names from ``DTYPES`` (``"bf16"``, ``"fp32"``).
        backends: defaults to ``GPU_BACKENDS`` / ``CPU_BACKENDS``; ``"eager"`` is always
            added (it is the baseline of ``speedup_vs_eager``). Unavailable ones are listed
            under ``"skipped"`` in the result.
        reps: timed repetitions per point (default 50 on CUDA, 5 on the CPU).
        out_dir: where ``<tag>.json``, ``<tag>.md`` and ``<tag>.png`` go.
        tag: file stem (default ``token_stats_<gpu|cpu>_<date>``).

    Returns:
        The JSON document: ``{"meta": {...}, "records": [Record fields...], "skipped":
        {...}, "files": {...}}``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    batches = tuple(batches or (GPU_BATCHES if on_gpu else CPU_BATCHES))
    vocabs = tuple(vocabs or (GPU_VOCABS if on_gpu else CPU_VOCABS))
    wanted = list(backends or (GPU_BACKENDS if on_gpu else CPU_BACKENDS))
    if "eager" not in wanted:
        wanted.append("eager")
    reps = reps or (50 if on_gpu else 5)
    names, skipped = _available(wanted, device)
    compiled = torch.compile(eager_composite, dynamic=False) if "compile" in names else None
    copy_gbps = copy_bandwidth_gbps(device, nbytes=COPY_BYTES if on_gpu else 256 << 20)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if on_gpu else None

    points = [(d, b, v) for d in dtypes for b in batches for v in vocabs]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(points) * len(names), disable=not progress, leave=False)
    records: list[Record] = []
    for dname, b, v in points:
        dtype = DTYPES[dname]
        x = make_logits(b, v, dtype, "normal", seed=b + v, device=device)
        y = make_labels(b, v, seed=b, device=device)
        nbytes = b * v * x.element_size()
        timed: dict[str, float] = {}
        for name in names:
            bar.set_description(f"{dname} [{b}, {v}] {name}")
            fn = _callable(name, x, y, compiled)
            try:
                us = _time_cuda(fn, reps, flush) if on_gpu else _time_cpu(fn, reps)
            except Exception as exc:  # one failing backend must not lose the whole run
                skipped[f"{name}@{dname}[{b},{v}]"] = f"{type(exc).__name__}: {exc}"
                bar.update(1)
                continue
            timed[name] = us
            gbps = nbytes / (us * 1e-6) / 1e9
            records.append(Record(b, v, dname, name, round(us, 3), round(gbps, 2),
                                  round(gbps / copy_gbps, 4)))
            bar.update(1)
        for r in records:
            if (r.batch, r.vocab, r.dtype) == (b, v, dname) and "eager" in timed:
                r.speedup_vs_eager = round(timed["eager"] / r.median_us, 3)
        del x, y
    bar.close()

    mode = "gpu" if on_gpu else "cpu"
    tag = tag or f"token_stats_{mode}_{_dt.date.today().isoformat()}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": _metadata(device, copy_gbps, mode), "records": [asdict(r) for r in records],
           "skipped": skipped}
    files = {"json": str(out / f"{tag}.json"), "markdown": str(out / f"{tag}.md"),
             "plot": str(out / f"{tag}.png")}
    doc["files"] = files
    Path(files["json"]).write_text(json.dumps(doc, indent=1) + "\n")
    Path(files["markdown"]).write_text(markdown_table(doc) + "\n")
    plot_records(doc, files["plot"])
    print(markdown_table(doc))
    print(f"\nwrote {files['json']}, {files['markdown']}, {files['plot']}")
    return doc


# --------------------------------------------------------------------------- reports


def markdown_table(doc: dict) -> str:
    """One row per (dtype, batch, vocab): each backend's median µs, with GB/s and the
    fraction of copy bandwidth for the fused backends, and their speedup over eager."""
    recs = doc["records"]
    backends = list(dict.fromkeys(r["backend"] for r in recs))
    meta = doc["meta"]
    lines = [
        f"token_stats on {meta['device']} ({meta['mode']} mode, {meta['date']}); "
        f"copy bandwidth {meta['copy_gbps']} GB/s; {meta['timing']}.",
        "",
        "| dtype | batch | vocab | " + " | ".join(f"{b} µs" for b in backends)
        + " | best fused: GB/s (fraction of copy) | best vs eager |",
        "|---|---:|---:|" + "---:|" * len(backends) + "---|---:|",
    ]
    keys = list(dict.fromkeys((r["dtype"], r["batch"], r["vocab"]) for r in recs))
    for key in keys:
        row = {r["backend"]: r for r in recs if (r["dtype"], r["batch"], r["vocab"]) == key}
        cells = [f"{row[b]['median_us']:.1f}" if b in row else "-" for b in backends]
        fused = [r for b, r in row.items() if b not in ("eager", "compile")]
        best = min(fused, key=lambda r: r["median_us"]) if fused else None
        bw = (f"{best['backend']}: {best['gbps']:.3g} ({best['bandwidth_fraction']:.1%})"
              if best else "-")
        sp = f"{best['speedup_vs_eager']:.3g}x" if best and best["speedup_vs_eager"] else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells)
                     + f" | {bw} | {sp} |")
    return "\n".join(lines)


def plot_records(doc: dict, path: str | os.PathLike) -> None:
    """GB/s against elements per call, one panel per dtype, one line per backend, with the
    measured copy bandwidth as the ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = doc["records"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in recs)) or ["bf16"]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.2), squeeze=False)
    for ax, dname in zip(axes[0], dtypes, strict=True):
        for backend in dict.fromkeys(r["backend"] for r in recs):
            pts = sorted((r["batch"] * r["vocab"], r["gbps"]) for r in recs
                         if r["dtype"] == dname and r["backend"] == backend)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, lw=1, label=backend)
        ax.axhline(doc["meta"]["copy_gbps"], color="k", ls="--", lw=0.8, label="copy (r+w)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("elements per call (batch x vocab)")
        ax.set_ylabel("GB/s (logits read once)")
        ax.set_title(f"token_stats, {dname}, {doc['meta']['device']}", fontsize=9)
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

