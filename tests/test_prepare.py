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


def test_the_profile_table_imports_without_torch(monkeypatch, tmp_path):
    # The API and Celery's parent process check profile names; torch imported there would break CUDA in the
    # forked pool children. Run from outside the checkout, without PYTHONPATH, as the installed API does.
    code = ("import sys; from app.profiles import check_profile; from run_profiles import PROFILES; "
            "check_profile('tiny'); print(','.join(PROFILES)); "
            "print(','.join(m for m in sys.modules if m.split('.')[0] in ('torch', 'prepare')))")
    env = {k: v for k, v in autoresearch_env(tmp_path).items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    names, imported = result.stdout.splitlines()
    assert names.split(",") == list(load_prepare(monkeypatch, tmp_path).PROFILES) == ["h100", "h100-short", "tiny"]
    assert imported == ""


# ---------------------------------------------------------------------------
# Seed
# ---------------------------------------------------------------------------

def test_seed_comes_from_the_environment_with_42_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv("AUTORESEARCH_SEED", raising=False)
    assert load_prepare(monkeypatch, tmp_path).SEED == 42
    monkeypatch.setenv("AUTORESEARCH_SEED", "")
    assert load_prepare(monkeypatch, tmp_path).SEED == 42
    monkeypatch.setenv("AUTORESEARCH_SEED", " 1234567 ")
    assert load_prepare(monkeypatch, tmp_path).SEED == 1234567
    monkeypatch.setenv("AUTORESEARCH_SEED", str(2 ** 63 - 1))
    assert load_prepare(monkeypatch, tmp_path).SEED == 2 ** 63 - 1


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "+3", str(2 ** 63)])
def test_a_bad_seed_says_what_to_set(monkeypatch, tmp_path, value):
    monkeypatch.setenv("AUTORESEARCH_SEED", value)
    with pytest.raises(ValueError) as error:
        load_prepare(monkeypatch, tmp_path)
    assert f"AUTORESEARCH_SEED={value!r} is not a whole number" in str(error.value)
    assert "unset it for the default 42" in str(error.value)


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
