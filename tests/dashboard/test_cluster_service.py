"""The dashboard's cluster setting (dashboard.services.cluster): what the sidebar says when it is
unset, malformed, unreachable, connected or gone. A real 2-worker cluster behind the dashboard is
tests/e2e/test_cluster_e2e.py."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from core.backend import ClusterSpec
from dashboard.services import cluster as service


def test_unset_computes_in_process_without_a_line():
    state = service.connect_from({})
    assert state == service.ServerCluster()
    assert service.cluster_line(state) == ("", False)
    assert service.connect_from({"INFLUENCE_CLUSTER": "  "}).cluster is None


def test_a_malformed_setting_is_named_and_the_server_computes_in_process():
    state = service.connect_from({"INFLUENCE_CLUSTER": "udp://nowhere"})
    assert state.cluster is None and state.setting == ""
    assert "INFLUENCE_CLUSTER" in state.error and "udp://nowhere" in state.error
    line, problem = service.cluster_line(state)
    assert problem and line.startswith("Computing in-process instead of on the cluster.")


def test_an_unreachable_scheduler_is_named_and_can_be_retried():
    pytest.importorskip("distributed")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state = service.connect_from({"INFLUENCE_CLUSTER": f"tcp://127.0.0.1:{port}"}, timeout=2)
    assert state.cluster is None and state.setting == f"tcp://127.0.0.1:{port}"
    assert f"INFLUENCE_CLUSTER=tcp://127.0.0.1:{port}" in state.error
    assert "Could not reach the scheduler" in state.error
    assert service.cluster_line(state)[1]


class _Client:
    def __init__(self, workers: dict | None) -> None:
        self.workers = workers
        self.scheduler = SimpleNamespace(address="tcp://10.0.0.5:8786")
        self.status = "running"

    def scheduler_info(self, n_workers: int = 5) -> dict:
        if self.workers is None:
            raise OSError("Timed out trying to connect to tcp://10.0.0.5:8786")
        return {"address": "tcp://10.0.0.5:8786", "workers": self.workers}


def _connected(workers: dict | None) -> service.ServerCluster:
    service._info.clear()  # keyed by the connection's id, which a new fake may reuse
    spec = ClusterSpec.parse("tcp://10.0.0.5:8786", source="test")
    from core.backend.runner import DaskRunner

    client = _Client(workers)
    fake = SimpleNamespace(
        spec=spec, client=client, runner=DaskRunner(client), _cuda={"tcp://10.0.0.7:1": True}
    )
    return service.ServerCluster("tcp://10.0.0.5:8786", fake)


def test_a_connected_cluster_shows_its_workers_and_memory():
    pytest.importorskip("distributed")
    workers = {
        "tcp://10.0.0.6:1": {"nthreads": 4, "memory_limit": 16 * 2**30},
        "tcp://10.0.0.7:1": {"nthreads": 8, "memory_limit": 32 * 2**30},
    }
    line, problem = service.cluster_line(_connected(workers))
    assert not problem
    assert line == (
        "Computed on a Dask cluster tcp://10.0.0.5:8786: 2 workers, 1 with a GPU, 12 threads, "
        "48.0 GiB memory (tcp://10.0.0.5:8786)."
    )


def test_a_scheduler_that_went_away_is_a_warning_not_an_exception():
    pytest.importorskip("distributed")
    line, problem = service.cluster_line(_connected(None))
    assert problem and "does not answer" in line and "OSError: Timed out" in line
    # A client that knows it lost the scheduler is not asked (each ask could wait its timeout):
    # core's runner refuses it, and its message is the line's.
    state = _connected({})
    state.cluster.client.status = "connecting"
    state.cluster.client.scheduler_info = None  # asking would fail here
    line, problem = service.cluster_line(state)
    assert problem and line.endswith(
        "Asking the scheduler about its workers: the Dask scheduler tcp://10.0.0.5:8786 is not "
        "reachable (the client is connecting). Start it again, then connect again (the "
        "dashboard's sidebar has a button for it; the command line connects on every run)."
    )


def test_connecting_again_closes_the_connection_and_drops_the_explainers_built_on_it(monkeypatch):
    from dashboard.services import background
    from dashboard.services.background import InProcess, Preparation, Preparations
    from dashboard.services.settings import DEMO_SPEC, Settings

    closed: list[str] = []
    old = SimpleNamespace(close=lambda: closed.append("closed"))
    jobs = Preparations()
    on_cluster = Settings(dataset=DEMO_SPEC, classes=(0, 6)).engine
    here = Settings(dataset=DEMO_SPEC, classes=(0, 1)).engine
    for key, where in ((on_cluster, old), (InProcess(on_cluster), None), (here, None)):
        job = jobs.get(
            key, lambda where=where: Preparation(lambda _: SimpleNamespace(cluster=where))
        )
        assert job.wait(5)

    class Cached:
        cleared = False

        def __call__(self) -> service.ServerCluster:
            return service.ServerCluster("tcp://10.0.0.5:8786", old)

        def clear(self) -> None:
            Cached.cleared = True

    monkeypatch.setattr(service, "server_cluster", Cached())
    monkeypatch.setattr(background, "preparations", lambda: jobs)
    service.reconnect()
    assert Cached.cleared and closed == ["closed"]
    # The cluster's explainer is gone (prepared again on the new connection); the in-process
    # ones stay.
    assert jobs.peek(on_cluster) is None
    assert jobs.peek(InProcess(on_cluster)) is not None and jobs.peek(here) is not None


def test_a_cluster_without_workers_is_a_warning():
    pytest.importorskip("distributed")
    line, problem = service.cluster_line(_connected({}))
    assert problem and "tcp://10.0.0.5:8786 (tcp://10.0.0.5:8786) has no workers now" in line
