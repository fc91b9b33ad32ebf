"""
Autoresearch pretraining script: one GPU (or the CPU), one file. This is the file agents edit.

A GPT of the autoresearch baseline family (rotary embeddings, QK norm, ReLU^2 MLP, value
embeddings, per-layer residual scalars, logit soft-cap), trained with Muon + AdamW for the
profile's fixed wall-clock budget, then saved with prepare.export_model: a worker scores that
exported model itself (program.md, "Scoring"); prepare.evaluate_bpb here is informational.

Usage: python train.py   (with AUTORESEARCH_PROFILE / AUTORESEARCH_CACHE / AUTORESEARCH_SEED in the
environment and prepare.py and gpu_kernels.py importable: next to this file, or on PYTHONPATH)
"""

import os

# Expandable segments cut fragmentation of the caching allocator when shapes vary (eval vs train).
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import gc
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import prepare
from gpu_kernels import (
    lm_head_softcap_loss,
    rotary_rms_norm,
    sliding_window_attention,
    triton_kernels_available,
    window_attention_available,
)
from prepare import MAX_SEQ_LEN, PROFILE, SEED, TIME_BUDGET, Tokenizer, evaluate_bpb, make_dataloader

USE_CUDA = torch.cuda.is_available()

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags)
# ---------------------------------------------------------------------------

# Model architecture
DEPTH = 8 if USE_CUDA else 2          # transformer layers (CPU: a small model for the tiny profile)
ASPECT_RATIO = 64                     # model_dim = DEPTH * ASPECT_RATIO, rounded up to HEAD_DIM
HEAD_DIM = 128 if USE_CUDA else 64    # attention head dimension
WINDOW_PATTERN = "SSSL"               # per-layer attention span: S = half context, L = full; last layer always L
# On the GPU an S layer runs on cuDNN's attention kernel with a sliding window (package
# nvidia-cudnn-frontend, through gpu_kernels.sliding_window_attention), an L layer on SDPA's cuDNN
# kernel; on the CPU the window is a mask. "L" everywhere needs no extra package.
LOGIT_SOFTCAP = 15                    # logits = cap * tanh(logits / cap)

# Optimization
TOTAL_BATCH_SIZE = 2**19 if USE_CUDA else 4 * MAX_SEQ_LEN   # tokens per optimizer step
DEVICE_BATCH_SIZE = 128 if USE_CUDA else 4                 # rows per forward/backward
EMBEDDING_LR = 0.6                    # token and value embeddings (AdamW)
UNEMBEDDING_LR = 0.004                # lm_head (AdamW)
MATRIX_LR = 0.04                      # transformer matrices (Muon)
SCALAR_LR = 0.5                       # per-layer scalars (AdamW)
WEIGHT_DECAY = 0.2                    # cautious weight decay of Muon, decays linearly to 0
ADAM_BETAS = (0.8, 0.95)              # AdamW beta1, beta2
WARMUP_RATIO = 0.0                    # fraction of the time budget spent warming the LR up
WARMDOWN_RATIO = 0.5                  # fraction of the time budget spent decaying the LR
FINAL_LR_FRAC = 0.0                   # LR at the end, as a fraction of the initial LR

# Runtime
COMPILE = USE_CUDA                    # torch.compile pays on the GPU; on the CPU its startup would eat the budget
FUSED_LOSS = triton_kernels_available()      # training loss and its gradient in one Triton pass (gpu_kernels.py)
FUSED_QK_NORM = triton_kernels_available()   # rotary + QK norm in one Triton pass each way (gpu_kernels.py)
UNTIMED_STEPS = 10 if COMPILE else 1  # first steps (compilation) do not count towards the budget
H100_BF16_PEAK_FLOPS = 989.5e12       # for MFU

# ---------------------------------------------------------------------------
# GPT model
# ---------------------------------------------------------------------------


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"
    softcap: float = 15.0


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer, n_layer):
    """Every other layer gets a value embedding, counting back from the last one."""
    return layer % 2 == (n_layer - 1) % 2


def rotate(x, cos, sin):
    """Rotary embedding on (B, T, H, D): rotate the two halves of each head as complex pairs."""
    half = x.size(-1) // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat((a * cos + b * sin, b * cos - a * sin), dim=-1)


def attend(q, k, v, window):
    """Causal attention on (B, H, T, D); window = how many earlier positions a query may see."""
    T = q.size(-2)
    if window >= T - 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # The exported model must be plain ops (the evaluator runs no custom kernels): a band mask there.
    if q.is_cuda and not torch.compiler.is_exporting():
        return sliding_window_attention(q, k, v, window)
    pos = torch.arange(T, device=q.device)
    offset = pos[:, None] - pos[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(offset >= 0) & (offset <= window))


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # Value residual: a per-head gate, read off the first channels, mixes in the value embedding.
        self.ve_gate_channels = 32
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_head, bias=False)
                        if has_value_embedding(layer, config.n_layer) else None)

    def forward(self, x, ve, cos, sin, window):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # 1.0 at init
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_head, self.head_dim)
        # QK norm keeps logits bounded; a change to rotary or to this norm needs FUSED_QK_NORM = False.
        if FUSED_QK_NORM and not torch.compiler.is_exporting():
            q, k = rotary_rms_norm(q, cos, sin), rotary_rms_norm(k, cos, sin)
        else:
            q, k = norm(rotate(q, cos, sin)), norm(rotate(k, cos, sin))
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn = Attention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window):
        x = x + self.attn(norm(x), ve, cos, sin, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.windows = self.window_sizes(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))   # scale of the residual stream
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))     # mix-in of the first embedding
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, config.n_embd)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
        cos, sin = self.rotary_tables(config.sequence_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def window_sizes(config):
        long = config.sequence_len
        spans = {"L": long, "S": long // 2}
        sizes = [spans[config.window_pattern.upper()[i % len(config.window_pattern)]] for i in range(config.n_layer)]
        sizes[-1] = long
        return sizes

    def rotary_tables(self, seq_len, head_dim, base=10000):
        inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        dtype = torch.bfloat16 if USE_CUDA else torch.float32
        return angles.cos().to(dtype)[None, :, None, :], angles.sin().to(dtype)[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = (3 ** 0.5) * self.config.n_embd ** -0.5   # uniform with std 1/sqrt(dim)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)     # each block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        if USE_CUDA:  # embeddings are only gathered from: bf16 halves their memory traffic
            self.wte.to(dtype=torch.bfloat16)
            self.value_embeds.to(dtype=torch.bfloat16)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self):
        """Forward + backward FLOPs per token: 6 per matmul weight, plus attention scores."""
        gathered = self.wte.weight.numel() + sum(ve.weight.numel() for ve in self.value_embeds.values())
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        matmul = self.num_params() - gathered - scalars
        attention = sum(12 * self.config.n_embd * min(w, self.config.sequence_len) for w in self.windows)
        return 6 * matmul + attention

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.shape
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.wte(idx))
        x0 = x
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i])
        x = norm(x)
        cap = self.config.softcap
        # Training on the GPU ends here; a loss other than soft-capped cross-entropy needs FUSED_LOSS = False.
        if FUSED_LOSS and targets is not None and reduction == "mean" and torch.is_grad_enabled():
            return lm_head_softcap_loss(x.reshape(B * T, -1).to(torch.bfloat16),
                                        self.lm_head.weight.to(torch.bfloat16), targets.reshape(-1), cap)
        logits = self.lm_head(x).float()
        logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(B * T, -1), targets.view(-1), ignore_index=-1, reduction=reduction)


# ---------------------------------------------------------------------------
# Optimizer: Muon for the transformer's matrices, AdamW for everything else
# ---------------------------------------------------------------------------

# Polar Express: per-iteration coefficients of a quintic that drive singular values to 1 in 5 steps.
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_update(p, grad, m, v, step, lr, beta1, beta2, eps, wd):
    """One AdamW step with bias correction. Hyperparameters are 0-d tensors (no recompiles)."""
    p.mul_(1 - lr * wd)
    m.lerp_(grad, 1 - beta1)
    v.lerp_(grad.square(), 1 - beta2)
    denom = (v / (1 - beta2 ** step)).sqrt() + eps
    p.add_(-(lr / (1 - beta1 ** step)) * m / denom)


def orthogonalize(G):
    """Push the singular values of (a stack of) matrices towards 1, keeping singular vectors."""
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS:
        if tall:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def muon_update(grads, params, momentum_buf, variance_buf, momentum, lr, wd, beta2, reduce_dim):
    """One Muon step for a stack of same-shape matrices (leading dim = stack).

    Nesterov momentum, orthogonalised by Polar Express iterations, then NorMuon: per-row (or
    per-column) second-moment normalisation that keeps the update's overall norm, then cautious
    weight decay (only where update and weight agree in sign).
    """
    momentum_buf.lerp_(grads, 1 - momentum)
    X = orthogonalize(grads.lerp_(momentum_buf, momentum))
    sq = X.float().square().mean(dim=reduce_dim, keepdim=True)
    n = X.size(reduce_dim)
    norm_before = (sq.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    variance_buf.lerp_(sq.to(variance_buf.dtype), 1 - beta2)
    scale = variance_buf.clamp_min(1e-10).rsqrt()
    norm_after = ((sq * n) * scale.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    X = X * (scale * (norm_before / norm_after.clamp_min(1e-10))).to(X.dtype)
    agree = (X * params) >= 0
    params.sub_(lr * X + lr * wd * params * agree)


if COMPILE:
    adamw_update = torch.compile(adamw_update, dynamic=False, fullgraph=True)
    muon_update = torch.compile(muon_update, dynamic=False, fullgraph=True)


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry kind='muon' (2-D matrices of one shape) or kind='adamw'."""

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        # Hyperparameters go in as 0-d CPU tensors, so a changing LR never triggers a recompile.
        self._t = {name: torch.tensor(0.0) for name in
                   ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    def _set(self, **values):
        for name, value in values.items():
            self._t[name].fill_(value)
        return self._t

    def _adamw(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["m"] = torch.zeros_like(p)
                state["v"] = torch.zeros_like(p)
            state["step"] += 1
            t = self._set(step=state["step"], lr=group["lr"], beta1=group["betas"][0],
                          beta2=group["betas"][1], eps=group["eps"], wd=group["weight_decay"])
            adamw_update(p, p.grad, state["m"], state["v"], t["step"], t["lr"], t["beta1"], t["beta2"], t["eps"], t["wd"])

    def _muon(self, group):
        params = group["params"]
        shape = params[0].shape
        state = self.state[params[0]]
        if not state:
            state["momentum"] = torch.zeros(len(params), *shape, dtype=params[0].dtype, device=params[0].device)
            var_shape = (len(params), shape[0], 1) if shape[0] >= shape[1] else (len(params), 1, shape[1])
            state["variance"] = torch.zeros(var_shape, dtype=params[0].dtype, device=params[0].device)
        reduce_dim = -1 if shape[0] >= shape[1] else -2
        grads = torch.stack([p.grad for p in params])
        stacked = torch.stack(params)
        # Tall matrices get a larger step: the orthogonalised update has smaller entries there.
        t = self._set(momentum=group["momentum"], lr=group["lr"] * max(1.0, shape[0] / shape[1]) ** 0.5,
                      wd=group["weight_decay"], beta2=group["beta2"])
        muon_update(grads, stacked, state["momentum"], state["variance"], t["momentum"], t["lr"], t["wd"],
                    t["beta2"], reduce_dim)
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._adamw(group)
            else:
                self._muon(group)


def build_optimizer(model):
    # AdamW LRs were tuned at model dim 768; scale them by 1/sqrt(dim/768).
    scale = (model.config.n_embd / 768) ** -0.5
    adam = dict(kind="adamw", betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0)
    groups = [
        dict(params=[model.lm_head.weight], lr=UNEMBEDDING_LR * scale, **adam),
        dict(params=[model.wte.weight], lr=EMBEDDING_LR * scale, **adam),
        dict(params=list(model.value_embeds.parameters()), lr=EMBEDDING_LR * scale, **adam),
        dict(params=[model.resid_lambdas], lr=SCALAR_LR * 0.01, **adam),
        dict(params=[model.x0_lambdas], lr=SCALAR_LR, **{**adam, "betas": (0.96, 0.95)}),
    ]
    matrices = list(model.blocks.parameters())
    for shape in sorted({p.shape for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=MATRIX_LR,
                           momentum=0.95, beta2=0.95, weight_decay=WEIGHT_DECAY))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = MuonAdamW(groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


# ---------------------------------------------------------------------------
# Setup: tokenizer, model, optimizer, dataloader
# ---------------------------------------------------------------------------

t_start = time.time()
torch.manual_seed(SEED)   # the run's seed, from prepare.py: weights are the only random draw of a run
torch.set_float32_matmul_precision("high")
device = torch.device("cuda" if USE_CUDA else "cpu")
if USE_CUDA:
    autocast_ctx = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
else:  # float32 on the CPU: bf16 matmuls are slow there
    autocast_ctx = torch.autocast(device_type="cpu", enabled=False)

tokenizer = Tokenizer.from_directory()
model_dim = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
config = GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=DEPTH,
                   n_head=model_dim // HEAD_DIM, n_embd=model_dim, window_pattern=WINDOW_PATTERN,
                   softcap=LOGIT_SOFTCAP)
print(f"Profile: {PROFILE} | seed: {SEED} | device: {device} | time budget: {TIME_BUDGET}s", flush=True)
print(f"Model config: {asdict(config)}", flush=True)

with torch.device(device):
    model = GPT(config)
if USE_CUDA and min(model.windows) < MAX_SEQ_LEN - 1 and not window_attention_available(device):
    print('FAIL: the S layers of WINDOW_PATTERN need cuDNN sliding-window attention on the GPU: '
          'pip install nvidia-cudnn-frontend (make setup does where nvidia-smi exists), or set WINDOW_PATTERN = "L"',
          file=sys.stderr, flush=True)
    sys.exit(1)
model.init_weights()
num_params = model.num_params()
flops_per_token = model.flops_per_token()
print(f"Parameters: {num_params:,} | FLOPs per token: {flops_per_token:e}", flush=True)

tokens_per_micro_step = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
assert TOTAL_BATCH_SIZE % tokens_per_micro_step == 0, "TOTAL_BATCH_SIZE must be a multiple of batch x seq"
grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_micro_step
optimizer = build_optimizer(model)
plain_model = model   # the uncompiled module: export traces it, not the compiled wrapper
if COMPILE:
    model = torch.compile(model, dynamic=False)

train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=device)
x, y, epoch = next(train_loader)
print(f"Gradient accumulation steps: {grad_accum_steps}", flush=True)


def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    left = (1.0 - progress) / WARMDOWN_RATIO
    return left + (1 - left) * FINAL_LR_FRAC


def muon_momentum(step):
    warm = min(step / 300, 1)
    return 0.85 + 0.10 * warm


def sync():
    if USE_CUDA:
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------

t_start_training = time.time()
training_time = 0.0   # seconds of timed steps (compilation warm-up excluded)
smooth_loss = 0.0
step = 0
while True:
    sync()
    t0 = time.time()
    for _ in range(grad_accum_steps):
        with autocast_ctx:
            loss = model(x, y)
        train_loss = loss.detach()
        (loss / grad_accum_steps).backward()
        x, y, epoch = next(train_loader)

    progress = min(training_time / TIME_BUDGET, 1.0)
    lrm = lr_multiplier(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = muon_momentum(step)
            group["weight_decay"] = WEIGHT_DECAY * (1 - progress)
    optimizer.step()
    model.zero_grad(set_to_none=True)

    # Fail fast: a diverged run wastes the rest of the budget and would report a meaningless score.
    loss_f = train_loss.item()
    if math.isnan(loss_f) or loss_f > 100:
        print(f"FAIL: loss is {'NaN' if math.isnan(loss_f) else f'exploding ({loss_f:.1f})'} at step {step}",
              file=sys.stderr, flush=True)
        sys.exit(1)

    sync()
    dt = time.time() - t0
    if step >= UNTIMED_STEPS:
        training_time += dt
    smooth_loss = 0.9 * smooth_loss + 0.1 * loss_f
    shown_loss = smooth_loss / (1 - 0.9 ** (step + 1))
    tok_per_sec = int(TOTAL_BATCH_SIZE / dt)
    mfu = 100 * flops_per_token * TOTAL_BATCH_SIZE / dt / H100_BF16_PEAK_FLOPS if USE_CUDA else 0.0
    print(f"step {step} | progress {100 * min(training_time / TIME_BUDGET, 1.0):.1f}% | loss {shown_loss:.6f} | "
          f"lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | tok/s {tok_per_sec} | mfu {mfu:.1f}% | "
          f"remaining {max(0.0, TIME_BUDGET - training_time):.0f}s", flush=True)

    # Python's cyclic GC can stall a step for hundreds of ms; nothing here builds cycles after setup.
    if step == 0:
        gc.collect()
        gc.freeze()
        gc.disable()

    step += 1
    if step >= UNTIMED_STEPS and training_time >= TIME_BUDGET:
        break

train_loader.close()
total_tokens = step * TOTAL_BATCH_SIZE
timed_steps = step - UNTIMED_STEPS

# ---------------------------------------------------------------------------
# Evaluation and summary
# ---------------------------------------------------------------------------

model.eval()
# The worker scores this export (logits of plain ops) with its own evaluator and validation data.
prepare.export_model(plain_model, torch.zeros(DEVICE_BATCH_SIZE, MAX_SEQ_LEN, dtype=torch.long, device=device),
             autocast_dtype=torch.bfloat16 if USE_CUDA else None)
# Informational (reported_val_bpb); a worker's train.py has no validation split and skips it.
val_bpb = None
if prepare.validation_available():
    with autocast_ctx:
        val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)

t_end = time.time()
mfu_percent = (100 * flops_per_token * TOTAL_BATCH_SIZE * timed_steps / training_time / H100_BF16_PEAK_FLOPS
               if USE_CUDA and training_time > 0 else 0.0)
peak_vram_mb = torch.cuda.max_memory_allocated() / 1024 / 1024 if USE_CUDA else 0.0

print("---")
print(f"profile:          {PROFILE}")
if val_bpb is not None:
    print(f"val_bpb:          {val_bpb:.6f}")
print(f"training_seconds: {training_time:.1f}")
print(f"total_seconds:    {t_end - t_start:.1f}")
print(f"peak_vram_mb:     {peak_vram_mb:.1f}")
print(f"mfu_percent:      {mfu_percent:.2f}")
print(f"total_tokens_M:   {total_tokens / 1e6:.1f}")
print(f"num_steps:        {step}")
print(f"num_params_M:     {num_params / 1e6:.1f}")
print(f"depth:            {DEPTH}", flush=True)
