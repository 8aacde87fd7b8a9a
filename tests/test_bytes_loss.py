"""``fastkd.byte_logprobs`` / ``fastkd.byte_kd_loss`` (``impl="torch"``) against exact float64.

The reference (``fastkd.bytes.reference``) takes the full softmax in float64 and sums the
probabilities of each first-byte bucket; its gradients come from autograd. Random vocabularies
have skewed buckets, byte-less tokens, buckets empty on both sides and buckets only one side can
produce (the renormalised case).
"""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import fastkd
from fastkd.bytes import ByteKDLoss, ByteVocab, align_batch, align_tokenizations, byte_targets
from fastkd.bytes.reference import byte_kd_loss_reference, byte_logprobs_reference
from conftest import assert_rel_close, rel_error
from test_bytes_align import random_tokenization
from test_bytes_tokenizers import byte_level_bpe, make_texts

# Relative error allowed per input dtype (loss and gradients); fastkd computes in float32.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# V=211 (prime, not a tile multiple) and 283 for the teacher; D=19 and 12 (not powers of two).
V_STUDENT, V_TEACHER, D_STUDENT, D_TEACHER = 211, 283, 19, 12
# 2 rows per chunk of 3 float32 blocks of V: forces many chunks.
SMALL_CHUNK_BYTES = 2 * 3 * V_TEACHER * 4


@pytest.fixture(params=["one chunk", "many chunks"])
def chunking(request, monkeypatch):
    if request.param == "many chunks":
        monkeypatch.setattr(fastkd.config, "chunk_bytes", SMALL_CHUNK_BYTES)
    return request.param


def random_vocab(size: int, seed: int, missing: tuple = ()) -> ByteVocab:
    """Skewed first bytes (a few big buckets, many small, some empty), ~5% byte-less tokens."""
    rng = random.Random(seed)
    common = [32, 101, 116, 97, 0xC3, 0xE6]
    table = []
    for _ in range(size):
        u = rng.random()
        if u < 0.05:
            table.append(b"")
            continue
        first = rng.choice(common) if u < 0.6 else rng.randrange(256)
        while first in missing:
            first = rng.randrange(256)
        table.append(bytes([first]) + bytes(rng.randrange(256) for _ in range(rng.randint(0, 3))))
    return ByteVocab.from_bytes(table)


def byte_problem(seed=0, dtype=torch.float32, with_bias=False, ignore=True, sequences=2):
    """A student and a teacher over different random vocabularies, with an alignment of two texts."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    students, teachers = [], []
    for _ in range(sequences):
        n_bytes = rng.randint(15, 30)
        common = sorted(rng.sample(range(1, n_bytes), 6))
        cut = lambda: sorted(set(common) | set(rng.sample(range(1, n_bytes), 5)))  # noqa: E731
        students.append(random_tokenization(rng, cut(), n_bytes, {0: 1}))
        teachers.append(random_tokenization(rng, cut(), n_bytes, {0: 1}))
    alignment = align_batch(students, teachers)
    n_s, n_t = sequences * alignment.student_stride, sequences * alignment.teacher_stride
    # The student cannot produce bytes 0xF0-0xFF that the teacher can: renormalised buckets.
    student_vocab = random_vocab(V_STUDENT, seed, missing=tuple(range(0xF0, 0x100)))
    teacher_vocab = random_vocab(V_TEACHER, seed + 1000)
    hidden = (torch.randn(sequences, n_s // sequences, D_STUDENT, generator=gen) * 1.5).to(dtype).requires_grad_()
    weight = (torch.randn(V_STUDENT, D_STUDENT, generator=gen) / D_STUDENT**0.5).to(dtype).requires_grad_()
    bias = (torch.randn(V_STUDENT, generator=gen) * 0.5).to(dtype).requires_grad_() if with_bias else None
    # A float64 student gets a float64 teacher (each side computes in its own precision).
    teacher_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    teacher_hidden = (torch.randn(sequences, n_t // sequences, D_TEACHER, generator=gen) * 2.0).to(teacher_dtype)
    teacher_weight = (torch.randn(V_TEACHER, D_TEACHER, generator=gen) / D_TEACHER**0.5).to(teacher_dtype)
    labels = torch.randint(0, V_STUDENT, (sequences, n_s // sequences), generator=gen)
    teacher_labels = torch.randint(0, V_TEACHER, (sequences, n_t // sequences), generator=gen)
    if ignore:
        labels = torch.where(torch.rand(labels.shape, generator=gen) < 0.15, -100, labels)
        teacher_labels = torch.where(torch.rand(teacher_labels.shape, generator=gen) < 0.1, -100, teacher_labels)
    return dict(hidden=hidden, weight=weight, bias=bias, byte_vocab=student_vocab, alignment=alignment,
                teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                teacher_byte_vocab=teacher_vocab, labels=labels, teacher_labels=teacher_labels)


def _grad_inputs(problem):
    return [problem["hidden"], problem["weight"]] + ([problem["bias"]] if problem["bias"] is not None else [])


def _as_float64(problem):
    """The same problem with float64 leaves (unrounded reference gradients)."""
    copy = dict(problem)
    for name in ("hidden", "weight", "bias"):
        if problem[name] is not None:
            copy[name] = problem[name].detach().double().requires_grad_()
    return copy


def _loss_and_grads(fn, problem, teacher, **options):
    kwargs = dict(labels=problem["labels"], bias=problem["bias"], **options)
    if teacher == "online":
        kwargs.update(teacher_hidden=problem["teacher_hidden"], teacher_weight=problem["teacher_weight"],
                      teacher_byte_vocab=problem["teacher_byte_vocab"], teacher_labels=problem["teacher_labels"])
    else:
        byte_lp, token_lp = byte_targets(problem["teacher_hidden"].double(), problem["teacher_weight"].double(),
                                         problem["teacher_byte_vocab"], problem["teacher_labels"],
                                         temperature=options.get("temperature", 1.0), impl="torch")
        kwargs.update(teacher_byte_logprobs=byte_lp, teacher_token_logprobs=token_lp,
                      teacher_labels=problem["teacher_labels"])
    loss = fn(problem["hidden"], problem["weight"], problem["byte_vocab"], problem["alignment"], **kwargs)
    inputs = _grad_inputs(problem)
    if loss.dim() == 0:
        return loss, torch.autograd.grad(loss, inputs)
    grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return loss, torch.autograd.grad(loss, inputs, grad_out.to(loss.dtype))


# ------------------------------------------------------------------------------------------------
# byte_logprobs
# ------------------------------------------------------------------------------------------------

LOGPROB_MATRIX = list(itertools.product(
    [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    [(1.0, None, False), (2.5, 3.0, True), (0.7, None, True)],  # temperature, softcap, bias
))


@pytest.mark.parametrize("dtype,head", LOGPROB_MATRIX)
def test_byte_logprobs_against_float64_marginals(dtype, head, chunking):
    temperature, softcap, with_bias = head
    problem = byte_problem(seed=3, dtype=dtype, with_bias=with_bias)
    exact = _as_float64(problem)
    options = dict(temperature=temperature, softcap=softcap)
    out = fastkd.byte_logprobs(problem["hidden"], problem["weight"], problem["byte_vocab"],
                               bias=problem["bias"], impl="torch", **options)
    ref = byte_logprobs_reference(exact["hidden"], exact["weight"], exact["byte_vocab"], bias=exact["bias"],
                                  **options)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (problem["hidden"].shape[0] * problem["hidden"].shape[1], 257)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite)  # empty buckets are -inf, nothing else is
    assert (out[~finite] == -math.inf).all()
    tol = TOLERANCE[dtype]
    assert_rel_close(torch.where(finite, out, 0.0), torch.where(finite, ref, 0.0), tol, "byte log-probs")
    assert_rel_close(torch.logsumexp(out, dim=-1), torch.zeros(out.shape[0]), tol, "normalisation")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad(torch.where(finite, out, 0.0), _grad_inputs(problem), grad_out.to(out.dtype))
    ref_grads = torch.autograd.grad(torch.where(finite, ref, 0.0), _grad_inputs(exact), grad_out)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == problem[name].dtype
        assert_rel_close(g, r, 4 * tol if dtype in (torch.float16, torch.bfloat16) else tol, f"grad {name}")


def test_byte_logprobs_single_row_and_shapes():
    problem = byte_problem(seed=4)
    h = problem["hidden"][0, :1]
    out = fastkd.byte_logprobs(h, problem["weight"], problem["byte_vocab"])  # auto → torch on CPU
    ref = byte_logprobs_reference(h.double(), problem["weight"].double(), problem["byte_vocab"])
    finite = torch.isfinite(ref)
    assert out.shape == (1, 257)
    assert rel_error(out[finite], ref[finite]) < TOLERANCE[torch.float32]


def test_byte_lse_opcheck():
    problem = byte_problem(seed=5, with_bias=True)
    h = problem["hidden"].detach().reshape(-1, D_STUDENT)[:9].requires_grad_()
    first_byte = problem["byte_vocab"].first_byte
    torch.library.opcheck(torch.ops.fastkd.byte_lse_torch.default,
                          (h, problem["weight"], problem["bias"], first_byte, 1.5, 4.0, 1 << 20))


def test_byte_logprobs_gradcheck():
    gen = torch.Generator().manual_seed(6)
    vocab = random_vocab(29, seed=6)
    h = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(29, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(29, generator=gen, dtype=torch.float64, requires_grad=True)
    finite = torch.isfinite(fastkd.byte_logprobs(h, weight, vocab))

    def fn(h, weight, bias):
        out = fastkd.byte_logprobs(h, weight, vocab, bias=bias, temperature=1.3, softcap=5.0, impl="torch")
        return torch.where(finite, out, 0.0)

    assert torch.autograd.gradcheck(fn, (h, weight, bias))


# ------------------------------------------------------------------------------------------------
# byte_kd_loss
# ------------------------------------------------------------------------------------------------

KD_MATRIX = list(itertools.product(
    [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)],
    ["online", "offline"],
    [dict(), dict(temperature=2.0, chunk_weight=0.7, ce_weight=0.3, softcap=3.0, kd_weight=0.8)],
))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("divergence,teacher,options", KD_MATRIX)
def test_byte_kd_loss_against_reference(divergence, teacher, options, dtype):
    kind, beta = divergence
    problem = byte_problem(seed=8, dtype=dtype, with_bias=bool(options))
    exact = _as_float64(problem)
    options = dict(options, divergence=kind, beta=beta)
    loss, grads = _loss_and_grads(fastkd.byte_kd_loss, problem, teacher, impl="torch", **options)
    ref, ref_grads = _loss_and_grads(byte_kd_loss_reference, exact, teacher, **options)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.item() > 0
    tol = TOLERANCE[dtype]
    assert_rel_close(loss, ref, tol, "loss")
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_rel_close(g, r, tol, f"grad {name}")


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_byte_kd_loss_16_bit_and_reductions(reduction, dtype, chunking):
    problem = byte_problem(seed=9, dtype=dtype, with_bias=True)
    exact = _as_float64(problem)
    options = dict(divergence="jsd", chunk_weight=0.5, ce_weight=0.2, reduction=reduction)
    loss, grads = _loss_and_grads(fastkd.byte_kd_loss, problem, "online", **options)
    ref, ref_grads = _loss_and_grads(byte_kd_loss_reference, exact, "online", **options)
    assert_rel_close(loss, ref, TOLERANCE[torch.float32], "loss")  # computed in float32
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == dtype
        assert_rel_close(g, r, 2 * TOLERANCE[dtype], f"grad {name}")


def test_unaligned_and_ignored_rows_get_exactly_zero_gradient():
    problem = byte_problem(seed=10)
    hidden = problem["hidden"]
    pairs = problem["alignment"].pairs
    labels = problem["labels"].reshape(-1)
    for options in (dict(), dict(chunk_weight=0.5)):
        loss = fastkd.byte_kd_loss(hidden, problem["weight"], problem["byte_vocab"], problem["alignment"],
                                   teacher_hidden=problem["teacher_hidden"], teacher_weight=problem["teacher_weight"],
                                   teacher_byte_vocab=problem["teacher_byte_vocab"], labels=problem["labels"],
                                   teacher_labels=problem["teacher_labels"], reduction="none", **options)
        grad = torch.autograd.grad(loss.sum(), hidden)[0].reshape(-1, D_STUDENT)
        in_pairs = torch.zeros(labels.shape[0], dtype=torch.bool)
        in_pairs[pairs[:, 0]] = True
        if not options:  # only the byte term: rows not in a pair, or ignored, get nothing
            dead = ~in_pairs | (labels == -100)
            assert (grad[dead] == 0).all()
            assert (grad[~dead].abs().sum(dim=1) > 0).any()
        assert (loss[labels == -100] == 0).all()
        assert (loss[~in_pairs] == 0).all()
    # Ignored student rows drop their pairs: the loss matches one without those pairs.
    keep = labels[pairs[:, 0]] != -100
    kwargs = dict(teacher_hidden=problem["teacher_hidden"], teacher_weight=problem["teacher_weight"],
                  teacher_byte_vocab=problem["teacher_byte_vocab"], reduction="sum")
    with_labels = fastkd.byte_kd_loss(hidden, problem["weight"], problem["byte_vocab"], pairs,
                                      labels=problem["labels"], **kwargs)
    without = fastkd.byte_kd_loss(hidden, problem["weight"], problem["byte_vocab"], pairs[keep], **kwargs)
    assert_rel_close(with_labels, without, 1e-6, "ignored rows")


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_same_model_and_tokenizer_gives_zero(divergence):
    tokenizer = byte_level_bpe()
    vocab = ByteVocab.from_tokenizer(tokenizer)
    eot = tokenizer.token_to_id("<|endoftext|>")
    ids = [[eot] + tokenizer.encode(text).ids for text in make_texts(3, seed=15)]
    offsets = [vocab.byte_offsets(seq) for seq in ids]
    alignment = align_batch(offsets, offsets)
    width = alignment.student_stride
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(len(ids), width, 16, generator=gen, requires_grad=True)
    weight = (torch.randn(len(vocab), 16, generator=gen) / 4).requires_grad_()
    labels = torch.full((len(ids), width), -100)
    for b, seq in enumerate(ids):
        labels[b, :len(seq) - 1] = torch.tensor(seq[1:])
    loss = fastkd.byte_kd_loss(hidden, weight, vocab, alignment, teacher_hidden=hidden.detach(),
                               teacher_weight=weight.detach(), teacher_byte_vocab=vocab, labels=labels,
                               teacher_labels=labels, divergence=divergence, chunk_weight=1.0)
    assert len(alignment) == sum(len(seq) - 1 for seq in ids)
    assert abs(loss.item()) < 1e-6
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert max(g.abs().max().item() for g in grads) < 1e-6


def test_forward_kl_by_hand_with_renormalisation():
    """One pair, written out: Q and P restricted to the buckets both sides can produce."""
    problem = byte_problem(seed=11, ignore=False)
    pairs = problem["alignment"].pairs[:1]
    i, j = pairs[0].tolist()
    h = problem["hidden"].reshape(-1, D_STUDENT)
    p = torch.softmax(h[i].double() @ problem["weight"].double().T, dim=-1)
    q = torch.softmax(problem["teacher_hidden"].reshape(-1, D_TEACHER)[j].double()
                      @ problem["teacher_weight"].double().T, dim=-1)
    student_mass = torch.zeros(257, dtype=torch.float64).index_add(0, problem["byte_vocab"].first_byte, p)
    teacher_mass = torch.zeros(257, dtype=torch.float64).index_add(0, problem["teacher_byte_vocab"].first_byte, q)
    both = (student_mass > 0) & (teacher_mass > 0)
    assert (teacher_mass[0xF0:256] > 0).any() and (student_mass[0xF0:256] == 0).all()
    P, Q = student_mass[both] / student_mass[both].sum(), teacher_mass[both] / teacher_mass[both].sum()
    expected = (Q * (Q / P).log()).sum()
    loss = fastkd.byte_kd_loss(problem["hidden"], problem["weight"], problem["byte_vocab"], pairs,
                               teacher_hidden=problem["teacher_hidden"], teacher_weight=problem["teacher_weight"],
                               teacher_byte_vocab=problem["teacher_byte_vocab"], divergence="forward_kl",
                               reduction="sum")
    assert abs(loss.item() - expected.item()) < 1e-5 * expected.item()


def test_offline_teacher_equals_online_and_module():
    problem = byte_problem(seed=12)
    online = dict(teacher_hidden=problem["teacher_hidden"], teacher_weight=problem["teacher_weight"],
                  teacher_labels=problem["teacher_labels"])
    byte_lp, token_lp = byte_targets(problem["teacher_hidden"], problem["teacher_weight"],
                                     problem["teacher_byte_vocab"], problem["teacher_labels"], temperature=1.5)
    # byte_targets against the full softmax.
    t_logprobs = torch.log_softmax(problem["teacher_hidden"].reshape(-1, D_TEACHER).double()
                                   @ problem["teacher_weight"].double().T / 1.5, dim=-1)
    t_labels = problem["teacher_labels"].reshape(-1)
    gathered = t_logprobs.gather(1, t_labels.clamp(min=0).unsqueeze(1)).squeeze(1)
    expected_tokens = torch.where(t_labels != -100, gathered, 0.0)
    assert_rel_close(token_lp, expected_tokens, 1e-5, "token log-probs")
    module = ByteKDLoss(problem["byte_vocab"], problem["teacher_byte_vocab"], divergence="jsd",
                        temperature=1.5, chunk_weight=0.4, ce_weight=0.1)
    a = module(problem["hidden"], problem["weight"], problem["alignment"], labels=problem["labels"], **online)
    b = module(problem["hidden"], problem["weight"], problem["alignment"], labels=problem["labels"],
               teacher_byte_logprobs=byte_lp, teacher_token_logprobs=token_lp,
               teacher_labels=problem["teacher_labels"])
    c = fastkd.byte_kd_loss(problem["hidden"], problem["weight"], problem["byte_vocab"], problem["alignment"],
                            teacher_byte_vocab=problem["teacher_byte_vocab"], labels=problem["labels"],
                            divergence="jsd", temperature=1.5, chunk_weight=0.4, ce_weight=0.1, **online)
    assert_rel_close(a, c, 1e-7, "module vs functional")
    assert_rel_close(b, a, 1e-5, "offline vs online teacher")
    assert "divergence='jsd'" in repr(module)


def test_teacher_gets_no_gradient():
    problem = byte_problem(seed=13)
    teacher_hidden = problem["teacher_hidden"].requires_grad_()
    teacher_weight = problem["teacher_weight"].requires_grad_()
    loss = fastkd.byte_kd_loss(problem["hidden"], problem["weight"], problem["byte_vocab"], problem["alignment"],
                               teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                               teacher_byte_vocab=problem["teacher_byte_vocab"], labels=problem["labels"],
                               teacher_labels=problem["teacher_labels"], chunk_weight=0.5)
    loss.backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None
    assert problem["hidden"].grad is not None


def test_align_tokenizations_pairs_as_alignment():
    """An (M, 2) tensor of one sequence's pairs: chunks run between consecutive pairs."""
    problem = byte_problem(seed=14, sequences=1)
    pairs = problem["alignment"].pairs
    kwargs = dict(teacher_hidden=problem["teacher_hidden"], teacher_weight=problem["teacher_weight"],
                  teacher_byte_vocab=problem["teacher_byte_vocab"], labels=problem["labels"],
                  teacher_labels=problem["teacher_labels"], chunk_weight=0.6)
    from_tensor = fastkd.byte_kd_loss(problem["hidden"], problem["weight"], problem["byte_vocab"], pairs, **kwargs)
    from_alignment = fastkd.byte_kd_loss(problem["hidden"], problem["weight"], problem["byte_vocab"],
                                         problem["alignment"], **kwargs)
    assert_rel_close(from_tensor, from_alignment, 1e-7, "pairs tensor vs ByteAlignment")
    assert isinstance(align_tokenizations([[0, 1]], [[0, 1]]), torch.Tensor)


# ------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------

def _call(problem, **overrides):
    kwargs = dict(teacher_hidden=problem["teacher_hidden"], teacher_weight=problem["teacher_weight"],
                  teacher_byte_vocab=problem["teacher_byte_vocab"], labels=problem["labels"])
    args = dict(hidden=problem["hidden"], weight=problem["weight"], byte_vocab=problem["byte_vocab"],
                alignment=problem["alignment"])
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value
    return fastkd.byte_kd_loss(args["hidden"], args["weight"], args["byte_vocab"], args["alignment"], **kwargs)


def test_bad_arguments_are_rejected():
    problem = byte_problem(seed=16)
    vocab = problem["byte_vocab"]
    with pytest.raises(TypeError, match="byte_vocab must be a fastkd.ByteVocab"):
        _call(problem, byte_vocab=[b"a"])
    with pytest.raises(ValueError, match="byte_vocab has 211 ids but weight has V=210"):
        _call(problem, weight=problem["weight"][:-1])
    with pytest.raises(ValueError, match="teacher_byte_vocab has 211 ids"):
        _call(problem, teacher_byte_vocab=vocab)
    with pytest.raises(ValueError, match="teacher is missing"):
        _call(problem, teacher_weight=None)
    with pytest.raises(ValueError, match="not both"):
        _call(problem, teacher_byte_logprobs=torch.zeros(3, 257))
    with pytest.raises(ValueError, match=r"teacher_byte_logprobs must have shape \(\.\.\., 257\)"):
        _call(problem, teacher_hidden=None, teacher_weight=None, teacher_byte_vocab=None,
              teacher_byte_logprobs=torch.zeros(3, 256))
    with pytest.raises(ValueError, match="needs teacher_token_logprobs"):
        _call(problem, teacher_hidden=None, teacher_weight=None, teacher_byte_vocab=None,
              teacher_byte_logprobs=torch.zeros(3, 257), chunk_weight=1.0)
    with pytest.raises(ValueError, match="needs teacher_labels"):
        _call(problem, chunk_weight=1.0)
    with pytest.raises(ValueError, match="chunk_weight > 0 needs labels"):
        _call(problem, labels=None, chunk_weight=1.0)
    with pytest.raises(ValueError, match="chunk_weight must be >= 0"):
        _call(problem, chunk_weight=-1.0)
    with pytest.raises(ValueError, match="alignment must be a ByteAlignment or an"):
        _call(problem, alignment=torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="alignment must have an integer dtype"):
        _call(problem, alignment=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="outside the student's"):
        _call(problem, alignment=torch.tensor([[0, 0], [10**6, 1]]))
    with pytest.raises(ValueError, match="do not move forward"):
        _call(problem, alignment=torch.tensor([[3, 3], [1, 5]]), chunk_weight=1.0,
              teacher_labels=problem["teacher_labels"])
    with pytest.raises(ValueError, match="teacher_byte_logprobs must be log-probabilities"):
        n_t = problem["teacher_hidden"].shape[0] * problem["teacher_hidden"].shape[1]
        _call(problem, teacher_hidden=None, teacher_weight=None, teacher_byte_vocab=None,
              teacher_byte_logprobs=torch.full((n_t, 257), 0.5))
    with pytest.raises(ValueError, match="divergence must be one of"):
        _call(problem, divergence="kl")
    with pytest.raises(ValueError, match="labels must be in"):
        _call(problem, labels=torch.full_like(problem["labels"], 10**6))
    with pytest.raises(NotImplementedError, match="impl='cuda'"):
        _call(problem, impl="cuda")
    with pytest.raises(ValueError, match="impl='triton' computes in float32"):
        fastkd.byte_logprobs(problem["hidden"].double(), problem["weight"].double(), vocab, impl="triton")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastkd.byte_logprobs(problem["hidden"], problem["weight"], vocab, temperature=0.0)
    with pytest.raises(TypeError, match="byte_vocab must be a fastkd.ByteVocab"):
        ByteKDLoss("vocab")
