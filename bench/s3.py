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

    .venv/bin/python bench/s3.py --size-mib 256 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig

from ferry.s3 import ObjectCache, S3Device
from ferry.s3.device import DEFAULT_CONCURRENCY
from ferry.s3.manifest import DEFAULT_OBJECT_SIZE_BYTES
from ferry.testing.s3 import SeaweedFS

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
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = asyncio.run(bench(args.size_mib, args.runs))
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        print(f"checkpoint upload {result['upload_mib_s']} MiB/s, boto3 upload_file "
              f"{result['baseline_upload_mib_s']} MiB/s (ratio {result['upload_ratio']}); "
              f"dedup checkpoint {result['dedup_checkpoint_s']} s; restore read "
              f"{result['restore_read_mib_s']} MiB/s")


if __name__ == "__main__":
    main()
