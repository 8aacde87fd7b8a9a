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
from fastkd import divergences as dv

LOSSES = ("topk", "dense", "ce")


class Missing(Exception):
    """An implementation that cannot run here; the message says why.

    ``applies=False``: the implementation has no such loss (a CE-only peer on a KD case): the
    runner leaves it out of that table and lists it once at the end. ``applies=True`` (default):
    it could run but this environment lacks something (a package, CUDA): the runner says so once.
    """

    def __init__(self, reason: str, applies: bool = True):
        super().__init__(reason)
        self.applies = applies


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
    def teacher_dim(self) -> Optional[int]:
        """The online teacher's hidden width (the dense loss: twice the student's), else None."""
        return 2 * self.dim if self.loss == "dense" else None

    @property
    def gemm_flops(self) -> int:
        """The GEMM floor's FLOPs: the three GEMMs of any fused linear loss (logits, d hidden,
        d weight: 6·N·D·V), plus the online teacher's logits GEMM (2·N·D_t·V) for the dense loss,
        as issue #14 item 7 and the cost model (``bench.model.Shape.floor_flops``) count it."""
        teacher = 2 * self.tokens * self.teacher_dim * self.vocab if self.teacher_dim else 0
        return 6 * self.tokens * self.dim * self.vocab + teacher

    def with_(self, **changes) -> "Case":
        return replace(self, **changes)


# Head shapes of real models (DESIGN.md §6): (name, D, V, final-logit softcap).
MODELS = {
    "llama3-8b": (4096, 128256, None),
    "qwen2.5-1.5b": (1536, 151936, None),
    "qwen2.5-7b": (3584, 152064, None),
    "gemma2-2b": (2304, 256000, 30.0),
    # Liger's own fused-linear-JSD benchmark: student hidden 2048 (its teacher 4096 = 2 x D, as
    # every dense case here), V 128256; Liger publishes 60.7 ms fwd+bwd at 8192 tokens on an H100.
    "liger-jsd": (2048, 128256, None),
}


def gpu_cases(loss: str, divergence: str, tail: str, topk: int = 64) -> list[Case]:
    """Real-model shapes at 4k–32k tokens, bf16 (Liger's JSD shape for the dense loss only)."""
    cases = []
    for model, (dim, vocab, softcap) in MODELS.items():
        if model == "liger-jsd" and loss != "dense":
            continue
        for tokens in (4096, 8192, 16384, 32768):
            cases.append(Case(model, tokens, dim, vocab, loss, divergence, tail, topk, softcap, "bfloat16"))
    return cases


def main_gpu_cases(loss: str, divergence: str, tail: str, topk: int = 64) -> list[Case]:
    """The shapes of issue #14 item 7, N = 8192, bf16: what ``bench/gpu_check.sh`` times."""
    models = ("liger-jsd", "llama3-8b") if loss == "dense" else ("llama3-8b", "qwen2.5-1.5b", "gemma2-2b")
    return [Case(model, 8192, MODELS[model][0], MODELS[model][1], loss, divergence, tail, topk,
                 MODELS[model][2], "bfloat16") for model in models]


def cpu_cases(loss: str, divergence: str, tail: str, topk: int = 64) -> list[Case]:
    """Shapes a loaded 2-core CPU runs in minutes: issue #14 item 8's (N 2048, D 512, V 32768) and a
    smaller one with the Gemma-style softcap."""
    return [Case(model, tokens, dim, vocab, loss, divergence, tail, topk, cap, "float32")
            for model, (tokens, dim, vocab, cap) in CPU_MODELS.items()]


CPU_MODELS = {"cpu-d512": (2048, 512, 32768, None), "cpu-softcap": (1024, 256, 16384, 30.0)}


SETS = {"cpu": cpu_cases, "gpu": gpu_cases, "gpu-main": main_gpu_cases}


# Entropies the benchmark inputs are calibrated to (mean over rows, nats, at temperature 1): a
# student that is fairly sure of its next token and a teacher that is surer. Uniform random
# logits (entropy ≈ log V ≈ 11.8 nats at V = 128k) would make any gradient filter or sparsity
# trick look free; trained models' distributions are peaked and heavy-tailed.
STUDENT_ENTROPY = 2.5
TEACHER_ENTROPY = 1.5
ZIPF_EXPONENT = 1.1


def _calibrated_scale(logits: torch.Tensor, entropy: float, softcap: Optional[float] = None) -> float:
    """The smallest factor ``s`` for which ``softmax(softcap(s · logits))`` has mean entropy
    ``entropy`` (on a few rows of float32 logits)."""
    def mean_entropy(scale: float) -> float:
        z = logits * scale
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        lse = torch.logsumexp(z, dim=-1)
        return (lse - (torch.softmax(z, dim=-1) * z).sum(-1)).mean().item()

    # Entropy falls as s grows until a softcap saturates the logits; scan up from small scales to
    # the first one below the target, then bisect between it and the one before.
    grid = [10 ** (k / 4) for k in range(-8, 13)]
    high = next((g for g in grid if mean_entropy(g) <= entropy), grid[-1])
    low = grid[max(0, grid.index(high) - 1)]
    for _ in range(14):
        mid = (low * high) ** 0.5
        low, high = (mid, high) if mean_entropy(mid) > entropy else (low, mid)
    return (low * high) ** 0.5


def _mean_entropy(logits: torch.Tensor) -> float:
    return (torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)).mean().item()


def _head(gen: torch.Generator, vocab: int, dim: int, frequency: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An LM head as training leaves one: random rows (norm ~1) orthogonal to a shared direction
    ``u``, plus ``u`` times the token's log-frequency, so that ``h·W_v`` carries a Zipf prior."""
    u = torch.randn(dim, generator=gen, device=frequency.device)
    u /= u.norm()
    rows = torch.randn(vocab, dim, generator=gen, device=frequency.device) / dim**0.5
    rows -= (rows @ u).unsqueeze(1) * u
    return rows + frequency.unsqueeze(1) * u, u


def _hidden(gen: torch.Generator, weight: torch.Tensor, u: torch.Tensor, targets: torch.Tensor,
            noise: float) -> torch.Tensor:
    """Hidden states pointing at each row's target token with a confidence drawn per row
    (uniform in [2, 8] logits above the prior), along ``u`` (the frequency prior), plus noise."""
    n, dim = targets.shape[0], weight.shape[1]
    rows = weight[targets]
    rows = rows - (rows @ u).unsqueeze(1) * u
    confidence = 2.0 + 6.0 * torch.rand(n, 1, generator=gen, device=weight.device)
    noise = torch.randn(n, dim, generator=gen, device=weight.device) * noise / dim**0.5
    return rows / rows.norm(dim=1, keepdim=True) * confidence + u + noise


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    """Student (and teacher) tensors of the case's shape with peaked, heavy-tailed distributions.

    Each row has a target token drawn from a Zipf law (exponent ``ZIPF_EXPONENT``) over a random
    frequency ranking of the vocabulary; the head's rows share a log-frequency direction, as a
    trained head's do; hidden states point at their row's target with a per-row confidence (so
    rows range from near-certain to spread out), then are scaled so the mean entropy of the student's softmax is ``STUDENT_ENTROPY`` nats (the teacher's
    ``TEACHER_ENTROPY``). The teacher (twice as wide for the online losses, the student's own
    head for the offline top-k cache) agrees with the student on the target of about 3 rows in 4.
    Offline top-k ids and log-probs are the teacher's real top-K (exact full-softmax log-probs).
    ``inputs["realism"]`` records the entropies and the teacher's top-K mass as measured.
    """
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)   # built where it runs: fast on a GPU
    n, d, v = case.tokens, case.dim, case.vocab
    rank = torch.randperm(v, generator=gen, device=device)                      # token v has frequency rank[v]
    frequency = -ZIPF_EXPONENT * torch.log1p(rank.float())
    zipf = torch.exp(frequency)
    targets = torch.multinomial(zipf / zipf.sum(), n, replacement=True, generator=gen)
    weight, u = _head(gen, v, d, frequency / 2.0)
    hidden = _hidden(gen, weight, u, targets, noise=2.0)
    probe = slice(0, min(n, 256))
    hidden *= _calibrated_scale(hidden[probe] @ weight.T, STUDENT_ENTROPY, case.softcap)

    def put(x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        x = x.to(device=device, dtype=dtype)
        return x.requires_grad_() if grad else x

    # The teacher agrees on the target of ~3 rows in 4.
    disagree = torch.rand(n, generator=gen, device=device) < 0.25
    teacher_targets = torch.where(disagree, torch.multinomial(zipf / zipf.sum(), n, replacement=True,
                                                              generator=gen), targets)
    inputs = {"labels": targets}
    realism = {"student_entropy": _mean_entropy(dv.softcap(hidden[probe] @ weight.T, case.softcap)),
               "zipf_exponent": ZIPF_EXPONENT}
    if case.loss == "dense":
        teacher_weight, teacher_u = _head(gen, v, 2 * d, frequency / 2.0)
        teacher_hidden = _hidden(gen, teacher_weight, teacher_u, teacher_targets, noise=2.0)
        teacher_hidden *= _calibrated_scale(teacher_hidden[probe] @ teacher_weight.T, TEACHER_ENTROPY, case.softcap)
        inputs.update(teacher_hidden=put(teacher_hidden), teacher_weight=put(teacher_weight))
        realism["teacher_entropy"] = _mean_entropy(dv.softcap(teacher_hidden[probe] @ teacher_weight.T, case.softcap))
    if case.loss == "topk":
        teacher_hidden = _hidden(gen, weight, u, teacher_targets, noise=2.0)
        teacher_hidden *= _calibrated_scale(teacher_hidden[probe] @ weight.T, TEACHER_ENTROPY, case.softcap)
        ids, logprobs = _teacher_topk(put(teacher_hidden), put(weight), case.topk, case.softcap)
        inputs.update(teacher_ids=ids, teacher_logprobs=logprobs)
        realism["teacher_entropy"] = _mean_entropy(dv.softcap(teacher_hidden[probe] @ weight.T, case.softcap))
        realism["teacher_topk_mass"] = logprobs.double().exp().sum(-1).mean().item()
    inputs.update(hidden=put(hidden, grad=True), weight=put(weight, grad=True), realism=realism)
    return inputs


def _teacher_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, softcap) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-K ids and full-softmax log-probs, computed in row chunks in float32."""
    ids, logprobs = [], []
    step = max(1, 2**28 // (weight.shape[0] * 4))
    w = weight.float()
    for start in range(0, hidden.shape[0], step):
        logits = hidden[start:start + step].float() @ w.T
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        values, top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        ids.append(top)
        logprobs.append(values)
    return torch.cat(ids), torch.cat(logprobs)


Builder = Callable[[dict, Case], Callable[[], torch.Tensor]]
BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}   # GKD/TRL/Liger convention (DESIGN.md §1)


def _fastkd(impl: str) -> Builder:
    def build(x: dict, case: Case):
        try:
            resolved = fastkd.resolve_impl(impl, x["hidden"].device, x["hidden"].dtype)
        except (NotImplementedError, RuntimeError, TypeError, ValueError) as error:
            raise Missing(str(error)) from None
        if impl == "auto" and f"fastkd-{resolved}" in IMPLEMENTATIONS:
            raise Missing(f"impl='auto' is impl='{resolved}' here (the fastkd-{resolved} row)", applies=False)
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


def naive_loss(x: dict, case: Case, logits_dtype: Optional[torch.dtype], rows: slice = slice(None),
               compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The loss as distillation code usually writes it, over ``rows``, summed (divide by N for the
    mean): logits of every row by one GEMM in ``logits_dtype`` (None: the input dtype, as a
    Hugging Face model's ``lm_head`` computes them), then ``.float()`` (``compute_dtype``), softcap,
    ``log_softmax`` and the divergence of DESIGN.md §1, autograd for the gradients. With float64
    for both it is the benchmark's reference."""
    def logits(hidden, weight, cap):
        if logits_dtype is not None:
            hidden, weight = hidden.to(logits_dtype), weight.to(logits_dtype)
        return dv.softcap((hidden @ weight.T).to(compute_dtype), cap)

    z = logits(x["hidden"][rows], x["weight"], case.softcap)
    if case.loss == "ce":
        return F.cross_entropy(z, x["labels"][rows], reduction="sum")
    log_p = torch.log_softmax(z, dim=-1)
    if case.loss == "dense":
        with torch.no_grad():
            log_q = torch.log_softmax(logits(x["teacher_hidden"][rows], x["teacher_weight"], case.softcap), dim=-1)
        return dv.divergence(log_p, log_q, None, case.divergence, BETA[case.divergence]).sum()
    ids = x["teacher_ids"][rows].long()
    valid = ids >= 0
    lse = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)  # log_p is already normalised
    tail_lse = dv.masked_logsumexp(log_p, ~dv.topk_mask(ids.clamp(min=0), valid, z.shape[-1]))
    log_pb, log_qb, valid_b, _, _ = dv.topk_bucket_logmasses(
        log_p.gather(1, ids.clamp(min=0)), lse, x["teacher_logprobs"][rows].to(compute_dtype), valid,
        case.tail, tail_lse)
    return dv.divergence(log_pb, log_qb, valid_b, case.divergence, BETA[case.divergence]).sum()


def _naive(logits_dtype: Optional[torch.dtype]) -> Builder:
    def build(x: dict, case: Case):
        if logits_dtype is None and x["hidden"].dtype == torch.float32:
            raise Missing("the same computation as naive-fp32 for float32 inputs", applies=False)
        rows = x["hidden"].shape[0]
        return lambda: naive_loss(x, case, logits_dtype) / rows
    return build


def _liger(x: dict, case: Case):
    """Liger-Kernel's chunked ``LigerFusedLinearJSDLoss`` (``liger_kernel.chunked_loss``; pure
    PyTorch with ``torch.compile``, so it runs on the CPU too) with its own defaults
    (``chunk_size=1024``, ``compiled=True``), the KD term only (``weight_hard_loss=0``,
    ``weight_soft_loss=1``), τ = 1, β in the same convention as fastkd's."""
    if case.loss != "dense":
        raise Missing("Liger's fused linear JSD is a full-vocabulary online-teacher loss", applies=False)
    if case.softcap:
        raise Missing("Liger's fused linear JSD has no softcap", applies=False)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError as error:
        raise Missing(f"liger-kernel is not importable ({error}; pip install liger-kernel --no-deps)") from None
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA[case.divergence],
                                      ignore_index=-100, temperature=1.0)
    return lambda: loss_fn(x["hidden"], x["weight"], x["teacher_hidden"], x["teacher_weight"], x["labels"])


def _torch_linear_ce(x: dict, case: Case):
    if case.loss != "ce" or case.softcap:
        raise Missing("F.linear_cross_entropy computes CE only, without softcap", applies=False)
    if not hasattr(F, "linear_cross_entropy"):
        raise Missing(f"torch {torch.__version__} has no F.linear_cross_entropy")
    options = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None
    return lambda: F.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], options=options)


def _cut_cross_entropy(x: dict, case: Case):
    if case.loss != "ce":
        raise Missing("Cut Cross-Entropy computes CE only", applies=False)
    try:
        cce = importlib.import_module("cut_cross_entropy")
    except ImportError:
        raise Missing("cut-cross-entropy is not installed") from None
    if not x["hidden"].is_cuda:
        raise Missing("Cut Cross-Entropy's kernels need a CUDA device")
    return lambda: cce.linear_cross_entropy(x["hidden"], x["weight"], x["labels"], softcap=case.softcap)


def _trl(x: dict, case: Case):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` on full logits. TRL's chunked path *is* Liger's
    module above: its GKD trainer builds ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss``
    when ``use_liger_kernel`` is set (huggingface/trl, ``trl/experimental/gkd/gkd_trainer.py``)."""
    if case.loss != "dense":
        raise Missing("TRL's GKD divergence is a full-vocabulary loss", applies=False)
    try:
        try:
            from trl.experimental.gkd import GKDTrainer   # trl >= 0.2x moved it here
        except ImportError:
            from trl import GKDTrainer
    except Exception as error:  # trl pulls many optional packages; any import failure means missing
        raise Missing(f"trl is not importable ({type(error).__name__})") from None
    beta = BETA[case.divergence]

    def step():
        student = (x["hidden"] @ x["weight"].T).unsqueeze(0)
        teacher = (x["teacher_hidden"] @ x["teacher_weight"].T).unsqueeze(0)
        return GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta)
    return step


def _with_setting(step: Callable[[], object], owner, name: str, value) -> Callable[[], object]:
    """``step`` run with ``owner.name = value`` for its duration (restored after, even on error)."""
    def run():
        saved = getattr(owner, name)
        setattr(owner, name, value)
        try:
            return step()
        finally:
            setattr(owner, name, saved)
    return run


def _fastkd_triton_epilogues(x: dict, case: Case):
    """``impl="chunked"`` with cuBLAS and the Triton epilogues (``chunked_epilogue="triton"``)
    instead of the default fused head: the row that says whether the default is the right one."""
    return _with_setting(_fastkd("chunked")(x, case), fastkd.config, "chunked_epilogue", "triton")


def _fastkd_gradient_pass(x: dict, case: Case):
    """The default chunked plan with the scaled tile off (``triton_fused_head.SCALED_TILE =
    False``): bfloat16 then runs the gradient pass, as float16 always does. Beside
    ``fastkd-chunked`` it says what the scaled tile saves on the GPU; elsewhere (the CPU runs the
    torch epilogues) it is the same row as ``fastkd-chunked``."""
    from fastkd.backends import triton_fused_head
    if not x["hidden"].is_cuda or case.loss != "topk":
        raise Missing("the scaled tile is the CUDA top-k plan's (else this is fastkd-chunked)",
                      applies=False)
    return _with_setting(_fastkd("chunked")(x, case), triton_fused_head, "SCALED_TILE", False)


IMPLEMENTATIONS: dict[str, Builder] = {
    "fastkd-auto": _fastkd("auto"),
    "fastkd-chunked": _fastkd("chunked"),
    "fastkd-chunked-triton": _fastkd_triton_epilogues,
    "fastkd-chunked-gradpass": _fastkd_gradient_pass,
    "fastkd-torch": _fastkd("torch"),
    "fastkd-triton": _fastkd("triton"),
    "fastkd-cuda": _fastkd("cuda"),
    "naive-hf": _naive(None),
    "naive-fp32": _naive(torch.float32),
    "liger": _liger,
    "torch-linear-ce": _torch_linear_ce,
    "cut-cross-entropy": _cut_cross_entropy,
    "trl-gkd": _trl,
}
PEERS = ("liger", "torch-linear-ce", "cut-cross-entropy", "trl-gkd")


def gemm_floor(x: dict, case: Case) -> Callable[[], None]:
    """The bare GEMMs of the case's shape in its dtype: logits, d hidden, d weight, and for the
    dense loss the online teacher's logits (:attr:`Case.gemm_flops`)."""
    hidden, weight = x["hidden"].detach(), x["weight"].detach()
    logits = torch.empty(case.tokens, case.vocab, dtype=hidden.dtype, device=hidden.device)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.empty_like(weight)
    teacher = (x["teacher_hidden"].detach(), x["teacher_weight"].detach()) if case.teacher_dim else None

    def step():
        if teacher is not None:
            torch.mm(teacher[0], teacher[1].T, out=logits)
        torch.mm(hidden, weight.T, out=logits)
        torch.mm(logits, weight, out=grad_hidden)
        torch.mm(logits.T, hidden, out=grad_weight)
    return step
