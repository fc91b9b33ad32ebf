"""/api/pool/*: GPU workers, heartbeats and leases."""

from __future__ import annotations

from flask import Blueprint

from app import schemas
from app.api import endpoint, settings
from app.services import pool as svc

bp = Blueprint("pool", __name__)


@endpoint(bp, "/api/pool/register", "POST", summary="Register (or re-register) a GPU worker",
          request_model=schemas.GpuRegister, response_model=schemas.GpuRegistered)
def register(session, body: schemas.GpuRegister):
    return {"registered": True, "worker": svc.gpu_public(svc.register_gpu(session, **body.model_dump()))}


@endpoint(bp, "/api/pool/heartbeat", "POST", summary="A GPU worker is alive",
          request_model=schemas.GpuHeartbeat, response_model=schemas.Flag)
def heartbeat(session, body: schemas.GpuHeartbeat):
    svc.heartbeat(session, gpu_id=body.gpu_id, telemetry=body.telemetry)
    return {"ok": True}


@endpoint(bp, "/api/pool/list", "GET", summary="All GPU workers; silent ones are offline",
          response_model=schemas.PoolPublic)
def list_workers(session, body):
    return svc.list_gpus(session, stale_after=settings().stale_after)


@endpoint(bp, "/api/pool/acquire", "POST", summary="Lease an idle GPU to an experiment",
          request_model=schemas.GpuAcquire, response_model=schemas.Acquired)
def acquire(session, body: schemas.GpuAcquire):
    return svc.acquire(session, experiment_id=body.experiment_id, stale_after=settings().stale_after)


@endpoint(bp, "/api/pool/release", "POST", summary="Give a leased GPU back (lease holder only)",
          request_model=schemas.GpuRelease, response_model=schemas.Flag)
def release(session, body: schemas.GpuRelease):
    svc.release(session, gpu_id=body.gpu_id, experiment_id=body.experiment_id)
    return {"released": True}


@endpoint(bp, "/api/pool/deregister", "POST", summary="Remove a GPU worker from the pool",
          request_model=schemas.GpuRef, response_model=schemas.Flag)
def deregister(session, body: schemas.GpuRef):
    svc.deregister(session, gpu_id=body.gpu_id)
    return {"deregistered": True}
