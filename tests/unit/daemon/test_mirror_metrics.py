"""The daemon's /metrics carry a mirrored VM's recovery point."""

from __future__ import annotations

import time

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ferry.daemon.metrics import Metrics


def _samples(metrics: Metrics, name: str) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {s.labels["vm"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def test_recovery_point_is_the_age_of_the_last_checkpoint_at_scrape_time() -> None:
    now = time.time()
    vms = [
        {"vm_id": "m1", "status": "running", "memory_bytes": 1, "started_at": now,
         "mirror": {"last_checkpoint_unix_s": now - 5.0, "started_unix_s": now - 60.0,
                    "failures": 2, "recovery_point_s": 0.1}},
        {"vm_id": "m2", "status": "running", "memory_bytes": 1, "started_at": now,
         "mirror": {"last_checkpoint_unix_s": None, "started_unix_s": now - 9.0,
                    "failures": 0, "recovery_point_s": 0.1}},
        {"vm_id": "plain", "status": "running", "memory_bytes": 1, "started_at": now},
    ]
    metrics = Metrics(lambda: vms, lambda: 0)
    rpo = _samples(metrics, "ferry_vm_mirror_recovery_point_seconds")
    assert set(rpo) == {"m1", "m2"}  # a VM without a mirror has none
    assert 5.0 <= rpo["m1"] < 6.0  # from the checkpoint's time, not the polled age
    assert 9.0 <= rpo["m2"] < 10.0  # no checkpoint yet: since the mirror started
    assert _samples(metrics, "ferry_vm_mirror_failures_total") == {"m1": 2.0, "m2": 0.0}
