"""What is benchmarked: shapes of real models, the losses, fastkd's backends and the peers.

Every implementation is a *builder*: ``builder(inputs, case) -> step`` where ``step()`` runs the
forward and returns a scalar loss (the harness calls ``.backward()`` on it for forward+backward).
A builder raises :class:`Missing` with the reason when its implementation cannot run here (a peer
not installed, a backend not in this version, CUDA needed): missing peers are reported as missing,
never silently dropped.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastkd
from fastkd.reference import kd_loss_reference, topk_kd_loss_reference

LOSSES = ("topk", "dense", "ce")


class Missing(Exception):
    """An implementation that cannot run here; the message says why."""


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: a model's head shape, a token count and the loss options."""

    model: str
    tokens: int
    dim: int
    vocab: int
    loss: str = "topk"
    divergence: str = "reverse_kl"
    tail: str = "bucket"
    topk: int = 64
    softcap: Optional[float] = None
    dtype: str = "bfloat16"

    @property
    def label(self) -> str:
        extra = f" softcap={self.softcap:g}" if self.softcap else ""
        return (f"{self.model} N={self.tokens} D={self.dim} V={self.vocab} {self.loss} "
                f"{self.divergence} K={self.topk} {self.tail}{extra} {self.dtype}")

    @property
    def gemm_flops(self) -> int:
        """The three GEMMs of any fused linear loss: logits, d hidden, d weight (6·N·D·V)."""
        return 6 * self.tokens * self.dim * self.vocab

    def with_(self, **changes) -> "Case":
        return replace(self, **changes)


# Head shapes of real models (DESIGN.md §6): (name, D, V, final-logit softcap).
MODELS = {
    "llama3-8b": (4096, 128256, None),
    "qwen2.5-1.5b": (1536, 151936, None),
    "qwen2.5-7b": (3584, 152064, None),
    "gemma2-2b": (2304, 256000, 30.0),
}


def gpu_cases(loss: str, divergence: str, tail: str, topk: int = 64) -> list[Case]:
    """Real-model shapes at 4k–32k tokens, bf16."""
    cases = []
    for model, (dim, vocab, softcap) in MODELS.items():
        for tokens in (4096, 8192, 16384, 32768):
            cases.append(Case(model, tokens, dim, vocab, loss, divergence, tail, topk, softcap, "bfloat16"))
    return cases


def cpu_cases(loss: str, divergence: str, tail: str, topk: int = 64) -> list[Case]:
    """Shapes a 2-core CPU runs in minutes: a token sweep at V=16384 and a vocabulary sweep at N=1024."""
    cases = [Case("cpu-small", tokens, 256, 16384, loss, divergence, tail, topk, None, "float32")
             for tokens in (256, 1024, 2048)]
    cases += [Case("cpu-small", 1024, 256, vocab, loss, divergence, tail, topk, None, "float32")
              for vocab in (4096, 32768)]
    cases.append(Case("cpu-softcap", 1024, 256, 16384, loss, divergence, tail, topk, 30.0, "float32"))
    return cases


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    """Random student/teacher tensors with the case's shapes (the teacher twice as wide)."""
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    n, d, v = case.tokens, case.dim, case.vocab
    hidden = randn(n, d).requires_grad_()
    weight = randn(v, d, scale=d**-0.5).requires_grad_()
    inputs = {"hidden": hidden, "weight": weight,
              "labels": torch.randint(0, v, (n,), generator=gen).to(device)}
    if case.loss == "topk":
        start = torch.randint(0, v, (n, 1), generator=gen)
        inputs["teacher_ids"] = ((start + torch.arange(case.topk) * max(1, v // case.topk)) % v).to(device)
        logits = torch.randn(n, case.topk + 1, generator=gen) * 2.0
        inputs["teacher_logprobs"] = torch.log_softmax(logits, dim=-1)[:, :case.topk].to(device)
    if case.loss == "dense":
        inputs["teacher_hidden"] = randn(n, 2 * d)
        inputs["teacher_weight"] = randn(v, 2 * d, scale=(2 * d) ** -0.5)
    return inputs


Builder = Callable[[dict, Case], Callable[[], torch.Tensor]]


def _fastkd(impl: str) -> Builder:
    def build(x: dict, case: Case):
        try:
            fastkd.resolve_impl(impl, x["hidden"].device, x["hidden"].dtype)
        except (NotImplementedError, RuntimeError, TypeError, ValueError) as error:
            raise Missing(str(error)) from None
        if case.loss == "topk":
            return lambda: fastkd.topk_kd_loss(
                x["hidden"], x["weight"], x["teacher_ids"], x["teacher_logprobs"],
                divergence=case.divergence, tail=case.tail, softcap=case.softcap, impl=impl)
        if case.loss == "dense":
            return lambda: fastkd.kd_loss(
                x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"],
                divergence=case.divergence, softcap=case.softcap, teacher_softcap=case.softcap, impl=impl)
        # CE only: the KD weight is 0, a top-k set of one id keeps the KD side negligible.
        ids = x["labels"].unsqueeze(1)
        logprobs = torch.full(ids.shape, -1.0, device=ids.device)
        return lambda: fastkd.topk_kd_loss(
            x["hidden"], x["weight"], ids, logprobs, labels=x["labels"], ce_weight=1.0,
            kd_weight=0.0, tail="renormalize", softcap=case.softcap, impl=impl)
    return build


def _naive(x: dict, case: Case):
    """fp32 logits of every row, log_softmax, autograd: what distillation code usually does."""
    if case.loss == "topk":
        return lambda: topk_kd_loss_reference(
            x["hidden"], x["weight"], x["teacher_ids"], x["teacher_logprobs"],
            divergence=case.divergence, tail=case.tail, softcap=case.softcap, compute_dtype=torch.float32)
    if case.loss == "dense":
        return lambda: kd_loss_reference(
            x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"],
            divergence=case.divergence, softcap=case.softcap, teacher_softcap=case.softcap,
            compute_dtype=torch.float32)

    def ce():
        logits = (x["hidden"] @ x["weight"].T).float()
        if case.softcap:
            logits = case.softcap * torch.tanh(logits / case.softcap)
        return F.cross_entropy(logits, x["labels"])
    return ce


def _liger(x: dict, case: Case):
    if case.loss != "dense":
        raise Missing("Liger-Kernel has no top-k or CE-only distillation loss to compare here")
    if case.divergence == "jsd" or case.softcap:
        raise Missing("compared for forward/reverse KL without softcap only")
    try:
        from liger_kernel.transformers import LigerFusedLinearJSDLoss
    except ImportError:
        raise Missing("liger-kernel is not installed (pip install liger-kernel)") from None
    if not x["hidden"].is_cuda:
        raise Missing("Liger-Kernel's Triton kernels need a CUDA device")
    # Liger's jsd_beta: 1 is reverse KL, 0 forward KL (its documentation).
    loss_fn = LigerFusedLinearJSDLoss(jsd_beta=1.0 if case.divergence == "reverse_kl" else 0.0)
    return lambda: loss_fn(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"])


def _torch_linear_ce(x: dict, case: Case):
    if case.loss != "ce" or case.softcap:
        raise Missing("F.linear_cross_entropy computes CE only, without softcap")
    if not hasattr(F, "linear_cross_entropy"):
        raise Missing(f"torch {torch.__version__} has no F.linear_cross_entropy")
    options = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None
    return lambda: F.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], options=options)


def _cut_cross_entropy(x: dict, case: Case):
    if case.loss != "ce":
        raise Missing("Cut Cross-Entropy computes CE only")
    try:
        cce = importlib.import_module("cut_cross_entropy")
    except ImportError:
        raise Missing("cut-cross-entropy is not installed") from None
    if not x["hidden"].is_cuda:
        raise Missing("Cut Cross-Entropy's kernels need a CUDA device")
    return lambda: cce.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], softcap=case.softcap)


def _trl(x: dict, case: Case):
    if case.loss != "dense":
        raise Missing("TRL's GKD divergence is a full-vocabulary loss")
    try:
        from trl import GKDTrainer
    except Exception as error:  # trl pulls many optional packages; any import failure means missing
        raise Missing(f"trl is not importable ({type(error).__name__})") from None
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}[case.divergence]

    def step():
        student = (x["hidden"] @ x["weight"].T).unsqueeze(0)
        teacher = (x["teacher_hidden"] @ x["teacher_weight"].T).unsqueeze(0)
        return GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta)
    return step


IMPLEMENTATIONS: dict[str, Builder] = {
    "fastkd-torch": _fastkd("torch"),
    "fastkd-triton": _fastkd("triton"),
    "fastkd-cuda": _fastkd("cuda"),
    "naive": _naive,
    "liger": _liger,
    "torch-linear-ce": _torch_linear_ce,
    "cut-cross-entropy": _cut_cross_entropy,
    "trl-gkd": _trl,
}


def gemm_floor(x: dict, case: Case) -> Callable[[], None]:
    """The three bare GEMMs of the case's shape in its dtype: logits, d hidden, d weight."""
    hidden, weight = x["hidden"].detach(), x["weight"].detach()
    logits = torch.empty(case.tokens, case.vocab, dtype=hidden.dtype, device=hidden.device)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.empty_like(weight)

    def step():
        torch.mm(hidden, weight.T, out=logits)
        torch.mm(logits, weight, out=grad_hidden)
        torch.mm(logits.T, hidden, out=grad_weight)
    return step
