"""Public fused ops, each a torch op with a fake implementation.

* :func:`token_stats` -- one read of a ``[..., V]`` logits tensor gives per-row confidence
  statistics (semantics in ``docs/design.md`` and :mod:`mllmcal._contract`), optionally
  the temperature-scaled logits and integer adds to a calibration histogram;
* :func:`histogram_add_` -- the histogram add on its own, from any source of confidences;
* :func:`temperature_fit_rows` -- per-row NLL and its first two derivatives in β = 1/T at K
  temperatures, what the one-pass temperature fit accumulates;
* ``mllmcal::linear_token_stats`` -- :func:`token_stats` of ``hidden @ weight.T + bias``
  without the logits (public function and computation in :mod:`mllmcal.linear`).

Backends (``backend=``): ``"triton"`` (CUDA tensors; CPU tensors under
``TRITON_INTERPRET=1``), ``"cuda"`` (``mllmcal._C_cuda``), ``"cpu"`` (the C++/OpenMP kernel of
``mllmcal._C``), ``"torch"`` (a chunked composite, any device, the only one that reads fp64)
and ``"auto"``. Which one runs, and how ``MLLMCAL_BACKEND`` overrides ``"auto"``, is decided
for every op alike by :mod:`mllmcal._backends.registry`.
"""

from __future__ import annotations

import torch

from . import _contract as C
from ._backends.composite import histogram_add_into as _histogram_add_into
from ._backends.registry import BACKENDS, DTYPE_CODES, load, resolve, unavailable_reason
from ._checks import (
    check_histogram,
    check_labels,
    check_scalar_temperature,
    check_temperature,
    plain_labels,
)

__all__ = [
    "BACKENDS", "TokenStats", "available_backends", "check_scalar_temperature",
    "histogram_add_", "resolve_backend", "temperature_fit_rows", "token_stats",
    "unavailable_reason",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class TokenStats:
    """Per-row statistics of ``logits / T``; each field has the logits' leading shape.

    Float fields are fp32; ``prediction`` is int64 (-1 on invalid rows); ``valid`` and
    ``correct`` are bool. ``label_logprob``, ``correct`` and ``brier`` are None unless
    labels were given. ``logit_mean``/``logit_var`` are ``E_p[z]``/``Var_p[z]`` of the
    scaled logits ``z`` (what temperature fitting needs). The statistics carry no
    gradient on any backend (they are measurements, not a loss).

    ``valid`` and ``correct`` are decoded from the kernel's uint8 flags when read, so a
    caller that never reads them (the decode loop) pays no device op for them; likewise the
    float fields of a kernel's result are views of its ``[7, N]`` block made on first read.
    """

    __slots__ = (
        "logsumexp", "confidence", "prediction", "entropy", "logit_mean", "logit_var",
        "label_logprob", "brier", "backend", "_valid", "_correct", "_flags", "_shape",
        "_fstats", "_block",
    )
    FIELDS = (
        "logsumexp", "confidence", "prediction", "entropy", "valid", "logit_mean",
        "logit_var", "label_logprob", "correct", "brier",
    )

    def __init__(
        self,
        logsumexp: torch.Tensor,
        confidence: torch.Tensor,
        prediction: torch.Tensor,
        entropy: torch.Tensor,
        valid: torch.Tensor | None = None,
        logit_mean: torch.Tensor | None = None,
        logit_var: torch.Tensor | None = None,
        label_logprob: torch.Tensor | None = None,
        correct: torch.Tensor | None = None,
        brier: torch.Tensor | None = None,
        backend: str = "torch",
        *,
        flags: torch.Tensor | None = None,
    ) -> None:
        if valid is None and flags is None:
            raise ValueError("TokenStats needs `valid` or the kernel's `flags`")
        self.logsumexp, self.confidence, self.prediction = logsumexp, confidence, prediction
        self.entropy, self.logit_mean, self.logit_var = entropy, logit_mean, logit_var
        self.label_logprob, self.brier, self.backend = label_logprob, brier, backend
        self._valid, self._correct, self._flags = valid, correct, flags
        self._shape = logsumexp.shape
        self._fstats = self._block = None

    @classmethod
    def from_kernel(cls, fstats: torch.Tensor, pred: torch.Tensor, flags: torch.Tensor,
                    lead: tuple[int, ...], labelled: bool, backend: str) -> TokenStats:
        """From a fused op's fstats fp32 ``[7, N]``, prediction int64 ``[N]`` and flags uint8
        ``[N]`` (:mod:`mllmcal._contract`), fields shaped ``lead``; ``labelled``: had labels.
        The float fields are views made when first read (``__getattr__``): ~1 µs each."""
        flat = len(lead) == 1  # the decode loop's case: no reshapes
        if torch.compiler.is_compiling():
            # In a graph views cost nothing at run time; Dynamo gets a plain object.
            f = [t if flat else t.reshape(lead) for t in fstats.unbind(0)]
            return cls(
                f[C.LSE], f[C.CONF], pred if flat else pred.reshape(lead), f[C.ENT],
                logit_mean=f[C.MEAN], logit_var=f[C.VAR],
                label_logprob=f[C.LABEL_LOGPROB] if labelled else None,
                brier=f[C.BRIER] if labelled else None, backend=backend, flags=flags,
            )
        self = cls._lazy(torch.Size(lead), labelled, backend)
        self._fstats, self._flags = fstats, flags
        self.prediction = pred if flat else pred.reshape(lead)
        return self

    @classmethod
    def _lazy(cls, shape: torch.Size, labelled: bool, backend: str,
              block: torch.Tensor | None = None) -> TokenStats:
        """A result whose fields are views made when first read (``__getattr__``), of
        ``block`` (the eager CPU path's one allocation, :func:`_block_floats`) or of the
        ``_fstats`` the caller sets. No tensor op."""
        self = cls.__new__(cls)
        self._shape, self.backend, self._block, self._fstats = shape, backend, block, None
        self._valid = self._correct = None
        if not labelled:
            self.label_logprob = self.brier = None
        return self

    def __getattr__(self, name: str) -> torch.Tensor:
        # Only for an unset slot: a kernel result's field read for the first time (unset
        # _fstats or _block fail both tests: no recursion). The view is kept in the slot.
        row = _FSTATS_ROWS.get(name)
        if row is not None and self._fstats is not None:
            t = self._fstats[row]
            if len(self._shape) != 1:
                t = t.reshape(self._shape)
        elif (row is not None or name in _BLOCK_INTS) and self._block is not None:
            t = _block_view(self._block, self._shape[0], name, row)
        else:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        setattr(self, name, t)
        return t

    # Decoded on every access, not cached: under CUDA-graph replay the flags tensor is
    # refilled in place, and a cached decoding would go stale.
    @property
    def valid(self) -> torch.Tensor:
        if self._valid is not None:
            return self._valid
        return ((self._flags & C.FLAG_VALID) != 0).reshape(self._shape)

    @property
    def correct(self) -> torch.Tensor | None:
        if self._correct is not None or self._flags is None or self.label_logprob is None:
            return self._correct
        return ((self._flags & C.FLAG_CORRECT) != 0).reshape(self._shape)

    @property
    def flags(self) -> torch.Tensor | None:
        """The kernel's uint8 ``[N]`` row flags (bit 0 valid, bit 1 correct), if any."""
        return self._flags

    def as_dict(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name (``valid`` and ``correct`` decoded)."""
        fields = {name: getattr(self, name) for name in self.FIELDS}
        return {name: t for name, t in fields.items() if isinstance(t, torch.Tensor)}

    def __repr__(self) -> str:
        return f"TokenStats(backend={self.backend!r}, shape={tuple(self._shape)})"


_FSTATS_ROWS = {
    "logsumexp": C.LSE, "confidence": C.CONF, "entropy": C.ENT, "logit_mean": C.MEAN,
    "logit_var": C.VAR, "label_logprob": C.LABEL_LOGPROB, "brier": C.BRIER,
}
_BLOCK_INTS = ("prediction", "_flags")


# The eager CPU path's three outputs share one fp32 allocation (a torch.empty costs more
# than the Python around it): prediction int64 [N] at byte 0 (torch's CPU allocations are
# 64-byte aligned), the fp32 [7, N] statistics at float 2N, the uint8 flags at byte 36N.
def _block_floats(n: int) -> int:
    return 9 * n + (n + 3) // 4


def _block_view(block: torch.Tensor, n: int, name: str, row: int | None) -> torch.Tensor:
    if row is not None:
        return block[(2 + row) * n:(3 + row) * n]
    if name == "prediction":
        return block[:2 * n].view(torch.int64)
    return block.view(torch.uint8)[36 * n:37 * n]


# --------------------------------------------------------------------------- backends


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run :func:`token_stats` on ``device`` in this process
    (:func:`unavailable_reason` says why one cannot)."""
    from ._backends.registry import available

    return available(device)


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype, n: int = 1, v: int = 1
) -> str:
    """The backend :func:`token_stats` runs for an ``[n, v]`` tensor when ``backend`` is
    asked for (the registry's policy: :func:`mllmcal._backends.registry.resolve`)."""
    return resolve("token_stats", backend, device, dtype, n, v)


# --------------------------------------------------------------------------- torch ops
#
# The kernels are registered as torch operators with fake (meta) implementations
# (https://pytorch.org/tutorials/advanced/python_custom_ops.html), so that
# torch.compile(fullgraph=True) traces through them and CUDA-graph capture records them
# like any aten op. Inputs are validated by `token_stats` before the op: the op itself
# only dispatches to a backend.
#
# Registered with torch.library.Library rather than the @custom_op decorator: the
# decorator wraps every call in Python autograd and ADInplaceOrView layers (default
# filling, version bumps) that cost ~25 us per call on this CPU against ~7 us for the op
# itself, and the decode loop calls it once per token. Without an autograd kernel the
# dispatcher's autograd fallback applies; `token_stats` detaches its inputs, and the
# impl bumps the version counters of what it writes, which is what ADInplaceOrView does.

_lib = torch.library.Library("mllmcal", "FRAGMENT")
_lib.define(
    "token_stats(Tensor x, Tensor? labels, float temperature, Tensor? temperature_rows, "
    "Tensor(a!)? scaled_out, Tensor(b!)? histogram, int ignore_index, str backend) "
    "-> (Tensor, Tensor, Tensor)"
)


def _empty_outputs(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """fstats fp32 ``[7, N]``, prediction int64 ``[N]`` and flags uint8 ``[N]``, unfilled
    (in a fake implementation, fake tensors)."""
    return (
        torch.empty((C.N_FSTATS, n), dtype=torch.float32, device=device),
        torch.empty(n, dtype=torch.int64, device=device),
        torch.empty(n, dtype=torch.uint8, device=device),
    )


def _token_stats_impl(
    x: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    temperature_rows: torch.Tensor | None,
    scaled_out: torch.Tensor | None,
    histogram: torch.Tensor | None,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mllmcal::token_stats``: fstats fp32 ``[7, N]``, prediction int64 ``[N]`` and flags
    uint8 ``[N]`` of ``x`` ``[N, V]`` (layout in :mod:`mllmcal._contract`)."""
    fstats, pred, flags = _empty_outputs(x.shape[0], x.device)
    if x.shape[0]:
        mod = load(backend)
        # The statistics are measurements with no gradient on every backend; no_grad also
        # stops the torch composite from recording a graph into the outputs.
        with torch.no_grad():
            mod.token_stats_into(
                x, labels, temperature, temperature_rows, fstats, pred, flags, scaled_out,
                histogram, ignore_index,
            )
        for t in (scaled_out, histogram):
            if t is not None:
                torch.autograd.graph.increment_version(t)
    return fstats, pred, flags


_lib.impl("token_stats", _token_stats_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("mllmcal::token_stats", lib=_lib)
def _token_stats_fake(x, labels, temperature, temperature_rows, scaled_out, histogram,
                      ignore_index, backend):
    return _empty_outputs(x.shape[0], x.device)


_token_stats_op = torch.ops.mllmcal.token_stats.default


_lib.define("histogram_add(Tensor(a!) hist, Tensor conf, Tensor correct, Tensor keep) -> ()")
_lib.impl("histogram_add", _histogram_add_into, "CompositeExplicitAutograd")


@torch.library.register_fake("mllmcal::histogram_add", lib=_lib)
def _histogram_add_fake(hist, conf, correct, keep) -> None:
    return None


_histogram_add_op = torch.ops.mllmcal.histogram_add.default

_lib.define(
    "temperature_fit(Tensor x, Tensor labels, Tensor betas, int ignore_index, str backend) "
    "-> (Tensor, Tensor)"
)


def _temperature_fit_impl(
    x: torch.Tensor, labels: torch.Tensor, betas: torch.Tensor, ignore_index: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mllmcal::temperature_fit``: out ``[N, 3, K]`` and status uint8 ``[N]`` (see
    :func:`temperature_fit_rows`)."""
    n = x.shape[0]
    out = torch.empty(n, 3, betas.numel(), dtype=_fit_out_dtype(x), device=x.device)
    status = torch.empty(n, dtype=torch.uint8, device=x.device)
    if n:
        with torch.no_grad():
            load(backend).temperature_fit_into(x, labels, betas, out, status, ignore_index)
    return out, status


def _fit_out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_lib.impl("temperature_fit", _temperature_fit_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("mllmcal::temperature_fit", lib=_lib)
def _temperature_fit_fake(x, labels, betas, ignore_index, backend):
    n = x.shape[0]
    return (
        x.new_empty((n, 3, betas.shape[0]), dtype=_fit_out_dtype(x)),
        x.new_empty((n,), dtype=torch.uint8),
    )


_temperature_fit_op = torch.ops.mllmcal.temperature_fit.default


# linear_token_stats(hidden [N, H], weight [V, H], ...): the computation lives in
# mllmcal.linear (imported on first call, since it imports this module).
_lib.define(
    "linear_token_stats(Tensor hidden, Tensor weight, Tensor? bias, Tensor? labels, "
    "float temperature, Tensor? temperature_rows, Tensor(a!)? histogram, int ignore_index, "
    "str backend) -> (Tensor, Tensor, Tensor)"
)


def _linear_token_stats_impl(hidden, weight, bias, labels, temperature, temperature_rows,
                             histogram, ignore_index, backend):
    """``mllmcal::linear_token_stats``: as ``token_stats`` of ``hidden @ weight.T + bias``."""
    from .linear import linear_token_stats_into

    fstats, pred, flags = _empty_outputs(hidden.shape[0], hidden.device)
    if hidden.shape[0]:
        with torch.no_grad():
            linear_token_stats_into(hidden, weight, bias, labels, temperature,
                                    temperature_rows, ignore_index, backend, fstats, pred, flags)
            if histogram is not None:
                keep = ((flags & C.FLAG_VALID) != 0) & (labels != ignore_index)
                _histogram_add_op(histogram, fstats[C.CONF], (flags & C.FLAG_CORRECT) != 0, keep)
                torch.autograd.graph.increment_version(histogram)
    return fstats, pred, flags


_lib.impl("linear_token_stats", _linear_token_stats_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("mllmcal::linear_token_stats", lib=_lib)
def _linear_token_stats_fake(hidden, weight, bias, labels, temperature, temperature_rows,
                             histogram, ignore_index, backend):
    return _empty_outputs(hidden.shape[0], hidden.device)


_linear_token_stats_op = torch.ops.mllmcal.linear_token_stats.default


@torch.compiler.assume_constant_result
def _resolve_for_trace(
    op: str, backend: str, device: torch.device, dtype: torch.dtype, n: int, v: int
) -> str:
    # Under torch.compile the choice is made once at trace time (it reads the environment
    # and imports backend modules, which Dynamo should not trace); eagerly, a plain call.
    return resolve(op, backend, device, dtype, n, v)


# --------------------------------------------------------------------------- public op


def token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    backend: str = "auto",
    *,
    ignore_index: int = C.IGNORE_INDEX,
    scaled_out: torch.Tensor | None = None,
    histogram: torch.Tensor | None = None,
    validate: bool = True,
) -> TokenStats:
    """Per-token confidence statistics of ``logits / temperature`` in one pass.

    Args:
        logits: ``[..., V]`` fp32, fp16 or bf16 (fp64 goes to the torch backend); any
            device; any row strides, including 0 (``expand``) and overlapping rows
            (``unfold``). The last dim must have stride 1 for the fast kernels (otherwise
            a contiguous copy is made). Leading dims are flattened to N rows.
        labels: optional integer tensor with exactly the leading shape ``logits.shape[:-1]``,
            values in ``[0, V)`` or ``ignore_index``.
        temperature: a float > 0 (also in fp32) or a float tensor with one entry per row.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.
        ignore_index: label value that marks a row without a label.
        scaled_out: optional tensor shaped like ``logits`` (same dtype) that receives
            ``logits / temperature`` in the same pass; it may be ``logits`` itself. Its
            rows must not overlap.
        histogram: optional int64 ``[3, n_bins]`` tensor on the logits' device; rows that
            are valid and labelled are *added* to it (count, Σ confidence in units of
            2**-32, Σ correct). Needs ``labels``.
        validate: check label range and per-row temperatures (a host sync on GPU). The
            decode loop passes False; then, and inside ``torch.compile``, a label outside
            ``[0, V)`` is treated as ignored instead of raising.

    Returns:
        :class:`TokenStats` with fp32 fields shaped like ``logits.shape[:-1]``, on the
        logits' device. No field requires grad, whatever ``logits.requires_grad`` is:
        the statistics are not differentiable on any backend.

    It runs as the torch op ``torch.ops.mllmcal.token_stats`` (one kernel launch on the fast
    backends), so ``torch.compile(fullgraph=True)`` compiles code that calls it (pass the
    temperature as a Python float or an ``[N]`` tensor there; the backend is chosen once,
    at trace time), and CUDA graphs capture it.

    Example:
        >>> import torch, mllmcal
        >>> s = mllmcal.token_stats(torch.tensor([[2.0, 0.0, 0.0]]), labels=torch.tensor([0]))
        >>> round(float(s.confidence[0]), 4), bool(s.correct[0])
        (0.787, True)
        >>> s = mllmcal.token_stats(torch.randn(2, 5, 11), temperature=1.5)
        >>> s.entropy.shape, s.prediction.dtype
        (torch.Size([2, 5]), torch.int64)
    """
    # The eager CPU path. The decode loop's call (plain CPU tensor, few rows, float
    # temperature) is a kernel of ~13 µs at [1, 151936] on the 2-core CI box; the op route
    # added ~35 µs of Python and dispatcher to it, and a cold call (between decode steps)
    # pays for every frame. Where nothing could tell, the kernel is called here, inline.
    # The op serves everything else: torch.compile, tensor subclasses (FakeTensor too),
    # dispatch and function modes, functorch transforms, torch.jit.trace, the profiler,
    # scaled_out and histogram (version counters), tensor temperatures, unclean labels.
    name = None
    if (
        type(logits) is torch.Tensor
        and type(temperature) is float
        and scaled_out is None
        and histogram is None
        and logits.is_cpu
        and logits.dim() == 2
        and logits.dtype in DTYPE_CODES
        and not torch.compiler.is_compiling()
        # No mode, transform, tracer or profiler that should see mllmcal::token_stats:
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._len_torch_function_stack()
        and not torch._C._are_functorch_transforms_active()
        and not torch._C._get_tracing_state()
        and not torch.autograd._profiler_enabled()
    ):
        n, v = logits.shape
        y = plain_labels(labels, n, v, ignore_index)
        if y is not False and n and v and logits.stride(1) == 1:
            t = check_scalar_temperature(temperature)  # the same error as below, if any
            name = resolve("token_stats", backend, logits.device, logits.dtype, n, v)
            if name == "cpu":
                block = torch.empty(_block_floats(n), dtype=torch.float32)
                at = block.data_ptr()
                load("cpu").token_stats_at(logits, y, t, int(ignore_index), at + 8 * n, at,
                                           at + 36 * n)
                return TokenStats._lazy(logits.shape[:1], y is not None, "cpu", block)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float32, float16, bfloat16 or float64, got {logits.dtype}"
        )
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the vocabulary)")
    lead = tuple(logits.shape[:-1])
    v = logits.shape[-1]
    if v == 0:
        raise ValueError("logits have an empty vocabulary dimension (V = 0)")
    x = logits.detach()
    x = x if x.dim() == 2 else x.reshape(-1, v)
    if x.stride(1) != 1 and x.shape[0]:
        x = x.contiguous()
    n = x.shape[0]
    device = x.device
    t_scalar, t_rows = check_temperature(temperature, n, device, validate)
    y = check_labels(labels, lead, n, v, device, ignore_index, validate)
    if histogram is not None:
        check_histogram(histogram, y, device)
    out2d = None
    if scaled_out is not None:
        if scaled_out.shape != logits.shape:
            raise ValueError(
                f"scaled_out has shape {tuple(scaled_out.shape)}, logits {tuple(logits.shape)}"
            )
        if scaled_out.dtype != logits.dtype or scaled_out.device != device:
            raise ValueError("scaled_out must have the dtype and device of logits")
        out2d = scaled_out.reshape(-1, v) if n else scaled_out.reshape(0, v)
        if out2d.stride(1) != 1 or out2d.data_ptr() != scaled_out.data_ptr():
            raise ValueError("scaled_out must have a stride-1 last dimension and be viewable as [N, V]")
        if n > 1 and out2d.stride(0) < v:
            raise ValueError(
                f"scaled_out rows overlap (row stride {out2d.stride(0)} < V = {v}); it is written"
            )
        if out2d.data_ptr() == x.data_ptr() and out2d.stride(0) != x.stride(0):
            raise ValueError("scaled_out aliases logits with another row stride")

    if name is None:  # always, under torch.compile
        name = _resolve_for_trace("token_stats", backend, device, x.dtype, n, v)
    fstats, pred, flags = _token_stats_op(
        x, y, t_scalar, t_rows, out2d, histogram, int(ignore_index), name
    )

    return TokenStats.from_kernel(fstats, pred, flags, lead, y is not None, name)


def histogram_add_(
    hist: torch.Tensor, conf: torch.Tensor, correct: torch.Tensor, keep: torch.Tensor
) -> None:
    """Add rows where ``keep`` to an int64 ``[3, n_bins]`` histogram, in place, exactly.

    ``conf`` is fp32 ``[N]`` in ``[0, 1]`` (NaN rows are skipped), ``correct`` and ``keep``
    bool ``[N]``, all on ``hist``'s device. Runs the torch op
    ``torch.ops.mllmcal.histogram_add``; integer adds make the result independent of row
    order and of how rows are split between calls.
    """
    _histogram_add_op(hist, conf, correct, keep)


def temperature_fit_rows(
    x: torch.Tensor,
    labels: torch.Tensor,
    betas: torch.Tensor,
    backend: str = "auto",
    ignore_index: int = C.IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row accumulators of the one-pass temperature fit, from one read of each row.

    For each row of ``x`` and each inverse temperature β_k: ℓ = NLL of ``softmax(β_k x)``
    at the label, dℓ/dβ and d²ℓ/dβ² (maths next to the kernels, ``csrc/cpu/temperature_fit.h``
    and :mod:`mllmcal.kernels.temperature_fit`; float64 definition
    :func:`mllmcal.reference.temperature_fit_rows`).

    Args:
        x: ``[N, V]`` fp32/fp16/bf16 logits (fp64 goes to the torch backend), any row
            stride; any device.
        labels: integer ``[N]``, values in ``[0, V)`` or ``ignore_index`` (checked by the
            caller; an out-of-range label is not checked here).
        betas: ``[K]`` inverse temperatures > 0.
        backend: as for :func:`token_stats` (the same registry and ``MLLMCAL_BACKEND``
            policy).

    Returns:
        ``(out, status)`` on ``x``'s device: ``out`` fp32 ``[N, 3, K]`` (fp64 for fp64
        input) holding (ℓ, dℓ/dβ, d²ℓ/dβ²), zeros on rows not used; ``status`` uint8
        ``[N]``: 0 skipped (invalid row or ignored label), 1 used, 2 label masked
        (x_y = −inf). Runs as the torch op ``torch.ops.mllmcal.temperature_fit``.
    """
    x = x.detach()
    n, v = x.shape
    name = _resolve_for_trace("temperature_fit", backend, x.device, x.dtype, n, v)
    if x.stride(-1) != 1:
        x = x.contiguous()
    labels = labels.detach().to(device=x.device, dtype=torch.int64).contiguous()
    betas = betas.detach().to(device=x.device, dtype=_fit_out_dtype(x)).contiguous()
    return _temperature_fit_op(x, labels, betas, int(ignore_index), name)
