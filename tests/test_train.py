"""train.py as the worker runs it: a real subprocess, from its own run directory, tiny profile."""

import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest_data import TRAIN_PY, autoresearch_env, load_train_definitions

SUMMARY_KEYS = ["profile", "val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth"]
PROGRESS_LINE = re.compile(
    r"^step (\d+) \| progress (\d+\.\d)% \| loss (\d+\.\d{6}) \| lrm (\d+\.\d\d) \| dt (\d+)ms \| "
    r"tok/s (\d+) \| mfu (\d+\.\d)% \| remaining (\d+)s$")


def run_train(tmp_path, cache, source=None, timeout=180, seed=None):
    """Copy train.py (or the given source) into a fresh run dir, as the worker does, and run it
    with AUTORESEARCH_SEED set to `seed` (unset when None)."""
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=tmp_path))
    if source is None:
        shutil.copy(TRAIN_PY, run_dir / "train.py")
    else:
        (run_dir / "train.py").write_text(source)
    env = autoresearch_env(cache)
    env.pop("AUTORESEARCH_SEED", None)
    if seed is not None:
        env["AUTORESEARCH_SEED"] = str(seed)
    return subprocess.run([sys.executable, "train.py"], cwd=run_dir, env=env, capture_output=True, text=True,
                          timeout=timeout)


def parse_summary(stdout):
    lines = stdout.splitlines()
    assert "---" in lines, stdout
    block = lines[lines.index("---") + 1:]
    pairs = [line.split(":", 1) for line in block if line.strip()]
    return [k for k, _ in pairs], {k: v.strip() for k, v in pairs}


def test_tiny_run_prints_progress_and_summary(tmp_path, tiny_cache):
    result = run_train(tmp_path, tiny_cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    progress = [PROGRESS_LINE.match(line) for line in result.stdout.splitlines() if line.startswith("step ")]
    assert progress and all(progress), [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [int(m.group(1)) for m in progress] == list(range(len(progress)))   # one line per step
    assert float(progress[-1].group(2)) == 100.0

    keys, summary = parse_summary(result.stdout)
    assert keys == SUMMARY_KEYS
    assert summary["profile"] == "tiny"
    val_bpb = float(summary["val_bpb"])
    assert math.isfinite(val_bpb) and 0 < val_bpb < 13 / 3   # below a uniform guess over 8192 tokens
    assert re.fullmatch(r"\d+\.\d{6}", summary["val_bpb"])
    assert float(summary["training_seconds"]) >= 6.0
    assert float(summary["total_seconds"]) >= float(summary["training_seconds"])
    assert summary["peak_vram_mb"] == "0.0" and summary["mfu_percent"] == "0.00"
    assert int(summary["num_steps"]) == len(progress)
    assert float(summary["num_params_M"]) > 0 and int(summary["depth"]) >= 1


def test_nan_loss_fails_fast(tmp_path, tiny_cache):
    source = TRAIN_PY.read_text()
    target = "            loss = model(x, y)\n"
    assert source.count(target) == 1
    source = source.replace(target, "            loss = model(x, y) * float('nan')\n")
    result = run_train(tmp_path, tiny_cache, source=source, timeout=120)
    assert result.returncode != 0
    assert "FAIL: loss is NaN at step 0" in result.stderr
    assert "val_bpb" not in result.stdout


def test_the_seed_from_prepare_decides_the_run(tmp_path, tiny_cache):
    # A fixed number of steps on a step-based schedule: the time budget would let two runs of one seed
    # train for different numbers of steps, and so end at different scores for reasons other than the seed.
    # One evaluation batch keeps the three runs short; the seed, not the metric, is under test here.
    source = TRAIN_PY.read_text()
    prepare_import = re.search(r"^from prepare import .*\n", source, flags=re.M).group()
    for old, new in [("    progress = min(training_time / TIME_BUDGET, 1.0)\n", "    progress = step / 6\n"),
                     ("    if step >= UNTIMED_STEPS and training_time >= TIME_BUDGET:\n", "    if step >= 6:\n"),
                     (prepare_import, prepare_import + "import prepare; prepare.EVAL_TOKENS = 4 * MAX_SEQ_LEN\n")]:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    runs = {seed: run_train(tmp_path, tiny_cache, source=source, seed=seed) for seed in (None, 42, 7)}
    val_bpb = {}
    for seed, result in runs.items():
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"| seed: {42 if seed is None else seed} |" in result.stdout
        _, summary = parse_summary(result.stdout)
        assert summary["num_steps"] == "6"
        val_bpb[seed] = summary["val_bpb"]
    assert val_bpb[None] == val_bpb[42]   # no AUTORESEARCH_SEED: the fixed 42 train.py had before
    assert val_bpb[7] != val_bpb[42]


# ---------------------------------------------------------------------------
# The math inside train.py, against torch references on small tensors (CPU)
# ---------------------------------------------------------------------------

def test_adamw_update_matches_torch_adamw():
    import torch

    defs = load_train_definitions()
    torch.manual_seed(0)
    p = torch.randn(5, 7)
    ref = p.clone().requires_grad_()
    torch_opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    t = {k: torch.tensor(x) for k, x in dict(lr=0.01, b1=0.8, b2=0.95, eps=1e-10, wd=0.1).items()}
    for step in range(1, 4):
        grad = torch.randn(5, 7)
        ref.grad = grad.clone()
        torch_opt.step()
        defs["adamw_update"](p, grad, m, v, torch.tensor(float(step)), t["lr"], t["b1"], t["b2"], t["eps"], t["wd"])
        assert torch.allclose(p, ref.detach(), rtol=1e-5, atol=1e-6)


def test_orthogonalize_approximates_the_polar_factor():
    import torch

    defs = load_train_definitions()
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 64), (4, 48, 24)]:
        G = torch.randn(*shape)
        X = defs["orthogonalize"](G)
        s = torch.linalg.svdvals(X)
        assert float(s.max()) < 1.25 and float(s.min()) > 0.75
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        polar = U @ Vh
        cos = (X * polar).sum(dim=(-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
        assert bool((cos > 0.97).all())


def _tiny_model(defs):
    import torch

    torch.manual_seed(0)
    config = defs["GPTConfig"](sequence_len=32, vocab_size=96, n_layer=2, n_head=2, n_embd=32)
    model = defs["GPT"](config)
    model.init_weights()
    return model


def test_model_follows_the_evaluate_bpb_contract_and_is_causal():
    import torch

    defs = load_train_definitions()
    model = _tiny_model(defs)
    idx = torch.randint(0, 96, (3, 32))
    targets = torch.randint(0, 96, (3, 32))
    with torch.no_grad():
        per_token = model(idx, targets, reduction="none")
        assert per_token.shape == (3 * 32,)
        assert torch.allclose(per_token.mean(), model(idx, targets))
        assert model(idx).shape == (3, 32, 96)
        assert float(model(idx).abs().max()) <= 15.0   # soft-capped logits
        changed = idx.clone()
        changed[:, 20] = (changed[:, 20] + 1) % 96
        later = model(changed, targets, reduction="none").view(3, 32)
        assert torch.allclose(later[:, :20], per_token.view(3, 32)[:, :20], atol=1e-6)
        assert not torch.allclose(later[:, 20:], per_token.view(3, 32)[:, 20:])


def test_optimizer_lowers_the_loss_on_a_fixed_batch():
    import torch

    defs = load_train_definitions()
    model = _tiny_model(defs)
    optimizer = defs["build_optimizer"](model)
    kinds = {g["kind"] for g in optimizer.param_groups}
    assert kinds == {"adamw", "muon"}
    idx = torch.randint(0, 96, (4, 32))
    targets = torch.roll(idx, -1, dims=1)
    first = None
    for _ in range(15):
        loss = model(idx, targets)
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    assert math.isfinite(loss.item()) and loss.item() < first - 0.5
