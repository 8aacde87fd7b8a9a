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
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Optional

import torch
from torch import Tensor

from ..cache.importers import prompt_logprobs_topk


class ServerTeacher:
    """Scores token ids with a ``prompt_logprobs`` server.

    Args:
        url: the completions endpoint (``http://host:port/v1/completions``).
        model: the ``model`` field of the requests (the served model's name), or None.
        topk: K, the log-probs per position requested (vLLM caps it at its ``--max-logprobs``).
        vocab_size: ids must be in ``[0, vocab_size)`` (the student's head).
        timeout: seconds per request.
        retries: attempts per batch on connection errors and 5xx answers (with back-off) before
            giving up with an error naming the URL.
    """

    def __init__(self, url: str, model: Optional[str], topk: int, vocab_size: int, *, timeout: float = 120.0,
                 retries: int = 3):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"teacher_url must be an http(s) URL of a completions endpoint, got {url!r}")
        self.url, self.model, self.topk, self.vocab_size = url, model, topk, vocab_size
        self.timeout, self.retries = timeout, retries

    def topk_logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, T, K)`` teacher ids (``-1`` unused) and log-probs; entry t is the distribution
        of token t+1, as :class:`fastkd.cache.CacheCollator` lays out a cache's."""
        lengths = attention_mask.sum(1).tolist()
        prompts = [input_ids[b, :n].tolist() for b, n in enumerate(lengths)]
        body = {"prompt": prompts, "max_tokens": 1, "prompt_logprobs": self.topk, "temperature": 1.0}
        if self.model:
            body["model"] = self.model
        choices = sorted(self._post(body).get("choices") or [], key=lambda c: c.get("index", 0))
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

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        error: Optional[Exception] = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(min(2.0 ** attempt * 0.25, 5.0))
            request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as http_error:
                detail = http_error.read().decode("utf-8", errors="replace")[:300]
                if http_error.code < 500:  # the request is wrong: retrying will not help
                    raise ValueError(f"teacher_url: {self.url} refused the request (HTTP {http_error.code}): "
                                     f"{detail}") from None
                error = RuntimeError(f"HTTP {http_error.code}: {detail}")
            except (urllib.error.URLError, TimeoutError, ConnectionError) as network_error:
                error = network_error
        raise RuntimeError(f"teacher_url: no answer from {self.url} after {self.retries} attempts ({error})")
