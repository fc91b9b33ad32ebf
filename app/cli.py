"""`autoresearch`: up, worker, migrate, demo."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time

from app.broker import check_broker
from app.config import PROJECT_ROOT, ConfigError, ServerUnreachable, Settings, load_settings
from app.db import check_reachable
from app.migrate import upgrade
from app.stack import (
    Stack,
    StackError,
    default_gpu_id,
    gpu_worker_command,
    gpu_worker_env,
    refuse_busy_ports,
    settings_env,
    wait_for_http,
    with_embedded_servers,
)


def detect_gpus() -> list[int]:
    from workers.gpu import list_gpus

    return [g.index for g in list_gpus()]


def start_stack(settings: Settings, *, flower: bool, cpu_workers: int | None = None) -> tuple[Stack, Settings, list[str]]:
    """Everything on this machine: embedded servers where needed, migrations, API, control
    worker, beat, one worker per GPU (or CPU workers with the tiny profile), Flower.

    First the state folder is locked and what an earlier `up` of it left running is stopped;
    StackError (one line) when another `up` holds it or a port is taken."""
    stack = Stack(settings, settings.state_dir / "logs")
    try:
        for leftover in stack.claim_state_folder():
            print(f"stopped {leftover}, left running by an earlier up of {settings.state_dir}", file=sys.stderr)
        refuse_busy_ports(settings, flower=flower)
        settings = with_embedded_servers(settings, stack)
        upgrade(settings.database_url)
        gpus = [] if cpu_workers else detect_gpus()
        if not gpus:
            settings = dataclasses.replace(settings, default_profile="tiny")
            stack.settings = settings
        stack.start_api()
        stack.start_control()
        if gpus:
            for index in gpus:
                stack.start_gpu_worker(index, cpu=False)
            workers = [f"gpu{i}" for i in gpus]
        else:
            for index in range(cpu_workers or 1):
                stack.start_gpu_worker(index, cpu=True)
            workers = [f"cpu worker {i} (tiny profile)" for i in range(cpu_workers or 1)]
        if flower:
            stack.start_flower()
        wait_for_http(f"{api_url(settings)}/health")
    except BaseException:
        stack.stop_all()
        raise
    return stack, settings, workers


def api_url(settings: Settings) -> str:
    return f"http://{settings.api_host}:{settings.api_port}"


def cmd_up(args) -> int:
    settings = load_settings()
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal was closed

    def abort_start(signum, frame):
        raise KeyboardInterrupt  # start_stack stops what it started, as on Ctrl-C

    for signum in stop_signals:
        signal.signal(signum, abort_start)
    try:
        stack, settings, workers = start_stack(settings, flower=not args.no_flower,
                                               cpu_workers=args.cpu_workers or None)
    except StackError as exc:
        print(f"autoresearch up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("autoresearch up: stopped while starting", file=sys.stderr)
        return 130
    print(f"API        {api_url(settings)}  (OpenAPI at /openapi.json)")
    if not args.no_flower:
        print(f"Flower     http://127.0.0.1:{settings.flower_port}")
    print(f"Database   {settings.database_url}")
    print(f"Broker     {settings.broker_url}")
    print(f"Workers    {', '.join(workers)}")
    print(f"Logs       {stack.log_dir}")
    print("Ctrl-C stops everything.")
    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    for signum in stop_signals:
        signal.signal(signum, request_stop)
    try:
        while not stopping:
            died = stack.exited()
            if died:
                print(f"stopping: process exited {died}; see {stack.log_dir}", file=sys.stderr)
                return 1
            time.sleep(1)
    finally:
        print("stopping...")
        stack.stop_all()
    return 0


def cmd_worker(args) -> int:
    """One GPU worker for this machine, pointed at the shared DATABASE_URL and CELERY_BROKER_URL."""
    settings = load_settings()
    gpu_id = args.gpu_id or default_gpu_id(args.gpu)
    env = {**os.environ, **settings_env(settings), **gpu_worker_env(args.gpu, cpu=args.cpu, gpu_id=gpu_id)}
    command = gpu_worker_command(args.gpu, gpu_id=gpu_id)
    os.chdir(PROJECT_ROOT)
    os.execvpe(command[0], command, env)
    return 0  # not reached


def cmd_migrate(args) -> int:
    upgrade(load_settings().database_url)
    print("database at the newest schema")
    return 0


def cmd_demo(args) -> int:
    from app.demo import run_demo

    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autoresearch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the whole stack on this machine")
    up.add_argument("--no-flower", action="store_true", help="do not start Flower")
    up.add_argument("--cpu-workers", type=int, default=0, metavar="N",
                    help="ignore GPUs and start N CPU workers (tiny profile)")
    up.set_defaults(run=cmd_up)
    worker = commands.add_parser("worker", help="start one GPU worker against the shared URLs")
    worker.add_argument("--gpu", type=int, required=True, metavar="N", help="GPU index (CUDA_VISIBLE_DEVICES)")
    worker.add_argument("--gpu-id", help="pool id of this GPU (default gpuN@hostname)")
    worker.add_argument("--cpu", action="store_true", help="train on the CPU (tiny profile tags)")
    worker.set_defaults(run=cmd_worker)
    migrate = commands.add_parser("migrate", help="bring the database to the newest schema")
    migrate.set_defaults(run=cmd_migrate)
    demo = commands.add_parser("demo", help="prepare data, start the stack, run three experiments, report")
    demo.add_argument("--keep-running", action="store_true", help="leave the stack up after the demo")
    demo.set_defaults(run=cmd_demo)
    from app.client import add_client_commands  # here: app.client imports this module

    add_client_commands(commands)
    args = parser.parse_args(argv)
    try:
        if args.command in ("up", "demo", "worker"):
            # A server that is not there is one line before anything starts (a worker would retry
            # for ever). `up` starts embedded servers for unset URLs, and migrating checks the database.
            settings = load_settings()
            if args.command == "worker":
                check_reachable(settings.database_url)
            if args.command == "worker" or settings.external_broker:
                check_broker(settings.broker_url)
        return args.run(args)
    except ServerUnreachable as exc:
        print(f"autoresearch {args.command}: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"failed: {' '.join(map(str, exc.cmd))} exited {exc.returncode}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
