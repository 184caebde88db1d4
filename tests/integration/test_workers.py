"""``authz serve --workers 2``: real processes on loopback (a supervisor and its two workers), each stopped
by its PID; the ports are fixed free ports, as --workers refuses port 0."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from devstack.procs import Proc, free_port, http_get, wait_http_ok
from tests.support.catalogs import ORDERS_KEY, catalog_yaml, config_yaml
from tests.support.check_requests import check_request
from tests.support.http_polling import poll

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 15.0
GRACE = 2.0  # the config's graceful_shutdown_timeout
MAX_CHANNELS = 64  # connections opened until both workers have answered (the kernel hashes each one)
TENANT = "org~test"


@dataclass
class Fleet:
    proc: Proc
    config: Path
    api_port: int
    metrics_port: int
    http_port: int
    temp_dir: Path

    def metrics(self) -> str:
        status, body = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        assert status == 200
        return body.decode()

    def ready(self) -> int:
        return http_get(f"http://127.0.0.1:{self.metrics_port}/readyz")[0]

    def workers(self) -> dict[int, int]:
        """Worker index -> PID, from the supervisor's children's command lines."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError):
                continue
            if ppid == self.proc.pid and b"--worker" in argv:
                found[int(argv[argv.index(b"--worker") + 1].split(b"/")[0])] = int(entry.name)
        return found


def write_config(
    tmp_path: Path, api_port: int, metrics_port: int, name: str = "config.yaml", http_port: int | None = None
) -> Path:
    catalog = tmp_path / "catalog.yaml"
    if not catalog.exists():
        catalog.write_text(catalog_yaml())
    config = tmp_path / name
    text = config_yaml(str(catalog)).replace(
        'api_address: "127.0.0.1:0"', f'api_address: "127.0.0.1:{api_port}"'
    )
    metrics = f'metrics_address: "127.0.0.1:{metrics_port}"'
    if http_port is not None:  # the HTTP check port, shared like the gRPC one
        metrics += f'\n  http_authz_address: "127.0.0.1:{http_port}"'
    text = text.replace('metrics_address: "127.0.0.1:0"', metrics)
    config.write_text(text.replace(".temp", f".{name}.temp"))
    return config


def serve_argv(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "authz", "serve", "--config", str(config), *extra]


def start_fleet(tmp_path: Path, workers: int = 2) -> Fleet:
    api_port, metrics_port, http_port = free_port(), free_port(), free_port()
    config = write_config(tmp_path, api_port, metrics_port, http_port=http_port)
    proc = Proc("fleet", serve_argv(config, "--workers", str(workers)), tmp_path, cwd=REPO)
    try:
        wait_http_ok(f"http://127.0.0.1:{metrics_port}/readyz", START_TIMEOUT, proc)
    except BaseException:
        proc.stop()
        raise
    temp_dir = Path(f"{tmp_path}/catalog.yaml.config.yaml.temp")
    return Fleet(proc, config, api_port, metrics_port, http_port, temp_dir)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    running = start_fleet(tmp_path)
    yield running
    running.proc.stop(timeout=GRACE + 20)


def check(port: int, key: str | None) -> int:
    """One Check on a connection of its own (a local subchannel pool: no sharing between channels)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return int(stub.Check(check_request(key=key), timeout=5).status.code)


def by_worker(text: str, sample_name: str, **labels: str) -> dict[str, float]:
    """The values of ``sample_name`` (with ``labels``) summed per worker label."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and labels.items() <= sample.labels.items():
                worker = sample.labels["worker"]
                counts[worker] = counts.get(worker, 0.0) + sample.value
    return counts


def http_check(port: int, key: str) -> int:
    """One check over the HTTP check port (a new connection each time: urllib closes it)."""
    headers = {"Host": "orders-api", "x-api-key": key}
    return http_get(f"http://127.0.0.1:{port}/v1/orders/1", headers=headers)[0]


def spread(fleet: Fleet) -> dict[str, float]:
    """Checks without a key on new connections until both workers denied some; the per-worker denies."""
    for _ in range(MAX_CHANNELS):
        assert check(fleet.api_port, None) == grpc.StatusCode.UNAUTHENTICATED.value[0]
        counts = by_worker(fleet.metrics(), "auth_denied_total", reason="missing_credentials")
        if len(counts) == 2:
            return counts
    raise AssertionError(f"{MAX_CHANNELS} connections all reached one worker: {counts}")


def seed_orphan(temp_dir: Path) -> tuple[str, str]:
    """Files a third worker left (a run with --workers 3): one staged, one still open. Their names."""
    staging = temp_dir / "worker-2" / "analytics" / "staging" / TENANT
    temp = temp_dir / "worker-2" / "analytics" / "temp" / TENANT
    staging.mkdir(parents=True)
    temp.mkdir(parents=True)
    line = b'{"client_received_start_timestamp": 1}\n'
    staged, open_file = "1700000000-0a0b0c0d-2.gz", "1700000001-0e0f0a0b.gz"
    (staging / staged).write_bytes(gzip.compress(line * 2))
    (temp / open_file).write_bytes(gzip.compress(line * 3))
    return staged, open_file


def test_two_workers_share_the_port_merge_metrics_and_keep_analytics_apart(tmp_path):
    temp_dir = Path(f"{tmp_path}/catalog.yaml.config.yaml.temp")
    staged, open_file = seed_orphan(temp_dir)
    fleet = start_fleet(tmp_path)
    try:
        assert check(fleet.api_port, ORDERS_KEY) == 0
        for _ in range(MAX_CHANNELS):  # the HTTP check port is shared too
            assert http_check(fleet.http_port, ORDERS_KEY) == 200
            allowed = by_worker(fleet.metrics(), "auth_requests_seconds_count", code="200")
            if len(allowed) == 2:
                break
        assert set(allowed) == {"0", "1"}
        denied = spread(fleet)  # each deny is also an analytics record, in its worker's buffer
        text = fleet.metrics()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert text.count("# HELP auth_denied_total ") == 1
        assert text.count("# TYPE auth_requests_seconds histogram") == 1
        checks = by_worker(text, "auth_requests_seconds_count", code="401")
        assert checks == denied
        assert {s.labels["worker"]: s.value for s in families["worker_up"].samples} == {"0": 1.0, "1": 1.0}
        assert families["workers"].samples[0].value == 2.0
        ready = {s.labels["worker"] for s in families["ready"].samples if s.value == 1.0}
        assert ready == {"0", "1"}

        code = fleet.proc.stop(timeout=GRACE + 20)
        assert code == 0
    finally:
        fleet.proc.stop()
    # Each worker staged its own records in its own directory at shutdown; worker 0 adopted the orphan's.
    mine = sorted(p.name for p in (temp_dir / "analytics" / "staging" / TENANT).iterdir())
    theirs = list((temp_dir / "worker-1" / "analytics" / "staging" / TENANT).iterdir())
    assert theirs, "worker 1 staged nothing"
    assert staged in mine
    assert any(name.startswith(open_file[:-3] + "-3") for name in mine), mine  # salvaged: 3 records
    assert not (temp_dir / "worker-2").exists()


def test_readiness_follows_a_killed_worker_and_its_restart(fleet):
    pids = fleet.workers()
    assert sorted(pids) == [0, 1]
    os.kill(pids[1], signal.SIGKILL)
    poll(fleet.ready, lambda status: status == 503, "readyz 503 with a worker down", timeout=5)
    poll(fleet.ready, lambda status: status == 200, "readyz 200 after the restart", timeout=START_TIMEOUT)
    after = fleet.workers()
    assert after[0] == pids[0] and after[1] != pids[1]
    assert 'worker_restarts_total{worker="1"} 1.0' in fleet.metrics()
    assert http_get(f"http://127.0.0.1:{fleet.metrics_port}/livez")[0] == 200
    assert check(fleet.api_port, ORDERS_KEY) == 0


def test_sigterm_drains_every_worker_within_the_grace_period(fleet):
    pids = fleet.workers()
    started = time.monotonic()
    os.kill(fleet.proc.pid, signal.SIGTERM)
    poll(lambda: fleet.proc.returncode, lambda code: code is not None, "supervisor exit", timeout=GRACE + 5)
    assert fleet.proc.returncode == 0
    assert time.monotonic() - started < GRACE + 5
    for pid in pids.values():
        assert _gone(pid)


def test_workers_drain_when_the_supervisor_is_killed(fleet):
    pids = fleet.workers()
    os.kill(fleet.proc.pid, signal.SIGKILL)  # no forwarding: the workers see their stdin pipe close
    for pid in pids.values():
        poll(lambda pid=pid: _gone(pid), bool, f"worker {pid} exit", timeout=GRACE + 5)
    with pytest.raises(grpc.RpcError):
        check(fleet.api_port, ORDERS_KEY)


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_second_server_on_the_same_ports_fails_fast(fleet, tmp_path):
    other = write_config(tmp_path, fleet.api_port, free_port(), name="second.yaml")
    for extra in (("--workers", "2"), ()):  # another supervisor, and a single process
        done = subprocess.run(  # noqa: S603 - fixed argv
            serve_argv(other, *extra), cwd=REPO, capture_output=True, text=True, timeout=20, check=False
        )
        assert done.returncode == 1, done.stderr
        assert "global.api_address" in done.stderr
    assert fleet.ready() == 200
    assert check(fleet.api_port, ORDERS_KEY) == 0


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_a_bad_workers_value_exits_2(tmp_path, value):
    config = write_config(tmp_path, free_port(), free_port())
    env = {**os.environ, "AUTHZ_WORKERS": value}
    done = subprocess.run(  # noqa: S603 - fixed argv
        serve_argv(config), cwd=REPO, env=env, capture_output=True, text=True, timeout=20, check=False
    )
    assert done.returncode == 2
    assert "expected an integer from 1 to 64" in done.stderr and "AUTHZ_WORKERS" in done.stderr


def test_port_0_cannot_be_shared(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(catalog_yaml())
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(str(catalog)))
    done = subprocess.run(  # noqa: S603 - fixed argv
        serve_argv(config, "--workers", "2"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 2
    assert "global.api_address: port 0 cannot be shared by --workers" in done.stderr
