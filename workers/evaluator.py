"""The trusted evaluator: the score of a worker's run, computed outside the agent's process.

train.py ends by saving its trained model with prepare.export_model (a torch.export program of
ATen ops plus its weights, as plain tensors). The worker then runs this module as a process of
its own (`python -m workers.evaluator ARTIFACT`, or the same in a standby interpreter that has
imported torch already: workers/standby.py): never in the Celery process, which must not touch
CUDA, and never in train.py's, whose Python the agent controls. It

- reads the file with torch.load(weights_only=True), which rebuilds tensors and plain values
  only, never objects that run code;
- checks the program before it is deserialized, because torch's deserializer would resolve any
  `torch.*` name as a node's target and hand symbolic-shape strings and guard code to eval:
  every node must call an ATen operator (or take an item of a tuple), shapes must be static,
  there must be no guard code, and node metadata (stack traces) is dropped;
- checks it again as a graph: ATen ops only, none that reads files or prints, one input
  (int64, batch x MAX_SEQ_LEN), the logits as the only output, no state mutated between calls;
- checks causality on real validation rows: each row's tokens from a random cut on are replaced
  by another row's, and the logits before the cut must not move (CAUSALITY_TOLERANCE);
- scores the profile's EVAL_TOKENS with prepare.bits_per_byte, the function evaluate_bpb uses.

It prints one JSON line: {"val_bpb": ..., ...} or {"error": "why, and what to change"}.
The worker side (score()) imports no torch.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.config import project_pythonpath
from workers.standby import Standby

ARTIFACT_FILENAME = "model.pt2"  # in the run directory; its path reaches train.py as AUTORESEARCH_EXPORT_PATH
EVALUATOR_TIMEOUT_S = 900.0  # a load and one pass over the h100 profile's eval tokens take well under a minute
# Logits before the cut must agree to this (absolute, in logit units). The two passes run the
# same kernels on the same shapes, so an honest model gives identical logits; the bound only
# forgives float reassociation. A leak kept under it moves log-probabilities by at most 2e-4
# nats a token, about 1e-4 bpb: below a run's noise, so it cannot buy a verdict.
CAUSALITY_TOLERANCE = 1e-4
# A reported val_bpb off by more than this fraction of the evaluator's is flagged (score_mismatch):
# one bf16 rounding step (2**-8), since train.py evaluates under bf16 autocast on the GPU.
SCORE_TOLERANCE = 2 ** -8
# ATen ops that read files or print: a program could read the validation shard with them.
DENIED_OPS = frozenset({"from_file", "_print"})
# Variables the evaluator's process gets from the worker's environment; nothing else (no credentials).
PASSED_VARIABLES = ("PATH", "HOME", "LANG", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


class ExportRejected(Exception):
    """The artifact is not a program the evaluator will run; the message says what to change."""


@dataclass
class Evaluation:
    val_bpb: float | None
    error: str | None = None
    details: dict = field(default_factory=dict)  # causality, timings, batch size: kept in the run's `scoring`


# ---------------------------------------------------------------------------
# Worker side: run the evaluator process


def evaluator_env(*, profile: str, cache_dir: Path, visible_devices: str) -> dict[str, str]:
    return {**standing_env(visible_devices), "AUTORESEARCH_PROFILE": profile, "AUTORESEARCH_CACHE": str(cache_dir)}


def standing_env(visible_devices: str) -> dict[str, str]:
    """The part of evaluator_env that is the same for every run of a worker: an evaluator standby
    (workers.runner.start_evaluator_standby) starts with it. The profile and cache come at the
    hand-over, before prepare.py, which reads them at import, is imported."""
    env = {name: os.environ[name] for name in PASSED_VARIABLES if name in os.environ}
    env.update(CUDA_VISIBLE_DEVICES=visible_devices, PYTHONPATH=project_pythonpath(), PYTHONUNBUFFERED="1")
    return env


def score(artifact: Path, *, profile: str, cache_dir: Path, visible_devices: str = "",
          timeout_s: float = EVALUATOR_TIMEOUT_S, standby: Standby | None = None) -> Evaluation:
    """Evaluate a run's exported model in a process of its own (on the GPUs `visible_devices`
    names, as CUDA_VISIBLE_DEVICES does); an Evaluation with val_bpb or with the error that says
    why not.

    train.py wrote the artifact, so it is opened here without following a symlink and must be a
    regular file; the evaluator reads that open file, not the path, which the agent's code could
    change again. With a `standby` (workers.runner.start_evaluator_standby) the evaluator runs in
    it when it fits, else (logged) in a fresh process; either way the standby is used up."""
    missing = Evaluation(None, error=(
        "train.py exported no model, so the worker could not score it: end train.py with "
        "prepare.export_model(forward, example) as the baseline does (program.md, 'Scoring')"))
    try:
        try:
            # Non-blocking: opening a FIFO planted in its place would otherwise wait for a writer.
            fd = os.open(artifact, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return missing
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return missing
            return _evaluate(fd, evaluator_env(profile=profile, cache_dir=cache_dir, visible_devices=visible_devices),
                             timeout_s, standby)
        finally:
            os.close(fd)
    finally:
        if standby is not None:  # a no-op once handed the run; unused, it must not outlive it
            standby.discard()


def _evaluate(fd: int, env: dict[str, str], timeout_s: float, standby: Standby | None) -> Evaluation:
    started = time.monotonic()
    # Output goes to files read afterwards: the standby cannot be given a pipe's reading end to drain.
    with tempfile.TemporaryDirectory(prefix="autoresearch-eval-") as workdir, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err:
        proc = None
        if standby is not None:
            cwd_fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                proc = standby.launch(env, python=sys.executable, uid=None, cwd_fd=cwd_fd, stdout_fd=out.fileno(),
                                      stderr_fd=err.fileno(), module="workers.evaluator", files=(fd,))
            finally:
                os.close(cwd_fd)
        if proc is None:
            proc = subprocess.Popen([sys.executable, "-m", "workers.evaluator", f"/dev/fd/{fd}"], cwd=workdir, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(fd,))
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return Evaluation(None, error=f"the evaluator took longer than {timeout_s:g} s on the exported model")
        finally:
            if proc.returncode is None:  # timed out, or this process is stopping: as subprocess.run does
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    lines = stdout.strip().splitlines()
    try:
        outcome = json.loads(lines[-1]) if lines else None
    except ValueError:
        outcome = None
    if not isinstance(outcome, dict):
        return Evaluation(None, error=f"the evaluator failed (exit {proc.returncode}): {stderr.strip()[-2000:]}")
    details = {**outcome.get("details", {}), "evaluator_s": round(time.monotonic() - started, 3),
               "standby": standby is not None and proc is standby.proc}
    return Evaluation(outcome.get("val_bpb"), error=outcome.get("error"), details=details)


def mismatch(reported: float, trusted: float) -> bool:
    """Whether train.py's own val_bpb differs from the evaluator's by more than bf16 rounding."""
    return abs(reported - trusted) > SCORE_TOLERANCE * trusted


# ---------------------------------------------------------------------------
# Evaluator side: load, check, score (imports torch and prepare)


def check_serialized(document: dict) -> None:
    """Refuse, before deserializing, anything the deserializer would turn into code."""
    if document.get("guards_code"):
        raise ExportRejected("the program carries guard code; export with prepare.export_model")
    if document.get("range_constraints"):
        raise ExportRejected("the program has symbolic shapes; export with a static example batch "
                             "(prepare.export_model does)")

    def walk(value):
        if isinstance(value, dict):
            if "as_expr" in value or "expr_str" in value:
                raise ExportRejected("the program has symbolic shapes; export with a static example batch")
            if "target" in value and "inputs" in value and "outputs" in value:  # a graph node
                target = value["target"]
                if not isinstance(target, str) or not (target.startswith("torch.ops.aten.")
                                                       or target == "_operator.getitem"):
                    raise ExportRejected(f"the program calls {target!r}; only ATen ops may be exported "
                                         "(no custom kernels: turn the gpu_kernels paths off in the exported forward)")
                value["metadata"] = {}
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(document.get("graph_module"))


def load_program(path: Path, *, seq_len: int):
    """The exported program at `path`, checked; returns (module, batch_size, device)."""
    import operator

    import torch
    from torch._export.serde.serialize import SerializedArtifact, deserialize
    from torch.export.graph_signature import InputKind, OutputKind

    from prepare import EXPORT_FORMAT

    try:
        artifact = torch.load(path, weights_only=True)
    except Exception as e:  # any unreadable or code-carrying file
        raise ExportRejected(f"the exported model is not a file prepare.export_model writes ({e})") from None
    if not isinstance(artifact, dict) or artifact.get("format") != EXPORT_FORMAT:
        raise ExportRejected("the exported model is not in the format prepare.export_model writes")
    weights = {**artifact.get("state_dict", {}), **artifact.get("constants", {})}
    if not all(isinstance(k, str) and _NAME.match(k) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise ExportRejected("the exported weights are not named tensors")
    batch_size = artifact.get("batch_size")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ExportRejected("the exported model names no batch size")
    document = json.loads(artifact["program"])
    check_serialized(document)
    devices = {t.device for t in weights.values()} or {torch.device("cpu")}
    if len(devices) != 1:
        raise ExportRejected(f"the exported weights are on several devices: {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExportRejected("the model was exported on a GPU the evaluator cannot see")
    example = ((torch.zeros(batch_size, seq_len, dtype=torch.long, device=device),), {})
    try:
        program = deserialize(SerializedArtifact(json.dumps(document).encode(), artifact["state_dict"],
                                                 artifact["constants"], example))
    except Exception as e:  # a malformed program: the deserializer's own message says where
        raise ExportRejected(f"the exported program could not be loaded ({type(e).__name__}: {e})") from None
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if target is operator.getitem:
            continue
        if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
            raise ExportRejected(f"the program calls {target}; only ATen ops may be exported")
        if target._schema.name.split("::")[-1] in DENIED_OPS:
            raise ExportRejected(f"the program calls {target}, which reads files or prints")
    signature = program.graph_signature
    user_inputs = [s for s in signature.input_specs if s.kind == InputKind.USER_INPUT]
    allowed_inputs = {InputKind.USER_INPUT, InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}
    if len(user_inputs) != 1 or any(s.kind not in allowed_inputs for s in signature.input_specs):
        raise ExportRejected("the exported forward must take one tensor, the token ids")
    if [s.kind for s in signature.output_specs] != [OutputKind.USER_OUTPUT]:
        raise ExportRejected("the exported forward must return the logits only and change no state")
    return program.module(), batch_size, device


def check_causality(forward, x, *, seed: int = 0) -> float:
    """The largest change of a logit before a row's cut when every token from the cut on is
    replaced (by the same positions of the next row). Cuts are drawn per row at random, so a
    model cannot leak only where it expects no check."""
    import torch

    rows, width = x.shape
    generator = torch.Generator().manual_seed(seed)
    cuts = torch.randint(1, width, (rows,), generator=generator).to(x.device)
    later = torch.arange(width, device=x.device)[None, :] >= cuts[:, None]
    perturbed = torch.where(later, x.roll(1, dims=0), x)
    if rows == 1:  # no other row to borrow from: shifted ids stand in
        perturbed = torch.where(later, (x + 1) % (int(x.max()) + 1), x)
    before = forward(x).float()
    after = forward(perturbed).float()
    earlier = ~later
    return float((before - after).abs().amax(dim=-1)[earlier].max())


def evaluate_artifact(path: Path) -> dict:
    """Load, check and score one artifact in this process: the JSON the worker reads."""
    import torch
    import torch.nn.functional as F

    import prepare

    torch.set_float32_matmul_precision("high")
    started = time.monotonic()
    module, batch_size, device = load_program(path, seq_len=prepare.MAX_SEQ_LEN)
    loaded = time.monotonic()
    tokenizer = prepare.Tokenizer.from_directory()
    vocab = tokenizer.get_vocab_size()
    loader = prepare.make_dataloader(tokenizer, batch_size, prepare.MAX_SEQ_LEN, "val", device=device)
    try:
        x, _, _ = next(loader)
    finally:
        loader.close()

    def logits_of(idx):
        logits = module(idx)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (*idx.shape, vocab) \
                or not logits.is_floating_point():
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ExportRejected(f"the exported forward returned {shape}; it must return float logits of shape "
                                 f"(batch, {prepare.MAX_SEQ_LEN}, {vocab})")
        return logits

    with torch.inference_mode():
        leak = check_causality(logits_of, x)
        if not leak <= CAUSALITY_TOLERANCE:
            raise ExportRejected(
                f"causality check failed: logits changed by up to {leak:.3g} when only later tokens changed "
                f"(tolerance {CAUSALITY_TOLERANCE:g}); a position may attend only to itself and earlier positions")
        checked = time.monotonic()
        val_bpb = prepare.bits_per_byte(
            lambda x, y: F.cross_entropy(logits_of(x).float().flatten(0, 1), y.flatten(), reduction="none"),
            tokenizer, batch_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    scored = time.monotonic()
    if not val_bpb == val_bpb or val_bpb in (float("inf"), float("-inf")):
        raise ExportRejected(f"the exported model's val_bpb is {val_bpb}: its logits are not finite")
    steps = max(1, prepare.EVAL_TOKENS // (batch_size * prepare.MAX_SEQ_LEN))
    return {"val_bpb": val_bpb, "details": {
        "eval_tokens": steps * batch_size * prepare.MAX_SEQ_LEN, "batch_size": batch_size, "device": str(device),
        "causality_max_diff": leak, "load_s": round(loaded - started, 3), "causality_s": round(checked - loaded, 3),
        "score_s": round(scored - checked, 3)}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m workers.evaluator ARTIFACT", file=sys.stderr)
        return 2
    try:
        outcome = evaluate_artifact(Path(argv[0]))
    except ExportRejected as e:
        outcome = {"error": f"trusted scoring refused the exported model: {e}"}
    except Exception as e:  # the program failed while running (a shape error, say): the model's fault
        outcome = {"error": f"the exported model failed in the evaluator ({type(e).__name__}: {e})"}
    print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
