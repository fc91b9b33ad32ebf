"""
GPU speed-ups that train.py may call: not part of the fixed scoring (prepare.py holds that).

  - sliding_window_attention: causal attention over a diagonal band, on cuDNN through the
    optional package nvidia-cudnn-frontend (window_attention_available() says whether it runs),
  - lm_head_softcap_loss: the soft-capped training loss and its gradient in one Triton pass,
  - rotary_rms_norm: rotary embedding + RMS norm of queries or keys, one Triton pass each way
    (triton_kernels_available() says whether these two run).

Each is a torch.library custom op with its own backward, so a compiled model calls it as one op
without a graph break. On a CPU, or without Triton or the cuDNN frontend, this module still
imports and the availability checks say False; train.py then takes its plain PyTorch paths.
"""

import torch

try:
    import cudnn as _cudnn
except ImportError:  # not installed: CPU machines, or GPU machines set up without it
    _cudnn = None

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU builds of torch ship without Triton
    triton = None


# ---------------------------------------------------------------------------
# Causal attention with a sliding window, on cuDNN (optional, CUDA only)
# ---------------------------------------------------------------------------
# torch's SDPA has no sliding window, and its windowed alternatives (flex_attention, the FA2
# backend) are slower than its cuDNN kernel without one. cuDNN's own attention takes a diagonal
# band; through the nvidia-cudnn-frontend package a half-context layer runs 3 to 7 % faster than
# SDPA over the full context (docs/benchmarks.md). Without the package, or off CUDA,
# window_attention_available() is False, and train.py stops if its WINDOW_PATTERN has S layers.

_cudnn_handles = {}
_cudnn_graphs = {}


def window_attention_available(device):
    """Whether sliding_window_attention can run on this device."""
    if _cudnn is None or torch.device(device).type != "cuda":
        return False
    try:
        torch.backends.cudnn.version()  # loads torch's libcudnn, which the frontend then uses
        return _cudnn.backend_version() >= 90200
    except Exception:  # a frontend that cannot find or load libcudnn
        return False


def _cudnn_handle(device):
    index = torch.device(device).index or 0
    if index not in _cudnn_handles:
        _cudnn_handles[index] = _cudnn.create_handle()
    handle = _cudnn_handles[index]
    _cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
    return handle


def _attention_graph(kind, window, scale, tensors):
    """A built cuDNN graph for these shapes and strides (cached), and its tensor handles."""
    key = (kind, window, scale) + tuple((t.dtype, tuple(t.shape), t.stride()) for t in tensors)
    if key in _cudnn_graphs:
        return _cudnn_graphs[key]
    io_type = {torch.bfloat16: _cudnn.data_type.BFLOAT16, torch.float16: _cudnn.data_type.HALF}[tensors[0].dtype]
    graph = _cudnn.pygraph(io_data_type=io_type, intermediate_data_type=_cudnn.data_type.FLOAT,
                           compute_data_type=_cudnn.data_type.FLOAT, handle=_cudnn_handle(tensors[0].device))
    handles = [graph.tensor_like(t.detach()) for t in tensors]
    # cuDNN's band: keys j with i - left_bound < j <= i, so a window of w earlier keys is w + 1.
    mask = dict(diagonal_alignment=_cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_right_bound=0,
                diagonal_band_left_bound=window + 1)
    if kind == "forward":
        q, k, v = handles
        o, stats = graph.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=True, attn_scale=scale, **mask)
        outputs = [o, stats]
    else:
        q, k, v, o, d_o, stats = handles
        outputs = list(graph.sdpa_backward(name="sdpa_backward", q=q, k=k, v=v, o=o, dO=d_o, stats=stats,
                                           attn_scale=scale, **mask))
    for handle, like in zip(outputs, _attention_outputs_like(kind, tensors), strict=True):
        handle.set_output(True).set_dim(list(like.shape)).set_stride(list(like.stride()))
        handle.set_data_type(io_type if like.dtype != torch.float32 else _cudnn.data_type.FLOAT)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([_cudnn.heur_mode.A, _cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    _cudnn_graphs[key] = (graph, handles, outputs)
    return _cudnn_graphs[key]


def _attention_outputs_like(kind, tensors):
    """Empty outputs: o like q and per-row softmax stats (forward), or dq, dk, dv (backward)."""
    q = tensors[0]
    if kind == "forward":
        B, H, T, _ = q.shape
        return [torch.empty_like(q), torch.empty((B, H, T, 1), dtype=torch.float32, device=q.device)]
    return [torch.empty_like(t) for t in tensors[:3]]


def _run_attention_graph(kind, window, scale, tensors):
    graph, handles, outputs = _attention_graph(kind, window, scale, tensors)
    results = _attention_outputs_like(kind, tensors)
    pack = dict(zip(handles, tensors, strict=True)) | dict(zip(outputs, results, strict=True))
    workspace = torch.empty(graph.get_workspace_size(), device=tensors[0].device, dtype=torch.uint8)
    graph.execute(pack, workspace, handle=_cudnn_handle(tensors[0].device))
    return results


@torch.library.custom_op("autoresearch::window_attention", mutates_args=())
def _window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    o, stats = _run_attention_graph("forward", window, scale, [q, k, v])
    return o, stats


@_window_attention.register_fake
def _(q, k, v, window, scale):
    B, H, T, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, T, 1), dtype=torch.float32)


@torch.library.custom_op("autoresearch::window_attention_backward", mutates_args=())
def _window_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                               d_o: torch.Tensor, stats: torch.Tensor, window: int,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if d_o.stride() != o.stride():  # one layout for o and dO keeps one cached graph
        d_o = torch.empty_like(o).copy_(d_o)
    dq, dk, dv = _run_attention_graph("backward", window, scale, [q, k, v, o, d_o, stats])
    return dq, dk, dv


@_window_attention_backward.register_fake
def _(q, k, v, o, d_o, stats, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _window_attention_setup(ctx, inputs, output):
    q, k, v, window, scale = inputs
    o, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q, k, v, o, stats)
    ctx.window, ctx.scale = window, scale


def _window_attention_grad(ctx, d_o, d_stats):
    q, k, v, o, stats = ctx.saved_tensors
    dq, dk, dv = _window_attention_backward(q, k, v, o, d_o, stats, ctx.window, ctx.scale)
    return dq, dk, dv, None, None


_window_attention.register_autograd(_window_attention_grad, setup_context=_window_attention_setup)


def sliding_window_attention(q, k, v, window):
    """Causal attention on (B, H, T, D) bf16 CUDA tensors where query i sees keys i-window..i.

    Needs window_attention_available(); any strides with a unit last dimension, e.g. the
    (B, T, H, D) projections transposed to (B, H, T, D). Returns (B, H, T, D) laid out like q.
    """
    o, _ = _window_attention(q, k, v, window, q.size(-1) ** -0.5)
    return o


# ---------------------------------------------------------------------------
# Triton kernels (CUDA): the training loss, and rotary + QK norm
# ---------------------------------------------------------------------------

def triton_kernels_available(device="cuda"):
    """Whether lm_head_softcap_loss and rotary_rms_norm can run: Triton and a CUDA device."""
    return triton is not None and torch.cuda.is_available() and torch.device(device).type == "cuda"


# Fused training loss: soft-capped cross-entropy and its gradient in one pass.
# The loss is the last step before backward, so its gradient with respect to the logits can be
# computed in the forward pass, over the logits' own memory: one read and one write of the
# (N, V) bf16 logits, where the compiled soft-cap + cross-entropy makes several passes in each
# direction. The backward is then just the lm_head's two matmuls, scaled by the incoming gradient.

SOFTCAP_CE_WARPS = 4   # warps per row of the loss kernel (bench/fused_loss.py times the choices)
# tanh from the GPU's approximate instruction (relative error about 2**-11, below the bf16 rounding of
# the logits it is applied to) instead of libdevice's exact one, which made the kernel compute-bound
SOFTCAP_FAST_TANH = True
MAX_FUSED_CAP = 60.0   # exp(60) times any vocabulary up to 2**30 stays finite in fp32

if triton is not None:
    @triton.jit
    def _tanh(x, FAST: tl.constexpr):
        if FAST:
            return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return libdevice.tanh(x)

    @triton.jit
    def _softcap_ce_kernel(logits_ptr, targets_ptr, losses_ptr, inv_count_ptr, row_stride, cap,
                           V: tl.constexpr, BLOCK: tl.constexpr, FAST_TANH: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < V
        row_ptr = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row)
        valid = target >= 0
        z_target = cap * _tanh(tl.load(row_ptr + tl.maximum(target, 0)).to(tl.float32) * (1.0 / cap), FAST_TANH)
        t = _tanh(tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32) * (1.0 / cap), FAST_TANH)
        # Soft-capped logits lie in [-cap, cap]: with cap <= MAX_FUSED_CAP, exp() cannot overflow and
        # needs no max subtracted, so one reduction a row, not two.
        e = tl.where(inside, tl.exp(cap * t), 0.0)
        total = tl.sum(e, axis=0)
        tl.store(losses_ptr + row, tl.where(valid, tl.log(total) - z_target, 0.0))
        # d loss / d raw = (softmax - onehot) * (1 - tanh^2), over the count of scored rows
        grad = (e * (1.0 / total) - (cols == target).to(tl.float32)) * (1.0 - t * t) * tl.load(inv_count_ptr)
        tl.store(row_ptr + cols, tl.where(valid, grad, 0.0).to(logits_ptr.dtype.element_ty), mask=inside)


def _softcap_ce(logits, targets, losses, inv_count, cap, num_warps=None, fast_tanh=None):
    """One launch of the loss kernel: a program a row, logits overwritten by their gradient."""
    _softcap_ce_kernel[(logits.size(0),)](logits, targets, losses, inv_count, logits.stride(0), cap,
                                          V=logits.size(1), BLOCK=triton.next_power_of_2(logits.size(1)),
                                          FAST_TANH=SOFTCAP_FAST_TANH if fast_tanh is None else fast_tanh,
                                          num_warps=num_warps or SOFTCAP_CE_WARPS)


@torch.library.custom_op("autoresearch::lm_head_softcap_loss", mutates_args=())
def _lm_head_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = x @ weight.t()
    losses = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
    inv_count = 1.0 / (targets >= 0).sum().clamp_min(1).float()
    _softcap_ce(logits, targets, losses, inv_count, cap)
    return losses.sum() * inv_count, logits  # the logits' memory now holds d loss / d logits


@_lm_head_loss.register_fake
def _(x, weight, targets, cap):
    return x.new_empty((), dtype=torch.float32), x.new_empty((x.size(0), weight.size(0)))


def _lm_head_loss_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    _, grad_logits = output
    ctx.mark_non_differentiable(grad_logits)
    ctx.save_for_backward(x, weight, grad_logits)


def _lm_head_loss_grad(ctx, d_loss, _):
    x, weight, grad_logits = ctx.saved_tensors
    return grad_logits @ (weight * d_loss), (grad_logits.t() @ x) * d_loss, None, None


_lm_head_loss.register_autograd(_lm_head_loss_grad, setup_context=_lm_head_loss_setup)


def lm_head_softcap_loss(x, weight, targets, cap):
    """Training loss of a soft-capped lm_head: mean over targets >= 0 of the cross-entropy of
    cap * tanh(x @ weight.T / cap). x (N, C) and weight (V, C) in bf16 on CUDA, targets (N,) int64.

    The same function as F.cross_entropy(cap * tanh(logits.float() / cap), targets, ignore_index=-1);
    differentiable in x and weight. Needs triton_kernels_available(). For training only: its forward
    also computes the gradient, which evaluation would not use.
    """
    if not 0 < cap <= MAX_FUSED_CAP:
        raise ValueError(f"lm_head_softcap_loss needs a soft-cap in (0, {MAX_FUSED_CAP:g}], got {cap}: "
                         f"set FUSED_LOSS = False in train.py for other caps")
    loss, _ = _lm_head_loss(x, weight, targets, float(cap))
    return loss


# Rotary embedding + RMS norm of queries or keys, forward and backward in one pass each.
# Compiled, the backward of this pair (over q and k together) ran at about 1.3 TB/s, 6 % of a
# training step (docs/benchmarks.md); here each pass reads its inputs once and writes once.
# The backward recomputes the rotation and the norm from x instead of saving them.

ROTARY_NORM_ROWS = 32    # (head) rows per program; bench/rotary_norm.py times the choices
ROTARY_NORM_WARPS = 4
RMS_NORM_EPS = torch.finfo(torch.float32).eps   # F.rms_norm's default for bf16 and fp32 inputs

if triton is not None:
    @triton.jit
    def _rotary_rms_norm_rows(x_ptr, cos_ptr, sin_ptr, n_rows, heads, seq_len, table_stride, eps,
                              HALF: tl.constexpr, ROWS: tl.constexpr):
        """ROWS head rows of x rotated (the two halves r1, r2, fp32) and their 1 / rms, with the
        rotary table rows, the offsets of the first halves and the row mask."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, HALF)
        live = (rows < n_rows)[:, None]
        offsets = rows.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]
        table = ((rows // heads) % seq_len)[:, None] * table_stride + cols[None, :]
        a = tl.load(x_ptr + offsets, mask=live, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + offsets + HALF, mask=live, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + table, mask=live, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=live, other=0.0).to(tl.float32)
        r1 = a * cos + b * sin
        r2 = b * cos - a * sin
        rstd = tl.rsqrt((tl.sum(r1 * r1, axis=1) + tl.sum(r2 * r2, axis=1)) / (2 * HALF) + eps)[:, None]
        return r1, r2, rstd, cos, sin, offsets, live

    @triton.jit
    def _rotary_rms_norm_fwd_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, heads, seq_len, table_stride,
                                    eps, HALF: tl.constexpr, ROWS: tl.constexpr):
        r1, r2, rstd, _, _, offsets, live = _rotary_rms_norm_rows(x_ptr, cos_ptr, sin_ptr, n_rows, heads,
                                                                  seq_len, table_stride, eps, HALF, ROWS)
        out_type = out_ptr.dtype.element_ty
        tl.store(out_ptr + offsets, (r1 * rstd).to(out_type), mask=live)
        tl.store(out_ptr + offsets + HALF, (r2 * rstd).to(out_type), mask=live)

    @triton.jit
    def _rotary_rms_norm_bwd_kernel(x_ptr, cos_ptr, sin_ptr, dy_ptr, dx_ptr, n_rows, heads, seq_len,
                                    table_stride, eps, HALF: tl.constexpr, ROWS: tl.constexpr):
        r1, r2, rstd, cos, sin, offsets, live = _rotary_rms_norm_rows(x_ptr, cos_ptr, sin_ptr, n_rows, heads,
                                                                      seq_len, table_stride, eps, HALF, ROWS)
        y1 = r1 * rstd
        y2 = r2 * rstd
        dy1 = tl.load(dy_ptr + offsets, mask=live, other=0.0).to(tl.float32)
        dy2 = tl.load(dy_ptr + offsets + HALF, mask=live, other=0.0).to(tl.float32)
        # through the norm: dr = rstd * (dy - y * mean(dy * y)); then through the rotation, transposed
        mean_dy_y = ((tl.sum(dy1 * y1, axis=1) + tl.sum(dy2 * y2, axis=1)) / (2 * HALF))[:, None]
        dr1 = rstd * (dy1 - y1 * mean_dy_y)
        dr2 = rstd * (dy2 - y2 * mean_dy_y)
        out_type = dx_ptr.dtype.element_ty
        tl.store(dx_ptr + offsets, (dr1 * cos - dr2 * sin).to(out_type), mask=live)
        tl.store(dx_ptr + offsets + HALF, (dr1 * sin + dr2 * cos).to(out_type), mask=live)


def _rotary_rms_norm_launch(kernel, x, cos, sin, *tensors, rows=None, num_warps=None):
    """One launch over the (B, T, H, D) rows of x; cos and sin are (1, T, 1, D / 2) views."""
    B, T, H, D = x.shape
    rows = rows or ROTARY_NORM_ROWS
    kernel[(triton.cdiv(B * T * H, rows),)](x, cos, sin, *tensors, B * T * H, H, T, cos.stride(1), RMS_NORM_EPS,
                                            HALF=D // 2, ROWS=rows, num_warps=num_warps or ROTARY_NORM_WARPS)


@torch.library.custom_op("autoresearch::rotary_rms_norm", mutates_args=())
def _rotary_rms_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    _rotary_rms_norm_launch(_rotary_rms_norm_fwd_kernel, x, cos, sin, out)
    return out


@_rotary_rms_norm.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)


@torch.library.custom_op("autoresearch::rotary_rms_norm_backward", mutates_args=())
def _rotary_rms_norm_backward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              dy: torch.Tensor) -> torch.Tensor:
    dx = torch.empty_like(x)
    _rotary_rms_norm_launch(_rotary_rms_norm_bwd_kernel, x, cos, sin, dy.contiguous(), dx)
    return dx


@_rotary_rms_norm_backward.register_fake
def _(x, cos, sin, dy):
    return torch.empty_like(x)


def _rotary_rms_norm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _rotary_rms_norm_grad(ctx, dy):
    x, cos, sin = ctx.saved_tensors
    return _rotary_rms_norm_backward(x, cos, sin, dy), None, None


_rotary_rms_norm.register_autograd(_rotary_rms_norm_grad, setup_context=_rotary_rms_norm_setup)


def rotary_rms_norm(x, cos, sin):
    """F.rms_norm(rotary(x), (D,)) for queries or keys x of shape (B, T, H, D), bf16 on CUDA, where
    rotary(x) = cat(a * cos + b * sin, b * cos - a * sin) over the halves a, b of each head and cos,
    sin are (1, >= T, 1, D / 2) tables. Differentiable in x. Needs triton_kernels_available().
    """
    return _rotary_rms_norm(x.contiguous(), cos[:, :x.size(1)], sin[:, :x.size(1)])
