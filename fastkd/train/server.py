"""A teacher behind an inference server: top-k log-probs of every position from ``prompt_logprobs``.

``teacher_url`` points at an OpenAI-compatible completions endpoint that implements vLLM's
``prompt_logprobs`` (``vllm serve TEACHER --max-logprobs K``, then
``http://host:8000/v1/completions``). For each batch the trainer sends the unpadded token ids of
every sequence in one request (``max_tokens: 1``, ``prompt_logprobs: K``) and gets, per position,
the teacher's top-K ids and log-probs of the next token: the same fields an offline cache holds,
so the loss is :func:`fastkd.topk_kd_loss` with the tail bucket. A fleet of servers can score the
student's on-policy rollouts while the trainer's GPUs only train.

The server's log-probs are those of its untempered distribution (τ = 1), and the student's
tokenizer must be the teacher's (the ids are exchanged as they are).

A server is another process on another machine: the client bounds what it may cost.

- **Deadline.** ``timeout`` bounds each attempt as a whole (connecting, sending, waiting, reading
  every byte), not each socket read: a server that drips one byte every 0.5 s is cut off at the
  deadline (a watchdog shuts the socket down). The worst case of one call is ``retries ×
  (timeout + back-off)``.
- **Size cap.** Bodies are read in bounded pieces and refused once they pass ``max_response_bytes``
  (default: 512 bytes per returned entry, B·T·(K+1) entries, plus 1 MiB; a ``Content-Length``
  above it is refused before reading). Error bodies are read up to 64 KiB.
- **Retries** with exponential back-off (0.5 s, 1 s, 2 s, ... at most 8 s) on what may pass: no
  connection, a connection closed before or during the answer, a malformed status line, the
  deadline, HTTP 408/429/5xx, and a 200 whose body is not the expected JSON (an HTML page from a
  proxy, a cut JSON). Other 4xx answers mean the request is wrong and are not retried.
- **Errors** name the URL and what was wrong: :class:`TeacherServerError` (a ``RuntimeError``)
  when every attempt failed, ``ValueError`` for a refused request or an answer that parses but
  is not what vLLM sends (wrong number of choices, ids outside the vocabulary, log-probs > 0, ...).
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse
from typing import Optional

import torch
from torch import Tensor

from ..cache.importers import prompt_logprobs_topk

# bytes of one returned (id, log-prob) entry at most, for the default size cap: vLLM writes
# '"123": {"logprob": -1.2345678, "rank": 12, "decoded_token": "..."}', ~70 bytes for short tokens
_BYTES_PER_ENTRY = 512
_ERROR_BODY_CAP = 64 * 1024
_READ_PIECE = 1 << 16
_BACKOFF = (0.5, 8.0)  # first wait, longest wait (seconds)


class TeacherServerError(RuntimeError):
    """Every attempt to get an answer from a teacher server failed (the message names the URL)."""


class _Transient(Exception):
    """An attempt failed in a way a retry may cure (the message says how)."""


class ServerTeacher:
    """Scores token ids with a ``prompt_logprobs`` server.

    Args:
        url: the completions endpoint (``http://host:port/v1/completions``).
        model: the ``model`` field of the requests (the served model's name), or None.
        topk: K, the log-probs per position requested (vLLM caps it at its ``--max-logprobs``).
        vocab_size: ids must be in ``[0, vocab_size)`` (the student's head).
        timeout: seconds per attempt, the whole request (default 120).
        retries: attempts per batch (default 3; see the module docstring for what is retried).
        max_response_bytes: the largest answer read (default None: ``512 · B·T·(K+1) + 1 MiB``
            for a batch of B sequences of T tokens).
    """

    def __init__(self, url: str, model: Optional[str], topk: int, vocab_size: int, *, timeout: float = 120.0,
                 retries: int = 3, max_response_bytes: Optional[int] = None):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"teacher_url must be an http(s) URL of a completions endpoint, got {url!r}")
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"teacher_url {url!r} names no host")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
            raise ValueError(f"retries must be an int >= 1, got {retries!r}")
        if max_response_bytes is not None and (isinstance(max_response_bytes, bool)
                                               or not isinstance(max_response_bytes, int) or max_response_bytes < 1):
            raise ValueError(f"max_response_bytes must be None or an int >= 1, got {max_response_bytes!r}")
        self.url, self.model, self.topk, self.vocab_size = url, model, topk, vocab_size
        self.timeout, self.retries, self.max_response_bytes = float(timeout), retries, max_response_bytes
        self._parts = parts

    def topk_logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, T, K)`` teacher ids (``-1`` unused) and log-probs; entry t is the distribution
        of token t+1, as :class:`fastkd.cache.CacheCollator` lays out a cache's."""
        lengths = attention_mask.sum(1).tolist()
        prompts = [input_ids[b, :n].tolist() for b, n in enumerate(lengths)]
        body = {"prompt": prompts, "max_tokens": 1, "prompt_logprobs": self.topk, "temperature": 1.0}
        if self.model:
            body["model"] = self.model
        cap = self.max_response_bytes or _BYTES_PER_ENTRY * sum(lengths) * (self.topk + 1) + (1 << 20)
        answer = self._post(body, cap)
        choices = answer.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise ValueError(f"teacher_url: {self.url} answered without a 'choices' list of objects "
                             f"(keys {sorted(answer)[:8]})")
        choices = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c.get("index", 0), int) else 0)
        if len(choices) != len(prompts):
            raise ValueError(f"teacher_url: {self.url} answered {len(choices)} choices for {len(prompts)} prompts")
        batch, width = len(prompts), input_ids.shape[1]
        ids = torch.full((batch, width, self.topk), -1, dtype=torch.int64)
        logprobs = torch.zeros((batch, width, self.topk), dtype=torch.float32)
        for b, (prompt, choice) in enumerate(zip(prompts, choices)):
            rows_ids, rows_lp = prompt_logprobs_topk(choice.get("prompt_logprobs"), len(prompt), self.topk,
                                                     self.vocab_size, f"teacher_url {self.url}, prompt {b}")
            ids[b, :len(prompt)] = torch.tensor(rows_ids, dtype=torch.int64)
            logprobs[b, :len(prompt)] = torch.tensor(rows_lp, dtype=torch.float32)
        return ids.to(input_ids.device), logprobs.to(input_ids.device)

    # ------------------------------------------------------------------------------------------
    def _post(self, body: dict, cap: int) -> dict:
        """The JSON object answered to ``body``, with retries (module docstring)."""
        data = json.dumps(body).encode("utf-8")
        failures = []
        for attempt in range(self.retries):
            if attempt:
                time.sleep(min(_BACKOFF[0] * 2.0 ** (attempt - 1), _BACKOFF[1]))
            try:
                return self._attempt(data, cap)
            except _Transient as error:
                failures.append(str(error))
        raise TeacherServerError(f"teacher_url: no answer from {self.url} after {self.retries} attempts "
                                 f"(each limited to {self.timeout:g} s): {'; '.join(failures)}")

    def _attempt(self, data: bytes, cap: int) -> dict:
        parts = self._parts
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = kind(parts.hostname, parts.port, timeout=self.timeout)
        expired = threading.Event()
        opened = []  # the socket: the connection forgets it once a "Connection: close" answer starts

        def expire():  # the deadline: unblock whatever read or write is waiting
            expired.set()
            for sock in opened + [connection.sock]:
                if sock is None:
                    continue
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(self.timeout, expire)
        watchdog.daemon = True
        watchdog.start()
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            connection.connect()  # bounded by the socket timeout, which is the deadline
            opened.append(connection.sock)
            connection.request("POST", path, body=data, headers={"Content-Type": "application/json",
                                                                 "Accept": "application/json"})
            response = connection.getresponse()
            status = response.status
            if status != 200:
                detail = self._read(response, _ERROR_BODY_CAP, expired, truncate=True)
                detail = detail.decode("utf-8", errors="replace")[:300]
                if status in (408, 429) or status >= 500:
                    raise _Transient(f"HTTP {status}: {detail}")
                raise ValueError(f"teacher_url: {self.url} refused the request (HTTP {status}): {detail}")
            raw = self._read(response, cap, expired)
        except (_Transient, ValueError):
            raise
        except http.client.BadStatusLine as error:  # RemoteDisconnected is one: nothing came back
            raise _Transient(self._cause(expired, f"a malformed or missing status line ({error!r})")) from None
        except http.client.IncompleteRead as error:
            raise _Transient(self._cause(expired, f"the connection closed mid-body after {len(error.partial)} "
                                                  f"bytes")) from None
        except (OSError, http.client.HTTPException) as error:
            raise _Transient(self._cause(expired, f"{type(error).__name__}: {error}")) from None
        finally:
            watchdog.cancel()
            connection.close()
        try:
            answer = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            kind = response.getheader("Content-Type", "no Content-Type")
            preview = raw[:120].decode("utf-8", errors="replace")
            raise _Transient(f"HTTP 200 with a body that is not JSON ({kind}, {len(raw)} bytes: {preview!r})") from None
        if not isinstance(answer, dict):
            raise _Transient(f"HTTP 200 with JSON that is not an object (a {type(answer).__name__})")
        return answer

    def _read(self, response, cap: int, expired: threading.Event, truncate: bool = False) -> bytes:
        """The body, read in pieces of at most 64 KiB: at most ``cap`` bytes (``truncate``: the
        first ``cap``; else more is an error), never past the deadline."""
        length = response.getheader("Content-Length")
        if not truncate and length is not None and length.isdigit() and int(length) > cap:
            raise ValueError(f"teacher_url: {self.url} announced a {int(length)}-byte answer, more than the "
                             f"{cap}-byte cap (max_response_bytes)")
        pieces, size = [], 0
        while True:
            piece = response.read1(_READ_PIECE)
            if not piece:
                if expired.is_set():
                    raise _Transient(self._cause(expired, ""))
                if not truncate and length is not None and length.isdigit() and size < int(length):
                    raise _Transient(f"the connection closed mid-body after {size} of {int(length)} bytes")
                break
            pieces.append(piece)
            size += len(piece)
            if size > cap:
                if truncate:
                    break
                raise ValueError(f"teacher_url: {self.url} sent more than the {cap}-byte cap "
                                 "(max_response_bytes); refusing to read the rest")
        return b"".join(pieces)[:cap]

    def _cause(self, expired: threading.Event, what: str) -> str:
        if expired.is_set():
            return f"no complete answer within the {self.timeout:g} s deadline"
        return what
