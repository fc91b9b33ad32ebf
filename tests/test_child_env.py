"""The environment a worker gives train.py: each GPU's run gets its share of the host's cores."""

from workers.training import CPU_THREAD_VARIABLES, cpu_share_env


def test_two_gpus_split_the_cores_between_their_runs(monkeypatch):
    for name in CPU_THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert cpu_share_env(gpus_on_host=2, cores=32) == {"OMP_NUM_THREADS": "16", "TORCHINDUCTOR_COMPILE_THREADS": "16"}
    assert cpu_share_env(gpus_on_host=8, cores=4) == {"OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}


def test_a_single_gpu_or_cpu_worker_keeps_every_core(monkeypatch):
    for name in CPU_THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert cpu_share_env(gpus_on_host=1, cores=32) == {}
    assert cpu_share_env(gpus_on_host=0, cores=32) == {}


def test_a_limit_set_for_the_worker_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    assert cpu_share_env(gpus_on_host=2, cores=32) == {"TORCHINDUCTOR_COMPILE_THREADS": "16"}
