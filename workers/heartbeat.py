"""The worker's parent process: pool registration, heartbeats and leases.

On start it registers this GPU and gives up whatever an earlier process under the same GPU id
still held (that process is gone without handing its runs back). On the worker's timer, in the
parent process (so it keeps beating while the pool child trains for minutes), it beats and
renews the leases of the runs this incarnation trains. On a warm shutdown it asks the pool child
to hand its run back (the training task kills train.py and releases the run without charging an
attempt), then deregisters. Workers without a GPU identity (the control worker) do nothing here.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid

import psutil
from celery import bootsteps
from celery.signals import worker_shutting_down

from app.config import load_settings
from app.db import transaction
from app.dispatch import send_all
from app.errors import NotFound
from app.models import WORKER_GPU
from app.services import lifecycle, pool
from workers import gpu
from workers.fingerprint import digest, fingerprint

log = logging.getLogger(__name__)

# This worker incarnation's lease token. Made when the parent imports this module, before the
# pool forks, so the pool children claim runs under the same token that the parent renews; a
# restarted worker has another, and so can tell its predecessor's runs from its own.
INCARNATION = uuid.uuid4().hex
HANDBACK_WAIT_S = 10.0  # how long a shutdown waits for the pool child to hand its run back
# Set in the parent as soon as a shutdown begins: from then on the worker takes no run and a
# heartbeat does not put it back into the pool.
SHUTTING_DOWN = threading.Event()


@worker_shutting_down.connect
def _leave_the_pool(**_):
    """The first thing a shutdown does: leave the pool, so that no pool child claims another run
    (a message it receives now goes back to the queue) while the current one is handed back."""
    SHUTTING_DOWN.set()
    settings = load_settings()
    holder = identity(settings)
    if holder is None:
        return
    try:
        with transaction(settings.database_url) as session:
            pool.deregister_if_present(session, gpu_id=holder.gpu_id)
    except Exception:
        log.exception("could not take %s out of the pool", holder.gpu_id)


def identity(settings) -> lifecycle.Holder | None:
    if settings.worker_gpu_index is None:
        return None
    index = settings.worker_gpu_index
    model = device_model(index)
    return lifecycle.Holder(gpu_id=settings.worker_gpu_id or f"gpu{index}@{socket.gethostname()}", token=INCARNATION,
                            gpu_index=index, gpu_model=model, host=socket.gethostname(),
                            fingerprint=fingerprint(settings.cache_dir, model))


def device_model(index: int) -> str:
    return gpu.telemetry(index).get("name", "unknown") if gpu.nvml_available() else "cpu"


def probe(index: int) -> dict:
    """Telemetry of this worker's device: the GPU by NVML, else the CPU it trains on."""
    return gpu.telemetry(index) if gpu.nvml_available() else gpu.cpu_telemetry()


class Heartbeat(bootsteps.StartStopStep):
    # After the pool, so that on shutdown this step stops first, while the pool child still runs.
    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.settings = load_settings()
        self.holder = identity(self.settings)
        self.policy = lifecycle.Policy.from_settings(self.settings)
        self.timer_ref = None

    def start(self, worker):
        if self.holder is None:
            return
        self.register()
        # The queue of this worker's setup, for runs that workers of another setup refused. Added
        # before the consumer starts (it is the last step), so it is consumed from the start.
        worker.app.amqp.queues.select_add(lifecycle.setup_queue(digest(self.holder.fingerprint)))
        with transaction(self.settings.database_url) as session:
            outcomes = lifecycle.release_previous_incarnation(session, holder=self.holder, policy=self.policy)
        send_all([d for o in outcomes for d in o.dispatches], self.settings.broker_url)
        if outcomes:
            log.warning("gave up %d run(s) that an earlier %s held", len(outcomes), self.holder.gpu_id)
        log.info("registered %s in the GPU pool", self.holder.gpu_id)
        self.timer_ref = worker.timer.call_repeatedly(self.settings.heartbeat_interval, self.beat, priority=10)

    def register(self):
        telemetry = probe(self.holder.gpu_index)
        with transaction(self.settings.database_url) as session:
            pool.register_gpu(
                session, gpu_id=self.holder.gpu_id, gpu_index=self.holder.gpu_index,
                gpu_name=telemetry.get("name", "unknown"), vram_mb=telemetry.get("vram_total_mb") or 0.0,
                host=self.holder.host, telemetry=telemetry, kind=WORKER_GPU,
            )

    def beat(self):
        try:
            with transaction(self.settings.database_url) as session:
                lifecycle.renew_leases(session, holder=self.holder, lease_s=self.settings.lease_s)
                pool.heartbeat(session, gpu_id=self.holder.gpu_id, telemetry=probe(self.holder.gpu_index))
        except NotFound:
            # Someone deregistered us (an operator, a test); a live worker belongs in the pool,
            # unless it is shutting down.
            if not SHUTTING_DOWN.is_set():
                self.register()
        except Exception:
            # A database blip must not kill the timer; the next beat tries again.
            log.exception("heartbeat of %s failed", self.holder.gpu_id)

    def stop(self, worker):
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None
        if self.holder is None:
            return
        self.hand_back()
        try:
            with transaction(self.settings.database_url) as session:
                pool.deregister_if_present(session, gpu_id=self.holder.gpu_id)
            log.info("deregistered %s", self.holder.gpu_id)
        except Exception:
            log.exception("deregistering %s failed", self.holder.gpu_id)

    def hand_back(self):
        """A clean shutdown charges no attempt: the pool child, told by SIGTERM, stops train.py
        and releases its run (workers.training). Whatever it did not release is released here,
        but only once no pool child is left: train.py dies with its parent (PR_SET_PDEATHSIG), so
        then nothing of this worker trains the run any more. A child that will not stop leaves
        its lease to expire."""
        try:
            with transaction(self.settings.database_url) as session:
                held = lifecycle.held_runs(session, holder=self.holder)
        except Exception:
            log.exception("could not look up the runs of %s; their leases will expire", self.holder.gpu_id)
            return
        if not held:
            return
        children = psutil.Process(os.getpid()).children()
        for child in children:
            try:
                child.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(children, timeout=HANDBACK_WAIT_S)
        if alive:
            log.warning("the pool child did not stop; the lease of %s will expire", ", ".join(held))
            return
        with transaction(self.settings.database_url) as session:
            outcomes = [lifecycle.lose_run(session, run_id=run_id, token=self.holder.token, policy=self.policy,
                                           charge=False, reason=f"handed back: {self.holder.gpu_id} shut down")
                        for run_id in lifecycle.held_runs(session, holder=self.holder)]
        send_all([d for o in outcomes for d in o.dispatches], self.settings.broker_url)
        log.info("handed back %s", ", ".join(held))
