"""Trusted evaluation against in-process evaluation: wall time and val_bpb, both ways.

Builds train.py's model untrained (its own definitions, the profile's batch size and device),
then times
  in-process: prepare.evaluate_bpb on the model, as train.py does at its end (compiled on the GPU,
              under bf16 autocast, as train.py runs it);
  trusted:    prepare.export_model (what train.py adds to its run), then workers.evaluator.score
              (a fresh process: start-up, load and checks, the causality check, EVAL_TOKENS scored).
and prints both times, both val_bpb and the overhead. Needs a prepared cache (AUTORESEARCH_CACHE)
with the validation split.

    AUTORESEARCH_PROFILE=tiny AUTORESEARCH_CACHE=/path/to/cache python bench/trusted_eval.py
    AUTORESEARCH_PROFILE=h100 AUTORESEARCH_CACHE=/path/to/cache python bench/trusted_eval.py   # on the GPU
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import prepare  # noqa: E402
from workers import evaluator  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from conftest_data import load_train_definitions  # noqa: E402


def main() -> int:
    # train.py's classes and constants, without its training run
    train = type("TrainDefinitions", (), load_train_definitions())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = prepare.Tokenizer.from_directory()
    model_dim = -(-train.DEPTH * train.ASPECT_RATIO // train.HEAD_DIM) * train.HEAD_DIM
    config = train.GPTConfig(sequence_len=prepare.MAX_SEQ_LEN, vocab_size=tokenizer.get_vocab_size(),
                             n_layer=train.DEPTH, n_head=model_dim // train.HEAD_DIM, n_embd=model_dim,
                             window_pattern=train.WINDOW_PATTERN, softcap=train.LOGIT_SOFTCAP)
    torch.manual_seed(prepare.SEED)
    with torch.device(device):
        model = train.GPT(config)
    model.init_weights()
    model.eval()
    batch = train.DEVICE_BATCH_SIZE
    autocast = torch.bfloat16 if device.type == "cuda" else None
    print(f"profile {prepare.PROFILE} | device {device} | EVAL_TOKENS {prepare.EVAL_TOKENS:,} | batch {batch} | "
          f"params {model.num_params() / 1e6:.1f}M", flush=True)

    compiled = torch.compile(model, dynamic=False) if train.COMPILE else model
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast is not None):
        in_process = prepare.evaluate_bpb(compiled, tokenizer, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    in_process_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="trusted-eval-") as folder:
        artifact = Path(folder) / evaluator.ARTIFACT_FILENAME
        started = time.perf_counter()
        prepare.export_model(model, torch.zeros(batch, prepare.MAX_SEQ_LEN, dtype=torch.long, device=device),
                             autocast_dtype=autocast, path=str(artifact))
        export_s = time.perf_counter() - started
        size_mb = artifact.stat().st_size / 1e6
        started = time.perf_counter()
        evaluation = evaluator.score(artifact, profile=prepare.PROFILE, cache_dir=Path(prepare.CACHE_DIR),
                                     visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
        score_s = time.perf_counter() - started
    if evaluation.error:
        print(f"trusted evaluation failed: {evaluation.error}", file=sys.stderr)
        return 1
    trusted_s = export_s + score_s
    print(f"in-process: {in_process_s:7.2f} s  val_bpb {in_process:.6f}")
    print(f"trusted:    {trusted_s:7.2f} s  val_bpb {evaluation.val_bpb:.6f}  (export {export_s:.2f} s, "
          f"{size_mb:.0f} MB; evaluator process {score_s:.2f} s: {evaluation.details})")
    print(f"overhead:   {trusted_s - in_process_s:+7.2f} s  | val_bpb difference "
          f"{evaluation.val_bpb - in_process:+.2e} (mismatch flag: {evaluator.mismatch(in_process, evaluation.val_bpb)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
