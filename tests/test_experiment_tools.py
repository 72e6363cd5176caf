"""Experiment checks that need no Ray cluster: the --address probe against services that are not
a Ray GCS (an HTTP/1.1 server, a silent one, one that closes, one that only speaks HTTP/2, a gRPC
server without Ray's services) and against fake GCSs answering GetClusterId, and the
load-time check that a train/ or lr/ objective is reported by the configured (or a sampled)
algorithm. (`distsearch tensorboard` on S3 is tested in test_distributed.py, beside its fixture.)"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from distsearch.distributed.tuner import _probe
from distsearch.errors import UsageError

SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty HTTP/2 SETTINGS frame


@contextmanager
def tcp_server(handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """A TCP server on 127.0.0.1 calling `handle(conn)` for each connection; yields HOST:PORT."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop, conns = threading.Event(), []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conns.append(conn)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for c in conns:
            c.close()
        srv.close()


def _read_preface(conn: socket.socket) -> bytes:
    data = b""
    conn.settimeout(5)
    while len(data) < 24 + 9:
        chunk = conn.recv(64)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def http11_server() -> Iterator[str]:
    """http.server (HTTP/1.x only) on 127.0.0.1, as a dashboard or any web service answers."""

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_probe_refuses_an_http11_service_at_once(http11_server, scheme):
    t0 = time.monotonic()
    with pytest.raises(UsageError) as e:
        _probe(scheme + http11_server, timeout=5)
    msg = str(e.value)
    assert time.monotonic() - t0 < 3, msg
    assert len(msg.splitlines()) == 1 and f"--address: {http11_server} answers but is not a Ray" in msg
    assert "(it replied b'" in msg and "the dashboard 8265 is for distsearch submit" in msg
    assert ("GCS port is usually 6379" in msg) == (not scheme)


def test_probe_refuses_a_silent_service_after_its_timeout():
    with tcp_server(lambda conn: None) as addr:  # accepts, never answers
        t0 = time.monotonic()
        with pytest.raises(UsageError, match=r"answers but is not a Ray cluster \(GCS\) address \(no HTTP/2 reply"):
            _probe(addr, timeout=0.5)
        assert 0.4 < time.monotonic() - t0 < 3


def test_probe_refuses_a_service_that_closes():
    with tcp_server(lambda conn: (_read_preface(conn), conn.close())) as addr:
        with pytest.raises(UsageError, match=r"it closed the connection"):
            _probe(addr, timeout=2)


def test_probe_wants_more_than_http2_settings_from_a_gcs_and_skips_the_handshake_under_tls(monkeypatch):
    """A SETTINGS frame is all the ray:// check asks for; a GCS address must then answer the
    GetClusterId call, which this server (HTTP/2 preface and SETTINGS only) never does."""
    got: list[bytes] = []

    def h2(conn: socket.socket) -> None:
        got.append(_read_preface(conn))
        conn.sendall(SETTINGS[:4])  # in two pieces: the probe reads until it has the 9-byte header
        time.sleep(0.05)
        conn.sendall(SETTINGS[4:])

    with tcp_server(h2) as addr:
        _probe("ray://" + addr, timeout=2)
        t0 = time.monotonic()
        with pytest.raises(UsageError) as e:
            _probe(addr, timeout=1)
        assert 0.4 < time.monotonic() - t0 < 4
    assert got[0] == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SETTINGS
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"--address: {addr} answers gRPC but a Ray GCS call" in msg, msg
    assert "(no reply within" in msg, msg
    monkeypatch.setenv("RAY_USE_TLS", "1")  # a TLS cluster: the TCP connect is all that is checked
    with tcp_server(lambda conn: None) as addr:
        t0 = time.monotonic()
        _probe(addr, timeout=2)
        assert time.monotonic() - t0 < 1


@contextmanager
def grpc_server(handlers: dict[str, Callable] | None = None) -> Iterator[str]:
    """A grpcio server on 127.0.0.1 (grpcio comes with Ray) with `handlers` ({method: behaviour}) as
    unary calls on bytes; none: a gRPC server with no services at all. Yields HOST:PORT."""
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    class Generic(grpc.GenericRpcHandler):
        def service(self, details):  # None: UNIMPLEMENTED
            handle = (handlers or {}).get(details.method)
            return grpc.unary_unary_rpc_method_handler(handle) if handle else None

    srv = grpc.server(futures.ThreadPoolExecutor(2))
    srv.add_generic_rpc_handlers([Generic()])
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        srv.stop(None)


def test_probe_refuses_a_grpc_server_that_is_not_a_ray_gcs():
    """Any gRPC server (e.g. the Ray client port 10001 given without ray://) passes the HTTP/2
    check, and ray.init would then retry its GCS connection for ever: the GetClusterId call
    answers UNIMPLEMENTED, and the probe refuses at once."""
    with grpc_server() as addr:
        t0 = time.monotonic()
        with pytest.raises(UsageError) as e:
            _probe(addr, timeout=5)
        assert time.monotonic() - t0 < 3  # first call: Ray's token interceptor is imported
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"--address: {addr} answers gRPC but is not a Ray GCS" in msg, msg
    assert f"needs ray://{addr}" in msg and "GCS port is usually 6379" in msg, msg


GET_CLUSTER_ID = "/ray.rpc.NodeInfoGcsService/GetClusterId"


def _gcs_refusing_the_token(request, context):
    import grpc

    context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: Authentication token is missing or incorrect")


@pytest.mark.parametrize(
    "handle, refusal",
    [
        (lambda request, context: b"", None),  # an empty GetClusterIdReply
        (_gcs_refusing_the_token, "uses token authentication and refused this process (InvalidAuthToken"),
        (lambda request, context: time.sleep(2) or b"", "a Ray GCS call to it failed (no reply within"),
    ],
    ids=["answers", "wants-a-token", "too-slow"],
)
def test_probe_asks_the_gcs_for_its_cluster_id(handle, refusal):
    with grpc_server({GET_CLUSTER_ID: handle}) as addr:
        t0 = time.monotonic()
        if refusal is None:
            _probe(addr, timeout=1)
        else:
            with pytest.raises(UsageError) as e:
                _probe(addr, timeout=1)
            msg = str(e.value)
            assert len(msg.splitlines()) == 1 and refusal in msg and addr in msg, msg
        assert time.monotonic() - t0 < 2.5


# -- a train/ or lr/ objective must be reported by the configured (or a sampled) algorithm -------
def _experiment_raw(tune: dict, **over) -> dict:
    from conftest import tiny_raw

    return tiny_raw("unused", tune={"params": {"seed": {"choice": [0, 1]}}, **tune}, **over)


NSGA2 = {"search_alg": "optuna", "sampler": "nsga2", "modes": ["max", "max"]}
REFUSED = {
    "darts R_jac": (
        {"metric": "train/R_jac"},
        {},
        "tune: metric 'train/R_jac' is not reported: algorithm darts reports train/train_loss,",
    ),
    "dsrna jacobian R_cb (nsga2)": (
        {**NSGA2, "metrics": ["val/acc", "train/R_cb"]},
        {"algorithm.name": "dsrna"},
        "metrics entry 'train/R_cb' is not reported: algorithm dsrna (variant jacobian) reports",
    ),
    "darts lr/audience": ({"metric": "lr/audience"}, {}, "metric 'lr/audience' is not reported: algorithm darts"),
    "standard weight step's pass counts": (
        {"metric": "train/train_forward_passes"},
        {"weight_at.strategy": "standard"},
        "metric 'train/train_forward_passes' is not reported: algorithm darts reports",
    ),
    "no sampled algorithm": (
        {"metric": "train/R_jac", "params": {"algorithm.name": {"choice": ["darts", "lease"]}}},
        {},
        "is not reported by any sampled configuration: algorithm darts reports train/train_loss, train/train_acc, "
        "train/val_loss, train/val_acc, train/arch_nonfinite, lr/weights, lr/arch; algorithm lease reports",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_step_metric_another_algorithm_reports_is_refused_at_load(case, tmp_path, capsys):
    import yaml

    from distsearch.cli import main

    tune, over, needle = REFUSED[case]
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(_experiment_raw(tune, **over)))
    rc = main(["run", "--config", str(tmp_path / "exp.yaml"), "--storage", str(tmp_path / "runs"), "--name", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
    metric = (tune.get("metrics") or [tune["metric"]])[-1]
    assert f"{metric}," not in err.split(": ", 3)[-1] and not err.endswith(metric), err  # not among those listed
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "tune, over",
    [
        ({"metric": "train/R_jac", "params": {"algorithm.name": {"choice": ["darts", "dsrna"]}}}, {}),
        (
            {"metric": "train/R_cb", "params": {"algorithm.variant": {"choice": ["jacobian", "combined"]}}},
            {"algorithm.name": "dsrna"},
        ),
        ({"metric": "lr/audience"}, {"algorithm.name": "lease"}),
        ({"metric": "train/train_clean_acc"}, {"weight_at.strategy": "trades"}),
        (
            {
                "metric": "train/train_forward_passes",
                "params": {"weight_at.strategy": {"choice": ["standard", "fgsm"]}},
            },
            {},
        ),
        ({**NSGA2, "metrics": ["val/acc", "train/R"], "params": {"algorithm": {"choice": [{"name": "dsrna"}]}}}, {}),
    ],
)
def test_a_step_metric_the_configured_or_a_sampled_algorithm_reports_loads(tune, over):
    from distsearch.config_file import parse_config

    assert parse_config(_experiment_raw(tune, **over)).tune is not None
