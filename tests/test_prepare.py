"""prepare.py: profiles, data preparation, tokenizer, dataloader and the bits-per-byte metric."""

import functools
import http.server
import json
import math
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
from conftest_data import PREPARE_PY, REPO_ROOT, autoresearch_env, load_prepare

# ---------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------

def test_profiles_have_fixed_constants(monkeypatch, tmp_path):
    h100 = load_prepare(monkeypatch, tmp_path, profile="h100")
    assert (h100.PROFILE, h100.MAX_SEQ_LEN, h100.TIME_BUDGET, h100.EVAL_TOKENS) == ("h100", 2048, 300, 40 * 524288)
    tiny = load_prepare(monkeypatch, tmp_path, profile="tiny")
    assert tiny.PROFILE == "tiny" and tiny.MAX_SEQ_LEN <= 512 and tiny.TIME_BUDGET <= 10
    assert tiny.VOCAB_SIZE == h100.VOCAB_SIZE == 8192


def test_default_profile_is_h100(monkeypatch, tmp_path):
    monkeypatch.delenv("AUTORESEARCH_PROFILE", raising=False)
    module = load_prepare(monkeypatch, tmp_path, profile="")
    assert module.PROFILE == "h100"


def test_unknown_profile_names_the_valid_ones(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"unknown AUTORESEARCH_PROFILE 'huge'.*h100, h100-short, tiny"):
        load_prepare(monkeypatch, tmp_path, profile="huge")


# ---------------------------------------------------------------------------
# Building the cache
# ---------------------------------------------------------------------------

def test_sotu_cache_has_the_shard_layout(tiny_cache):
    data = tiny_cache / "data"
    assert (data / "shard_00000.parquet").exists()
    assert (data / "shard_06542.parquet").exists()   # the pinned validation shard
    assert (tiny_cache / "tokenizer" / "tokenizer.pkl").exists()
    assert (tiny_cache / "tokenizer" / "token_bytes.pt").exists()
    manifest = json.loads((tiny_cache / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "sotu"
    assert manifest["tokenizer"]["vocab_size"] == 8192
    train = set(pq.read_table(data / "shard_00000.parquet").column("text").to_pylist())
    val = set(pq.read_table(data / "shard_06542.parquet").column("text").to_pylist())
    assert train and val and not train & val


def test_prepare_again_skips_work(tiny_cache):
    result = subprocess.run([sys.executable, str(PREPARE_PY), "--source", "sotu"], cwd=REPO_ROOT,
                            env=autoresearch_env(tiny_cache), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Data: already built" in result.stdout
    assert "Tokenizer: already trained" in result.stdout


def _write_source(folder):
    folder.mkdir()
    for i in range(30):
        paragraphs = [f"Document {i}, paragraph {j}: " + "the quick brown fox jumps over the lazy dog. " * (5 + j)
                      for j in range(8)]
        (folder / f"doc_{i:02d}.txt").write_text("\n\n".join(paragraphs))
    (folder / "notes.md").write_text("# Notes\n\nSome markdown text about foxes and dogs.\n")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    rows = [f"Parquet row {i}: a document about rivers and mountains." for i in range(40)]
    pq.write_table(pa.table({"text": rows}), folder / "extra.parquet")


def test_local_source_splits_by_document(monkeypatch, tmp_path):
    source = tmp_path / "source"
    _write_source(source)
    prep = load_prepare(monkeypatch, tmp_path / "cache")
    stats = prep.build_from_source(str(source))
    train = pq.read_table(tmp_path / "cache" / "data" / "shard_00000.parquet").column("text").to_pylist()
    val = pq.read_table(tmp_path / "cache" / "data" / prep.VAL_FILENAME).column("text").to_pylist()
    assert stats["train_documents"] == len(train) and stats["val_documents"] == len(val)
    assert train and val and not set(train) & set(val)
    assert max(len(d) for d in train + val) <= prep.DOC_MAX_CHARS
    assert any(d.startswith("Parquet row") for d in train + val)
    assert any("markdown" in d for d in train + val)
    # a file's documents all land on one side of the split
    for i in range(30):
        sides = {("train" if d in train else "val") for d in train + val if d.startswith(f"Document {i},")}
        assert len(sides) == 1


def test_files_named_val_become_the_validation_split(monkeypatch, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    pq.write_table(pa.table({"text": [f"train document {i}" for i in range(20)]}), source / "train_000.parquet")
    pq.write_table(pa.table({"text": [f"held-out document {i}" for i in range(5)]}), source / "val_000.parquet")
    prep = load_prepare(monkeypatch, tmp_path / "cache")
    prep.build_from_source(str(source))
    val = pq.read_table(tmp_path / "cache" / "data" / prep.VAL_FILENAME).column("text").to_pylist()
    assert sorted(val) == sorted(f"held-out document {i}" for i in range(5))


def test_missing_source_exits_2_with_the_fix(tmp_path):
    result = subprocess.run([sys.executable, str(PREPARE_PY), "--source", str(tmp_path / "nope")], cwd=REPO_ROOT,
                            env=autoresearch_env(tmp_path / "cache"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no such file or folder" in result.stderr
    assert "Fix:" in result.stderr and "--source sotu" in result.stderr


def test_empty_source_exits_2_with_the_fix(monkeypatch, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n\n  \n")
    prep = load_prepare(monkeypatch, tmp_path / "cache")
    assert prep.main(["--source", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "need at least 2" in err and "Fix:" in err
    (empty / "blank.txt").unlink()
    assert prep.main(["--source", str(empty)]) == 2
    assert "no .txt, .md or .parquet files" in capsys.readouterr().err


def test_a_bad_source_leaves_an_existing_cache_alone(monkeypatch, tiny_cache, tmp_path):
    prep = load_prepare(monkeypatch, tiny_cache)
    assert prep.main(["--source", str(tmp_path / "nope")]) == 2
    assert (tiny_cache / "tokenizer" / "tokenizer.pkl").exists()
    assert (tiny_cache / "data" / "shard_00000.parquet").exists()


# ---------------------------------------------------------------------------
# Download: real HTTP against a local server
# ---------------------------------------------------------------------------

@pytest.fixture
def shard_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_verifies_shards(monkeypatch, tmp_path, shard_server):
    served, url = shard_server
    pq.write_table(pa.table({"text": [f"web page {i}" for i in range(100)]}), served / "shard_00000.parquet")
    good = (served / "shard_00000.parquet").read_bytes()
    (served / "shard_00001.parquet").write_bytes(good[: len(good) // 2])   # truncated
    prep = load_prepare(monkeypatch, tmp_path / "cache")
    monkeypatch.setattr(prep, "BASE_URL", url)
    (tmp_path / "cache" / "data").mkdir(parents=True)
    assert prep.download_shard(0, attempts=1)
    assert prep.verify_shard(str(tmp_path / "cache" / "data" / "shard_00000.parquet")) == 100
    assert not prep.download_shard(1, attempts=2, backoff=0.0)
    assert not prep.download_shard(2, attempts=1)   # 404
    assert sorted(p.name for p in (tmp_path / "cache" / "data").iterdir()) == ["shard_00000.parquet"]


# ---------------------------------------------------------------------------
# Tokenizer, dataloader, evaluate_bpb
# ---------------------------------------------------------------------------

def test_tokenizer_round_trips(monkeypatch, tiny_cache):
    prep = load_prepare(monkeypatch, tiny_cache)
    tok = prep.Tokenizer.from_directory()
    assert tok.get_vocab_size() == prep.VOCAB_SIZE
    text = "Fellow-Citizens of the Senate: the state of the Union is strong.\n\nIn 1863, naïve café 你好!"
    ids = tok.encode(text, prepend=tok.get_bos_token_id())
    assert ids[0] == tok.get_bos_token_id()
    assert tok.decode(ids[1:]) == text
    assert tok.encode([text, "x"]) == [ids[1:], tok.encode("x")]
    token_bytes = prep.get_token_bytes()
    assert token_bytes.shape == (prep.VOCAB_SIZE,)
    assert token_bytes[tok.get_bos_token_id()] == 0
    assert int((token_bytes == 0).sum()) == len(prep.SPECIAL_TOKENS)
    assert sum(int(token_bytes[i]) for i in ids[1:]) == len(text.encode("utf-8"))


def test_dataloader_packs_whole_documents_from_bos(monkeypatch, tiny_cache):
    prep = load_prepare(monkeypatch, tiny_cache)
    tok = prep.Tokenizer.from_directory()
    bos = tok.get_bos_token_id()
    val_docs = pq.read_table(tiny_cache / "data" / prep.VAL_FILENAME).column("text").to_pylist()
    encoded = {tuple(ids) for ids in tok.encode(val_docs)}
    B, T = 4, 64
    loader = prep.make_dataloader(tok, B, T, "val", device="cpu")
    for _ in range(5):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
        assert epoch >= 1
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert bool((x[:, 0] == bos).all())
        assert bool(((x >= 0) & (x < prep.VOCAB_SIZE)).all())
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            starts = [i for i, t in enumerate(row) if t == bos]
            pieces = [row[a + 1:b] for a, b in zip(starts, starts[1:] + [len(row)], strict=True)]
            for piece in pieces[:-1]:   # every document but the last is whole
                assert tuple(piece) in encoded
            assert any(doc[:len(pieces[-1])] == tuple(pieces[-1]) for doc in encoded)
    loader.close()


class UniformModel(nn.Module):
    """Predicts every token with probability 1/V: per-token loss ln(V)."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx, targets=None, reduction="mean"):
        logits = torch.zeros(*idx.shape, self.vocab_size) + self.dummy
        return nn.functional.cross_entropy(logits.view(-1, self.vocab_size), targets.view(-1), reduction=reduction)


def test_evaluate_bpb_of_a_uniform_model(monkeypatch, tiny_cache):
    prep = load_prepare(monkeypatch, tiny_cache)
    tok = prep.Tokenizer.from_directory()
    batch_size = 4
    bpb = prep.evaluate_bpb(UniformModel(tok.get_vocab_size()), tok, batch_size)

    token_bytes = prep.get_token_bytes()
    loader = prep.make_dataloader(tok, batch_size, prep.MAX_SEQ_LEN, "val", device="cpu")
    tokens = nbytes = 0
    for _ in range(prep.EVAL_TOKENS // (batch_size * prep.MAX_SEQ_LEN)):
        _, y, _ = next(loader)
        b = token_bytes[y.reshape(-1)]
        tokens += int((b > 0).sum())
        nbytes += int(b.sum())
    loader.close()
    assert tokens > 0
    assert bpb == pytest.approx(math.log2(tok.get_vocab_size()) * tokens / nbytes, rel=1e-6)  # fp32 loss


# ---------------------------------------------------------------------------
# Fused training loss (CUDA only)
# ---------------------------------------------------------------------------

def test_fused_loss_matches_softcapped_cross_entropy(monkeypatch, tiny_cache):
    prep = load_prepare(monkeypatch, tiny_cache)
    if not prep.triton_kernels_available():
        pytest.skip("needs CUDA and Triton")
    cap, generator = 15.0, torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 64, device="cuda", generator=generator).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(1000, 64, device="cuda", generator=generator) * 0.1).requires_grad_()
    targets = torch.randint(0, 1000, (512,), device="cuda", generator=generator)
    targets[::7] = -1
    loss = prep.lm_head_softcap_loss(x, weight.to(torch.bfloat16), targets, cap)
    grads = torch.autograd.grad(2 * loss, (x, weight))

    x_ref, weight_ref = x.detach().float().requires_grad_(), weight.detach().to(torch.bfloat16).float().requires_grad_()
    reference = nn.functional.cross_entropy(cap * torch.tanh(x_ref @ weight_ref.t() / cap), targets, ignore_index=-1)
    reference_grads = torch.autograd.grad(2 * reference, (x_ref, weight_ref))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)
    for grad, expected in zip(grads, reference_grads, strict=True):
        assert (grad.float() - expected).abs().max() <= 1e-2 * expected.abs().max()


def test_rotary_rms_norm_matches_rotate_then_rms_norm(monkeypatch, tiny_cache):
    prep = load_prepare(monkeypatch, tiny_cache)
    if not prep.triton_kernels_available():
        pytest.skip("needs CUDA and Triton")
    B, T, H, D, generator = 2, 100, 3, 64, torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, H, D, device="cuda", generator=generator).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(B, T, H, D, device="cuda", generator=generator)
    angles = torch.rand(T + 5, D // 2, device="cuda", generator=generator) * 6
    cos, sin = angles.cos().to(torch.bfloat16)[None, :, None, :], angles.sin().to(torch.bfloat16)[None, :, None, :]
    out = prep.rotary_rms_norm(x, cos, sin)
    (grad,) = torch.autograd.grad(out, x, dy.to(torch.bfloat16))

    x_ref = x.detach().float().requires_grad_()
    c, s = cos[:, :T].float(), sin[:, :T].float()
    a, b = x_ref[..., :D // 2], x_ref[..., D // 2:]
    reference = nn.functional.rms_norm(torch.cat((a * c + b * s, b * c - a * s), dim=-1), (D,))
    (reference_grad,) = torch.autograd.grad(reference, x_ref, dy.to(torch.bfloat16).float())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert (out.float() - reference).abs().max() <= 1e-2 * reference.abs().max()
    assert (grad.float() - reference_grad).abs().max() <= 1e-2 * reference_grad.abs().max()


def test_fused_loss_refuses_a_cap_exp_could_overflow_with_the_fix(monkeypatch, tiny_cache):
    prep = load_prepare(monkeypatch, tiny_cache)
    x, weight = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(16, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="FUSED_LOSS = False"):
        prep.lm_head_softcap_loss(x, weight, torch.zeros(4, dtype=torch.long), 100)
