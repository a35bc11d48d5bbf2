"""Benchmark: S3Device checkpoints against a plain boto3 upload of the same bytes.

Against a SeaweedFS (``weed mini``) started for the run, on loopback:

* ``upload_mib_s``: a device of ``--size-mib`` of incompressible data, written
  whole, then :meth:`S3Device.checkpoint` (hash every object, check the bucket
  for it, upload it, write the manifest);
* ``baseline_upload_mib_s``: the same bytes as one file, uploaded with boto3's
  ``upload_file`` (s3transfer's parallel multipart, as ``aws s3 cp`` does);
  ``upload_ratio`` = the first ÷ the second (the issue's goal: >= 0.7);
* ``dedup_checkpoint_s``: a second device with the same content checkpointed:
  every object is found in the bucket, nothing is uploaded;
* ``restore_read_mib_s``: a fresh device opened from the checkpoint and read
  whole (lazy fetches, verified, ``concurrency`` at a time).

One bucket, warmed up first (SeaweedFS allocates a bucket's volumes on its first
writes); runs alternate which of device and baseline goes first, ``--runs``
times; medians are reported. Each run's device has its own random content.

Then, unless ``--mirror-runs 0``, a Redis VM (256 MiB, the shipped blueprint,
snapshotted and signed for the run) is mirrored and restored, ``--mirror-runs``
times (``ferry vm run --mirror`` and ``ferry vm restore``, the CLI users run):

* ``mirror_rpo_s_p50`` / ``mirror_rpo_s_max``: the recovery point (age of the
  last complete checkpoint) sampled every 0.2 s from the holder's status for
  ``--mirror-s`` seconds under a Redis writer's load (``--mirror-interval``
  between checkpoints);
* ``mirror_pause_ms_p50`` / ``_max``: the pauses that made the checkpoints;
* ``restore_to_pong_s``: the holder and QEMU SIGKILLed, to the first PONG of
  ``ferry vm restore`` on "another host" (this machine, other ferry
  directories and VM id: the restore has only the bucket); against the same
  run's ``resume_to_pong_s``, ``ferry vm run`` of the local package on that
  host (``restore_vs_resume_ratio``);
* ``lost_before_rpo``: writes acknowledged before the restored checkpoint's
  instant that the restored Redis lacks (must be 0).

    .venv/bin/python bench/s3.py --size-mib 256 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

from ferry.node.control import ControlClient
from ferry.s3 import Layout, ObjectCache, S3Device
from ferry.s3.device import DEFAULT_CONCURRENCY
from ferry.s3.manifest import DEFAULT_OBJECT_SIZE_BYTES
from ferry.s3.vmcheckpoint import load_record
from ferry.testing.packages import Signer
from ferry.testing.s3 import SeaweedFS
from ferry.testing.site import holder_pids
from ferry.testing.workload import RedisWriter
from ferry.vm.registry import VMPaths, cleanup_leftovers

MiB = 1 << 20
WRITE_CHUNK = 4 * MiB
BUCKET = "ferry-bench"


async def device_run(s3: SeaweedFS, bucket: str, data_file: Path, size: int, run: int,
                     staging: Path) -> dict[str, float]:
    store = s3.store(bucket)
    dev = await S3Device.create(store, f"bench-{run}", size, staging_dir=staging)
    with data_file.open("rb") as f:
        for off in range(0, size, WRITE_CHUNK):
            await dev.write_at(off, f.read(WRITE_CHUNK))
    report = await dev.checkpoint()
    assert report.bytes_uploaded == size, report
    twin = await S3Device.create(store, f"twin-{run}", size, staging_dir=staging)
    with data_file.open("rb") as f:
        for off in range(0, size, WRITE_CHUNK):
            await twin.write_at(off, f.read(WRITE_CHUNK))
    dedup = await twin.checkpoint()
    assert dedup.bytes_uploaded == 0, dedup
    await twin.close()
    await dev.close()
    fresh = await S3Device.open(store, f"bench-{run}", staging_dir=staging,
                                cache=ObjectCache(64 * MiB))
    started = time.perf_counter()
    read = 0
    step = DEFAULT_CONCURRENCY * DEFAULT_OBJECT_SIZE_BYTES
    with data_file.open("rb") as f:
        for off in range(0, size, step):
            got = await fresh.read_at(off, min(step, size - off))
            if got != f.read(len(got)):
                raise SystemExit("restore read differs from what was written")
            read += len(got)
    restore_s = time.perf_counter() - started
    await fresh.close()
    return {"upload_s": report.duration_s, "dedup_checkpoint_s": dedup.duration_s,
            "restore_read_s": restore_s}


def baseline_run(s3: SeaweedFS, bucket: str, data_file: Path, run: int) -> float:
    store = s3.store(bucket)
    started = time.perf_counter()
    store.client.upload_file(str(data_file), bucket, f"baseline/{run}",
                             Config=TransferConfig(max_concurrency=DEFAULT_CONCURRENCY))
    return time.perf_counter() - started


def fill(path: Path, size: int) -> None:
    with path.open("wb") as f:
        for _ in range(0, size, WRITE_CHUNK):
            f.write(os.urandom(WRITE_CHUNK))


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ferry(env: dict[str, str], *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "ferry.cli.main", *args, "--json"], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"ferry {' '.join(args)}: {proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


async def _until_pong(port: int, timeout_s: float = 120.0) -> float:
    """Seconds (monotonic clock) at the first PONG on ``port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    writer.write(b"PING\r\n")
                    if (await reader.readline()).strip() == b"+PONG":
                        return time.monotonic()
                finally:
                    writer.close()
        await asyncio.sleep(0.02)
    raise SystemExit(f"no PONG on {port} in {timeout_s} s")


def _host_env(root: Path, signer: Signer, s3: SeaweedFS) -> dict[str, str]:
    return {**os.environ, **signer.env, **s3.env(), "FERRY_RUN_DIR": str(root / "run"),
            "FERRY_STATE_DIR": str(root / "state"),
            "FERRY_PACKAGE_CACHE_DIR": str(root / "pkgcache")}


async def mirror_run(s3: SeaweedFS, signer: Signer, package: Path, root: Path, run: int,
                     seconds: float, interval_s: float) -> dict[str, Any]:
    bucket = "ferry-mirror"
    store = s3.store(bucket)
    url = f"s3://{bucket}/vm-{run}"
    env_a = _host_env(root / f"a{run}", signer, s3)
    env_b = _host_env(root / f"b{run}", signer, s3)
    port_a, port_b, port_r = _port(), _port(), _port()
    src = f"bench-src-{run}"
    ready = await asyncio.to_thread(_ferry, env_a, "vm", "run", "--detach", "--name", src,
                                    "-p", f"127.0.0.1:{port_a}:6379", "--mirror", url,
                                    "--mirror-interval", str(interval_s), str(package))
    # The same run's baseline: the local package resumed on host B, timed on its second
    # run (the first verifies and extracts the package into B's cache).
    for _attempt in range(2):
        t0 = time.monotonic()
        pong = asyncio.create_task(_until_pong(port_r))  # a client retrying all along
        await asyncio.to_thread(_ferry, env_b, "vm", "run", "--detach", "--name",
                                f"base-{run}", "-p", f"127.0.0.1:{port_r}:6379", str(package))
        resume_s = await pong - t0
        await asyncio.to_thread(_ferry, env_b, "vm", "stop", f"base-{run}")
    client = ControlClient(VMPaths(root / f"a{run}" / "run", root / f"a{run}" / "state")
                           .control_socket(src), src)
    writer = RedisWriter([("127.0.0.1", port_a)], prefix="b")
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop))
    rpo: list[float] = []
    pauses: dict[int, float] = {}
    try:
        await writer.wait_acknowledged(20)
        while ((await client.status()).mirror or {}).get("checkpoints", 0) < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.2)  # (polling another process)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            mirror = (await client.status()).mirror or {}
            rpo.append(time.time() - float(mirror["last_checkpoint_unix_s"]))
            pauses[int(mirror["sequence"])] = float(mirror["last_pause_ms"])
            await asyncio.sleep(0.2)
        os.kill(int(ready["qemu_pid"]), signal.SIGKILL)  # (first: see the e2e test)
        os.kill(int(ready["pid"]), signal.SIGKILL)
        killed = time.monotonic()
        killed_unix = time.time()
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    pong = asyncio.create_task(_until_pong(port_b))  # a client retrying all along
    restored = await asyncio.to_thread(_ferry, env_b, "vm", "restore", url, "--name",
                                       f"bench-dst-{run}", "-p", f"127.0.0.1:{port_b}:6379",
                                       "--detach")
    cli_s = time.monotonic() - killed
    restore_s = await pong - killed
    point = restored["restored_from"]
    record = load_record(store, Layout(root=f"vm-{run}/"), int(point["sequence"]))
    writer.targets = [("127.0.0.1", port_b)]
    before = writer.acknowledged_before(record.created_unix_s)
    lost = await writer.lost(before)
    await asyncio.to_thread(_ferry, env_b, "vm", "stop", f"bench-dst-{run}")
    return {"rpo_s": rpo, "pause_ms": list(pauses.values()), "restore_to_pong_s": restore_s,
            "restore_resume": restored["resume"], "restore_cli_s": cli_s,
            "resume_to_pong_s": resume_s, "lost_before_rpo": len(lost),
            "writes_before_rpo": len(before), "writes": writer.acknowledged_count,
            "rpo_at_kill_s": killed_unix - record.created_unix_s,
            "restored_sequence": record.sequence}


async def bench_mirror(runs: int, seconds: float, interval_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fbm-") as tmp, SeaweedFS() as s3:
        root = Path(tmp)
        signer = Signer(root / "signer")
        package = await asyncio.to_thread(signer.package, "redis")
        done = []
        try:
            for run in range(runs):
                done.append(await mirror_run(s3, signer, package, root, run, seconds,
                                             interval_s))
        finally:
            for sub in await asyncio.to_thread(lambda: list(root.iterdir())):
                paths = VMPaths(sub / "run", sub / "state")
                for pid in holder_pids(paths):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                await asyncio.sleep(1)
                await cleanup_leftovers(paths)
    rpo = [r for d in done for r in d["rpo_s"]]
    pauses = [p for d in done for p in d["pause_ms"]]
    restore = statistics.median(d["restore_to_pong_s"] for d in done)
    resume = statistics.median(d["resume_to_pong_s"] for d in done)
    return {
        "mirror_runs": runs, "mirror_s": seconds, "mirror_interval_s": interval_s,
        "mirror_rpo_s_p50": round(statistics.median(rpo), 3),
        "mirror_rpo_s_max": round(max(rpo), 3),
        "mirror_pause_ms_p50": round(statistics.median(pauses), 1),
        "mirror_pause_ms_max": round(max(pauses), 1),
        "restore_to_pong_s": round(restore, 3),
        "resume_to_pong_s": round(resume, 3),
        "restore_vs_resume_ratio": round(restore / resume, 2),
        "lost_before_rpo": sum(d["lost_before_rpo"] for d in done),
        "writes_before_rpo": [d["writes_before_rpo"] for d in done],
        "rpo_at_kill_s": [round(d["rpo_at_kill_s"], 3) for d in done],
        "restore_to_pong_s_each": [round(d["restore_to_pong_s"], 3) for d in done],
        "restore_holder_running_s_each": [d["restore_resume"]["running_s"] for d in done],
        "restore_cli_returned_s_each": [round(d["restore_cli_s"], 3) for d in done],
        "restore_holder_steps": {k: done[-1]["restore_resume"][k] for k in (
            "setup_s", "devices_s", "spawn_s", "load_s", "cont_s", "running_s", "forwards_s",
            "agent_s", "total_s")},
    }


async def bench(size_mib: int, runs: int) -> dict[str, Any]:
    size = size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="ferry-bench-s3-") as tmp, SeaweedFS() as s3:
        data_file = Path(tmp) / "data"
        fill(data_file, size)
        staging = Path(tmp)
        device: list[dict[str, float]] = []
        baseline: list[float] = []
        # SeaweedFS grows volumes for a bucket on its first writes: pay that before timing.
        await asyncio.to_thread(baseline_run, s3, BUCKET, data_file, -1)
        for run in range(runs):  # alternate which goes first
            fill(data_file, size)  # new content: nothing of it is in the bucket yet
            if run % 2:
                baseline.append(await asyncio.to_thread(baseline_run, s3, BUCKET, data_file,
                                                        run))
            device.append(await device_run(s3, BUCKET, data_file, size, run, staging))
            if not run % 2:
                baseline.append(await asyncio.to_thread(baseline_run, s3, BUCKET, data_file,
                                                        run))
    upload_s = statistics.median(d["upload_s"] for d in device)
    base_s = statistics.median(baseline)
    return {
        "size_mib": size_mib, "runs": runs,
        "object_size_mib": DEFAULT_OBJECT_SIZE_BYTES / MiB, "concurrency": DEFAULT_CONCURRENCY,
        "upload_mib_s": round(size_mib / upload_s, 1),
        "baseline_upload_mib_s": round(size_mib / base_s, 1),
        "upload_ratio": round(base_s / upload_s, 2),
        "dedup_checkpoint_s": round(statistics.median(d["dedup_checkpoint_s"]
                                                      for d in device), 3),
        "restore_read_mib_s": round(size_mib / statistics.median(d["restore_read_s"]
                                                                 for d in device), 1),
        "upload_s_each": [round(d["upload_s"], 3) for d in device],
        "baseline_s_each": [round(b, 3) for b in baseline],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mirror-runs", type=int, default=1,
                        help="mirrored Redis VMs killed and restored (0: skip)")
    parser.add_argument("--mirror-s", type=float, default=20.0,
                        help="seconds of write load while sampling the recovery point")
    parser.add_argument("--mirror-interval", type=float, default=2.0)
    parser.add_argument("--device-runs-only", action="store_true",
                        help="only the device checkpoint figures")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = asyncio.run(bench(args.size_mib, args.runs)) if args.runs > 0 else {}
    if args.mirror_runs > 0 and not args.device_runs_only:
        result.update(asyncio.run(bench_mirror(args.mirror_runs, args.mirror_s,
                                               args.mirror_interval)))
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        if "upload_mib_s" in result:
            print(f"checkpoint upload {result['upload_mib_s']} MiB/s, boto3 upload_file "
                  f"{result['baseline_upload_mib_s']} MiB/s (ratio {result['upload_ratio']}); "
                  f"dedup checkpoint {result['dedup_checkpoint_s']} s; restore read "
                  f"{result['restore_read_mib_s']} MiB/s")
        if "mirror_rpo_s_p50" in result:
            print(f"mirror: recovery point p50 {result['mirror_rpo_s_p50']} s, max "
                  f"{result['mirror_rpo_s_max']} s; pause p50 "
                  f"{result['mirror_pause_ms_p50']} ms; restore to PONG "
                  f"{result['restore_to_pong_s']} s (local resume "
                  f"{result['resume_to_pong_s']} s, ratio "
                  f"{result['restore_vs_resume_ratio']}); lost before the recovery point "
                  f"{result['lost_before_rpo']}")


if __name__ == "__main__":
    main()
