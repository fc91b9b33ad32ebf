"""The heartbeat bootstep: registers this GPU in the pool when the worker starts, beats on the
worker's timer in the parent process (so it keeps beating while the pool child trains for
minutes), and deregisters when the worker stops. Workers without a GPU identity (the control
worker) do nothing here."""

from __future__ import annotations

import logging
import socket

from celery import bootsteps

from app.config import load_settings
from app.db import transaction
from app.errors import NotFound
from app.services import pool
from workers import gpu

log = logging.getLogger(__name__)


def identity(settings) -> tuple[str, int] | None:
    if settings.worker_gpu_index is None:
        return None
    index = settings.worker_gpu_index
    return settings.worker_gpu_id or f"gpu{index}@{socket.gethostname()}", index


def probe(index: int) -> dict:
    """Telemetry of this worker's device: the GPU by NVML, else the CPU it trains on."""
    return gpu.telemetry(index) if gpu.nvml_available() else gpu.cpu_telemetry()


class Heartbeat(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.settings = load_settings()
        self.identity = identity(self.settings)
        self.timer_ref = None

    def start(self, worker):
        if self.identity is None:
            return
        self.register()
        log.info("registered %s in the GPU pool", self.identity[0])
        self.timer_ref = worker.timer.call_repeatedly(self.settings.heartbeat_interval, self.beat, priority=10)

    def register(self):
        gpu_id, index = self.identity
        telemetry = probe(index)
        with transaction(self.settings.database_url) as session:
            pool.register_gpu(
                session, gpu_id=gpu_id, gpu_index=index, gpu_name=telemetry.get("name", "unknown"),
                vram_mb=telemetry.get("vram_total_mb") or 0.0, host=socket.gethostname(), telemetry=telemetry,
            )

    def beat(self):
        gpu_id, index = self.identity
        try:
            with transaction(self.settings.database_url) as session:
                pool.heartbeat(session, gpu_id=gpu_id, telemetry=probe(index))
        except NotFound:
            # Someone deregistered us (an operator, a test); a live worker belongs in the pool.
            self.register()
        except Exception:
            # A database blip must not kill the timer; the next beat tries again.
            log.exception("heartbeat of %s failed", gpu_id)

    def stop(self, worker):
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None
        if self.identity is None:
            return
        try:
            with transaction(self.settings.database_url) as session:
                pool.deregister(session, gpu_id=self.identity[0])
            log.info("deregistered %s", self.identity[0])
        except Exception:
            log.exception("deregistering %s failed", self.identity[0])
