"""The pure parts of ``authz serve --workers N``: flag values, the merged exposition, analytics adoption."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from authz.analytics.adopt import adopt_orphans, worker_temp_dir
from authz.analytics.layout import Layout
from authz.errors import ListenError
from authz.metrics import new_metrics, new_supervisor_metrics
from authz.server.fleet import Fleet, merge, parse
from authz.workers import MAX_WORKERS, parse_role, worker_count


@pytest.mark.parametrize("value", ["0", "-1", str(MAX_WORKERS + 1), "2.5", "", "two"])
def test_worker_count_refuses_values_outside_1_to_max(value):
    with pytest.raises(ValueError, match=f"from 1 to {MAX_WORKERS}"):
        worker_count(value)


def test_worker_count_and_role():
    assert worker_count("1") == 1 and worker_count(str(MAX_WORKERS)) == MAX_WORKERS
    role = parse_role("1/2", "/run/w1.sock")
    assert (role.index, role.count, role.socket) == (1, 2, "/run/w1.sock")
    for bad in ("2/2", "-1/2", "1", "a/2"):
        with pytest.raises(ValueError):
            parse_role(bad, "/run/w.sock")
    with pytest.raises(ValueError):
        parse_role("0/2", "")


def exposition(denied: int, check_seconds: float) -> str:
    metrics = new_metrics()
    metrics.auth_denied.labels("org", "test", "401", "missing_credentials").inc(denied)
    metrics.auth_requests.labels("org", "test", "401").observe(check_seconds)
    metrics.ready.set(1)
    return generate_latest(metrics.registry).decode()


def test_merge_labels_every_sample_with_its_worker_and_keeps_one_help_per_family():
    supervisor = new_supervisor_metrics()
    fleet = Fleet(["w0.sock", "w1.sock"], supervisor, lambda: False)
    merged = merge([(0, parse(exposition(2, 0.0002))), (1, parse(exposition(5, 0.2)))])
    fleet._merged.families = merged  # what a scrape does between its fetch and generate_latest
    text = generate_latest(supervisor.registry).decode()

    assert text.count("# HELP auth_denied_total ") == 1
    assert text.count("# TYPE auth_requests_seconds histogram") == 1
    assert text.count("# HELP workers ") == 1
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    denied = {s.labels["worker"]: s.value for s in samples if s.name == "auth_denied_total"}
    assert denied == {"0": 2.0, "1": 5.0}
    buckets = {
        (s.labels["worker"], s.labels["le"]): s.value
        for s in samples
        if s.name == "auth_requests_seconds_bucket"
    }
    assert buckets[("0", "0.00025")] == 1.0 and buckets[("1", "0.00025")] == 0.0
    assert buckets[("1", "0.25")] == 1.0
    assert {s.labels["worker"] for s in samples if s.name == "ready"} == {"0", "1"}
    assert [s.value for s in samples if s.name == "workers"] == [2.0]


def test_parse_refuses_a_broken_exposition():
    with pytest.raises(ValueError):
        parse('auth_denied_total{org="org" 1\n')


LINE = b'{"client_received_start_timestamp": 1}\n'


def put(path: Path, lines: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(LINE * lines))


def test_worker_dirs_and_adoption_after_scaling_down(tmp_path):
    temp = str(tmp_path)
    assert worker_temp_dir(temp, 0) == temp
    assert worker_temp_dir(temp, 3) == str(tmp_path / "worker-3")
    put(tmp_path / "worker-1/analytics/staging/org~test/1700000000-00000001-2.gz", 2)  # a live worker's
    put(tmp_path / "worker-2/analytics/staging/org~test/1700000000-00000002-2.gz", 2)
    put(tmp_path / "worker-2/analytics/temp/org~prod/1700000000-00000003.gz", 1)
    put(tmp_path / "worker-3/analytics/quarantine/org~test/1700000000-00000004-1.gz", 1)

    assert adopt_orphans(temp, 2) == 3  # from 4 workers to 2: workers 2 and 3 are orphans

    root = tmp_path / "analytics"
    assert (root / "staging/org~test/1700000000-00000002-2.gz").exists()
    assert (root / "temp/org~prod/1700000000-00000003.gz").exists()  # salvaged by worker 0's recovery
    assert (root / "quarantine/org~test/1700000000-00000004-1.gz").exists()
    assert not (tmp_path / "worker-2").exists() and not (tmp_path / "worker-3").exists()
    assert (tmp_path / "worker-1/analytics/staging/org~test/1700000000-00000001-2.gz").exists()
    assert adopt_orphans(temp, 1) == 1  # one process again: worker 1's files too
    assert adopt_orphans(temp, 1) == 0


def test_adoption_skips_an_orphan_in_use_and_keeps_a_name_already_taken(tmp_path):
    put(tmp_path / "worker-1/analytics/staging/org~test/1700000000-00000001-2.gz", 2)
    put(tmp_path / "worker-2/analytics/staging/org~test/1700000000-00000002-2.gz", 2)
    put(tmp_path / "analytics/staging/org~test/1700000000-00000002-2.gz", 1)  # the same name, already ours
    busy = Layout(tmp_path / "worker-1")
    busy.lock()
    try:
        assert adopt_orphans(str(tmp_path), 1) == 0
    finally:
        busy.unlock()
    assert (tmp_path / "worker-1/analytics/staging/org~test/1700000000-00000001-2.gz").exists()
    assert (tmp_path / "worker-2/analytics/staging/org~test/1700000000-00000002-2.gz").exists()


def test_adoption_fails_when_worker_0s_layout_is_held(tmp_path):
    put(tmp_path / "worker-1/analytics/staging/org~test/1700000000-00000001-2.gz", 2)
    held = Layout(tmp_path)
    held.lock()
    try:
        with pytest.raises(ListenError, match="in use by another authz process"):
            adopt_orphans(str(tmp_path), 1)
    finally:
        held.unlock()
