"""The teacher HTTP client against misbehaving servers (issue #16 item 3), all on 127.0.0.1.

Each stand-in is a raw socket server that reads one request and then misbehaves in one way:
drips, floods, cuts the body, garbles the status line, answers HTML. Every test is bounded in
time; the client's back-off is shortened so retries cost milliseconds.
"""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

from fastkd.train import server as srv
from fastkd.train.server import ServerTeacher, TeacherServerError

K, V = 2, 10
IDS, MASK = torch.tensor([[1, 5, 6]]), torch.ones(1, 3, dtype=torch.int64)


def _good_body() -> bytes:
    entries = [None, {"5": {"logprob": -0.5, "rank": 1}, "2": {"logprob": -1.5, "rank": 2}},
               {"6": {"logprob": -0.25, "rank": 1}}]
    return json.dumps({"choices": [{"index": 0, "text": "", "prompt_logprobs": entries}]}).encode()


def _head(status: str = "200 OK", length=None, kind: str = "application/json") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Type: {kind}", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawServer:
    """Accepts connections on 127.0.0.1; for the n-th request (from 0) calls ``behave(conn, n)``."""

    def __init__(self, behave):
        self.behave, self.requests = behave, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/completions"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.requests += 1  # counted before the handler can answer: the client never sees it late
            threading.Thread(target=self._handle, args=(conn, self.requests - 1), daemon=True).start()

    def _handle(self, conn, n):
        conn.settimeout(5)
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            length = int([line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")][0])
            while len(body) < length:
                body += conn.recv(65536)
            self.behave(conn, n)
        except OSError:
            pass  # the client hung up (deadline, cap): expected in these tests
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setattr(srv, "_BACKOFF", (0.01, 0.02))
    servers = []

    def start(behave):
        servers.append(RawServer(behave))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _client(url, **kwargs) -> ServerTeacher:
    return ServerTeacher(url, None, K, V, **kwargs)


def test_a_well_behaved_server(serve):
    server = serve(lambda conn, n: conn.sendall(_head(length=len(_good_body())) + _good_body()))
    ids, logprobs = _client(server.url).topk_logprobs(IDS, MASK)
    assert ids[0].tolist() == [[5, 2], [6, -1], [-1, -1]] and logprobs[0, 0].tolist() == [-0.5, -1.5]


def _drip(where: str):
    def behave(conn, n):
        prefix = b"" if where == "head" else _head(length=1000)
        if prefix:
            conn.sendall(prefix)
        for _ in range(40):  # a byte every 0.5 s: 20 s if nobody stops it
            conn.sendall(b"H" if where == "head" else b" ")
            time.sleep(0.5)
    return behave


@pytest.mark.parametrize("where", ["head", "body"])
def test_a_dripping_server_is_cut_off_at_the_deadline(serve, where):
    server = serve(_drip(where))
    started = time.monotonic()
    with pytest.raises(TeacherServerError) as info:
        _client(server.url, timeout=2, retries=1).topk_logprobs(IDS, MASK)
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"a timeout=2 request took {elapsed:.1f} s"
    assert server.url in str(info.value) and "2 s deadline" in str(info.value)


def test_an_announced_answer_above_the_cap_is_refused_before_reading(serve):
    server = serve(lambda conn, n: conn.sendall(_head(length=256 << 20) + b"{" * 1000))
    with pytest.raises(ValueError, match=r"announced a 268435456-byte answer, more than the 4096-byte cap") as info:
        _client(server.url, max_response_bytes=4096).topk_logprobs(IDS, MASK)
    assert server.url in str(info.value) and server.requests == 1  # not retried


def test_an_endless_answer_is_cut_at_the_cap(serve):
    def flood(conn, n):
        conn.sendall(_head())  # no Content-Length: the body runs until the connection closes
        for _ in range(2000):
            conn.sendall(b"[" * 65536)  # 128 MiB if read whole

    server = serve(flood)
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"sent more than the 1048576-byte cap") as info:
        _client(server.url, max_response_bytes=1 << 20).topk_logprobs(IDS, MASK)
    assert server.url in str(info.value) and time.monotonic() - started < 10


def test_the_default_cap_scales_with_the_batch(serve):
    server = serve(lambda conn, n: conn.sendall(_head(length=10 << 20)))
    with pytest.raises(ValueError, match=r"more than the \d+-byte cap"):
        _client(server.url).topk_logprobs(IDS, MASK)  # 3 tokens x (K+1) entries: ~1 MiB allowed


def test_an_error_body_is_read_only_in_part(serve):
    def error(conn, n):
        conn.sendall(_head("500 Internal Server Error"))
        for _ in range(200):
            conn.sendall(b"e" * 65536)

    server = serve(error)
    with pytest.raises(TeacherServerError, match=r"after 2 attempts .*HTTP 500: e+") as info:
        _client(server.url, retries=2).topk_logprobs(IDS, MASK)
    assert len(str(info.value)) < 1000 and server.requests == 2


@pytest.mark.parametrize("case, words", [
    ("closed_mid_body", "closed mid-body after 12 of 200 bytes"),
    ("closed_before_answer", "status line"),
    ("bad_status_line", "status line"),
    ("html_200", "not JSON (text/html"),
    ("cut_json", "not JSON"),
    ("json_list", "JSON that is not an object"),
    ("http_503", "HTTP 503"),
    ("http_429", "HTTP 429"),
])
def test_transient_failures_are_retried_then_named(serve, case, words):
    def behave(conn, n):
        if case == "closed_mid_body":
            conn.sendall(_head(length=200) + b'{"choices": ')
        elif case == "bad_status_line":
            conn.sendall(b"HTXP/9.9 what\r\n\r\n")
        elif case == "html_200":
            page = b"<html><body>502 Bad Gateway (proxy)</body></html>"
            conn.sendall(_head(length=len(page), kind="text/html") + page)
        elif case == "cut_json":
            conn.sendall(_head(length=12) + b'{"choices": ')
        elif case == "json_list":
            conn.sendall(_head(length=2) + b"[]")
        elif case.startswith("http_"):
            conn.sendall(_head(f"{case[5:]} Busy", length=4) + b"busy")

    server = serve(behave)
    with pytest.raises(TeacherServerError) as info:
        _client(server.url, retries=3).topk_logprobs(IDS, MASK)
    assert server.url in str(info.value) and words in str(info.value), str(info.value)
    assert "after 3 attempts" in str(info.value) and server.requests == 3


def test_a_transient_failure_then_an_answer(serve):
    def flaky(conn, n):
        if n == 0:
            conn.sendall(_head("503 Service Unavailable", length=0))
        elif n == 1:
            conn.sendall(_head(length=100) + b"{")
        else:
            conn.sendall(_head(length=len(_good_body())) + _good_body())

    server = serve(flaky)
    ids, _ = _client(server.url, retries=3).topk_logprobs(IDS, MASK)
    assert server.requests == 3 and ids[0, 0].tolist() == [5, 2]


def test_no_server_at_all(serve):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    sock.close()  # nothing listens there
    with pytest.raises(TeacherServerError, match="ConnectionRefusedError") as info:
        _client(url, retries=2).topk_logprobs(IDS, MASK)
    assert url in str(info.value)


@pytest.mark.parametrize("answer, words", [
    ({"choices": []}, "answered 0 choices for 1 prompts"),
    ({"error": "x"}, "without a 'choices' list"),
    ({"choices": [{"index": 0, "prompt_logprobs": [None, {"5": 3.0}, {"6": -1.0}]}]}, "above 0"),
    ({"choices": [{"index": 0, "prompt_logprobs": [None, {"55": -1.0}, {"6": -1.0}]}]}, "outside [0, vocab_size=10)"),
    ({"choices": [{"index": 0, "prompt_logprobs": [None, {"5": -0.01, "6": -0.02}, {"6": -1.0}]}]}, "sum to"),
])
def test_answers_that_parse_but_are_wrong_name_the_url(serve, answer, words):
    body = json.dumps(answer).encode()
    server = serve(lambda conn, n: conn.sendall(_head(length=len(body)) + body))
    with pytest.raises(ValueError) as info:
        _client(server.url).topk_logprobs(IDS, MASK)
    assert server.url in str(info.value) and words in str(info.value), str(info.value)
    assert server.requests == 1


def test_a_refused_request_is_not_retried(serve):
    server = serve(lambda conn, n: conn.sendall(_head("400 Bad Request", length=22) + b'{"error": "max_logprobs"}'[:22]))
    with pytest.raises(ValueError, match="refused the request \\(HTTP 400\\)") as info:
        _client(server.url, retries=3).topk_logprobs(IDS, MASK)
    assert server.url in str(info.value) and server.requests == 1


@pytest.mark.parametrize("kwargs, words", [
    (dict(timeout=0), "timeout"), (dict(timeout=float("inf")), "timeout"), (dict(retries=0), "retries"),
    (dict(max_response_bytes=0), "max_response_bytes"),
])
def test_client_arguments_are_checked(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ServerTeacher("http://127.0.0.1:1/v1/completions", None, K, V, **kwargs)
    with pytest.raises(ValueError, match="names no host"):
        ServerTeacher("http:///v1/completions", None, K, V)


def server_fuzz_outcomes(count: int, seed: int) -> dict:
    """Random mutations of a well-formed answer, handed to the client's parser (no network):
    ``{"parsed": n, "error_naming_the_url": n, "other": [(case, repr), ...]}``."""
    import numpy as np
    from test_cache_untrusted import _mutate

    rng = np.random.default_rng(seed)
    url = "http://127.0.0.1:9/v1/completions"
    good = json.loads(_good_body())
    good["choices"][0].update(prompt_token_ids=[1, 5, 6], token_ids=[3], finish_reason="length")
    outcomes = {"parsed": 0, "error_naming_the_url": 0, "other": []}
    for case in range(count):
        answer = _mutate(good, rng)
        client = _client(url)
        client._post = lambda body, cap, answer=answer: answer
        try:
            client.topk_logprobs(IDS, MASK)
            outcomes["parsed"] += 1
        except ValueError as error:
            if url in str(error):
                outcomes["error_naming_the_url"] += 1
            else:
                outcomes["other"].append((case, repr(error)))
        except Exception as error:  # noqa: BLE001 - the point is to catch what is not a ValueError
            outcomes["other"].append((case, repr(error)))
    return outcomes


def test_fuzzed_answers_parse_or_name_the_url():
    outcomes = server_fuzz_outcomes(100, seed=0)
    assert not outcomes["other"], outcomes["other"][:5]
