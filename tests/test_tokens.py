"""MaskGIT and autoregressive generators over discrete codes on tiny shapes: the mask schedule,
confidence unmasking, the causal mask and KV cache, per-sample randomness, guidance, top-k/p,
token log-probabilities and GRPO over tokens, and the kind/quantizer configuration checks."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from numerics import assert_rounding_close

from latentforge import tokens
from latentforge.config import Params, build_params
from latentforge.errors import ConfigError
from latentforge.models import layers
from latentforge.models.token_generator import TokenTransformer, token_generator_config

K, V, C = 6, 11, 3


def model(kind: str, seed: int = 0) -> TokenTransformer:
    torch.manual_seed(seed)
    m = TokenTransformer(token_generator_config("tiny", kind=kind, num_tokens=K, vocab_size=V,
                                                num_classes=C))
    # Larger output weights than the init's, so that distributions are far from uniform and a
    # bug that mixes positions or classes shows in the numbers.
    with torch.no_grad():
        m.head.weight.mul_(20)
        m.cls_embed.weight.mul_(20)
    return m.eval()


def rollout(m: TokenTransformer, n: int = 4, cfg_scale: float = 2.0, seed: int = 0,
            steps: int = 4) -> tokens.TokenRollout:
    labels = torch.arange(n) % C
    noise = tokens.SampleNoise(range(n), seed)
    if m.cfg.kind == "maskgit":
        return tokens.maskgit_sample(m, labels, noise, steps=steps, cfg_scale=cfg_scale)
    return tokens.ar_sample(m, labels, noise, cfg_scale=cfg_scale)


def test_mask_schedule_is_cosine_and_masks_at_least_one():
    torch.manual_seed(0)
    masked = tokens.random_mask(torch.zeros(20000, 16, dtype=torch.long))
    counts = masked.sum(1)
    assert counts.min() >= 1 and counts.max() <= 16
    # E[ceil(cos(pi r / 2) K)] for r ~ U(0, 1), by quadrature.
    r = (torch.arange(100000) + 0.5) / 100000
    expected = torch.ceil(torch.cos(math.pi / 2 * r) * 16).mean()
    assert counts.float().mean() == pytest.approx(float(expected), abs=0.1)
    # masked positions are spread over the sequence, not a prefix
    assert masked.float().mean(0).std() < 0.02
    assert [tokens.masked_after(s, 8, 16) for s in range(8)] == [
        math.floor(math.cos(math.pi / 2 * (s + 1) / 8) * 16 + 1e-9) for s in range(8)]


def test_maskgit_loss_reads_only_masked_positions():
    m = model("maskgit")
    codes = torch.randint(0, V, (8, K))
    labels = torch.arange(8) % C
    for smoothing in (0.0, 0.1):
        torch.manual_seed(3)
        loss, stats = tokens.maskgit_loss(m, codes, labels, class_dropout=0.0,
                                          label_smoothing=smoothing, null_class=C, mask_code=V)
        torch.manual_seed(3)
        masked = tokens.random_mask(codes)
        inputs = torch.where(masked, torch.full_like(codes, V), codes)
        logits = m(inputs, labels)
        expected = torch.nn.functional.cross_entropy(logits[masked], codes[masked],
                                                     label_smoothing=smoothing)
        assert_rounding_close(loss, expected, what=f"loss, smoothing {smoothing}")
        assert float(stats["masked_fraction"]) == pytest.approx(float(masked.float().mean()))
        hits = (logits[masked].argmax(-1) == codes[masked]).float().mean()
        assert float(stats["masked_accuracy"]) == pytest.approx(float(hits))


@pytest.mark.parametrize("kind", ["maskgit", "ar"])
def test_rows_give_the_full_outputs_at_those_positions(kind: str) -> None:
    m = model(kind)
    codes = torch.randint(0, V, (5, K))
    labels = torch.arange(5) % C
    picked = torch.rand(5, K) < 0.5
    picked[0] = False  # a row with nothing picked
    picked[1] = True  # a row with everything
    rows = picked.flatten().nonzero().squeeze(1)
    out = m(codes, labels, rows=rows)
    assert out.shape == (int(picked.sum()), V)
    assert_rounding_close(out, m(codes, labels)[picked], what="logits at the picked positions")
    repeated = m(codes, labels, rows=torch.cat([rows, rows[:3]]))  # padding by repeats
    assert_rounding_close(repeated[:len(rows)], out, what="the padded call's first N rows")
    with pytest.raises(IndexError):
        m(codes, labels, rows=torch.tensor([5 * K]))
    with pytest.raises(ValueError, match="not with positions or guidance"):
        m(torch.cat([codes, codes]), torch.cat([labels, labels]), rows=rows, guidance=2.0)


def test_maskgit_forward_with_rows_traces_without_a_graph_break() -> None:
    """The masked positions reach the model as indices: no data-dependent shape inside it,
    so torch.compile traces its training forward whole, dropout included (a graph break
    there made compiled training slower than eager)."""
    torch.manual_seed(0)
    m = TokenTransformer(token_generator_config("tiny", kind="maskgit", num_tokens=K,
                                                vocab_size=V, num_classes=C, dropout=0.1))
    codes = torch.randint(0, V, (8, K))
    labels = torch.arange(8) % C
    rows = torch.tensor([0, 3, 5, 17, 30])
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(m.train())(codes, labels, rows=rows)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5, 1.0])
def test_smoothed_cross_entropy_equals_torchs_with_its_gradient(smoothing: float) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(40, 17) * 4).requires_grad_()
    targets = torch.randint(0, 17, (40,))
    ours = tokens.smoothed_cross_entropy(logits, targets, smoothing)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ref = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=smoothing)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    assert_rounding_close(ours, ref, what="loss")
    assert_rounding_close(grad_ours, grad_ref, what="gradient")
    with pytest.raises(ValueError, match="label_smoothing"):
        tokens.smoothed_cross_entropy(logits, targets, 1.5)
    with pytest.raises(ValueError, match=r"logits \(N, V\)"):
        tokens.smoothed_cross_entropy(logits[None], targets, 0.1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_smoothed_cross_entropy_ignores_padding_rows(smoothing: float) -> None:
    torch.manual_seed(0)
    logits = (torch.randn(40, 17) * 4).requires_grad_()
    targets = torch.randint(0, 17, (33,))
    padded = tokens.smoothed_cross_entropy(logits, targets, smoothing, padded=True)
    (grad_padded,) = torch.autograd.grad(padded, logits)
    exact = logits[:33].detach().requires_grad_()
    plain = tokens.smoothed_cross_entropy(exact, targets, smoothing)
    (grad_plain,) = torch.autograd.grad(plain, exact)
    assert_rounding_close(padded, plain, what="loss with 7 padding rows")
    assert_rounding_close(grad_padded[:33], grad_plain, what="gradient of the real rows")
    assert torch.equal(grad_padded[33:], torch.zeros(7, 17))
    with pytest.raises(ValueError, match="padding rows"):  # fewer rows than targets
        tokens.smoothed_cross_entropy(logits[:30], targets, smoothing, padded=True)
    with pytest.raises(ValueError, match=r"logits \(N, V\) and targets \(N,\) expected, got"):
        tokens.smoothed_cross_entropy(logits, targets, smoothing)  # padding not asked for


def test_maskgit_loss_pads_the_head_rows_where_onednn_runs_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN compiles a kernel per matmul shape: where it runs the head (fp32 on the oneDNN
    backend, bf16 autocast), the masked rows go through it padded to HEAD_ROW_MULTIPLE, with
    the unpadded loss and gradients; with the BLAS they are not padded."""
    m = model("maskgit")
    codes = torch.randint(0, V, (8, K))
    labels = torch.arange(8) % C
    seen: list[int] = []

    def record(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], out: torch.Tensor
               ) -> None:
        seen.append(out.shape[0])

    m.register_forward_hook(record, with_kwargs=True)

    def loss_and_grads(pad: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setattr(tokens, "matmuls_compile_per_shape", lambda device: pad)
        m.zero_grad()
        torch.manual_seed(3)
        loss, _ = tokens.maskgit_loss(m, codes, labels, class_dropout=0.0, label_smoothing=0.1,
                                      null_class=C, mask_code=V)
        loss.backward()
        return loss, {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    with layers.fp32_linear("blas"):
        plain, plain_grads = loss_and_grads(False)
        padded, padded_grads = loss_and_grads(True)
    torch.manual_seed(3)
    n = int(tokens.random_mask(codes).sum())
    multiple = tokens.HEAD_ROW_MULTIPLE
    assert seen == [n, -(-n // multiple) * multiple]
    assert_rounding_close(padded, plain, what="loss padded vs not")
    assert padded_grads.keys() == plain_grads.keys()
    for key, grad in plain_grads.items():
        assert_rounding_close(padded_grads[key], grad, what=f"gradient of {key}, padded vs not")
    monkeypatch.undo()  # the real predicate: bf16 autocast runs the head in oneDNN
    seen.clear()
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16), layers.fp32_linear("blas"):
        assert layers.matmuls_compile_per_shape(torch.device("cpu"))
        tokens.maskgit_loss(m, codes, labels, class_dropout=0.0, label_smoothing=0.1,
                            null_class=C, mask_code=V)
    assert seen == [-(-n // multiple) * multiple]
    with layers.fp32_linear("blas"):
        assert not layers.matmuls_compile_per_shape(torch.device("cpu"))


def test_top1_accuracy_is_argmax_accuracy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(500, 30)
    targets = torch.where(torch.rand(500) < 0.5, logits.argmax(-1), torch.randint(0, 30, (500,)))
    expected = (logits.argmax(-1) == targets).float().mean()
    assert float(tokens.top1_accuracy(logits, targets)) == pytest.approx(float(expected))
    assert 0.3 < float(expected) < 0.7  # hits and misses both counted


def test_maskgit_sampling_decides_each_position_once_and_keeps_given_codes():
    m = model("maskgit")
    ro = rollout(m, n=5, steps=4)
    assert ro.states is not None and ro.decided is not None
    assert (ro.decided.sum(1) == 1).all()  # every position decided in exactly one step
    assert ro.decided.sum(2)[0].tolist() == [
        (K if s == 0 else tokens.masked_after(s - 1, 4, K)) - tokens.masked_after(s, 4, K)
        for s in range(4)]
    for s in range(4):
        state = ro.states[:, s]
        given = state != m.mask_code
        # a code decided before step s is in its state with its final value, and nothing else is
        assert torch.equal(given, ro.decided[:, :s].any(1))
        assert torch.equal(state[given], ro.codes[given])
    assert ((ro.codes >= 0) & (ro.codes < V)).all()
    with pytest.raises(ValueError, match="steps <= K"):
        rollout(m, steps=K + 1)


@pytest.mark.parametrize("kind", ["maskgit", "ar"])
def test_output_head_at_chosen_positions_equals_the_full_forward(kind: str):
    m = model(kind)
    codes = torch.randint(0, V + (kind == "maskgit"), (3, K))
    y = torch.tensor([0, 1, 2])
    positions = torch.tensor([[0, 2, 5], [1, 3, 4], [2, 3, 5]])
    full = m(codes, y)
    torch.testing.assert_close(m(codes, y, positions),
                               full.gather(1, positions.unsqueeze(-1).expand(-1, -1, V)))
    # a position past the sequence raises, as gather does, rather than read the next sample's row
    for bad in (K, -1):
        with pytest.raises(IndexError, match="positions must lie in \\[0, "):
            m(codes, y, positions.clamp(max=K - 1).index_fill(1, torch.tensor([1]), bad))


def test_kv_cache_and_causal_mask_equal_the_full_forward():
    m = model("ar")
    codes = torch.randint(0, V, (3, K))
    y = torch.tensor([0, 1, C])  # C is the null label
    full = m(codes, y)  # (3, K, V)
    cache, prev, steps = None, None, []
    for i in range(K):
        logits, cache = m.decode_step(prev, y, i, cache)
        steps.append(logits)
        prev = codes[:, i]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
    # causal: a later code changes no earlier position's logits, and does change its own
    changed = codes.clone()
    changed[:, 3] = (changed[:, 3] + 1) % V
    out = m(changed, y)
    torch.testing.assert_close(out[:, :4], full[:, :4])
    assert not torch.allclose(out[:, 4:], full[:, 4:])


@pytest.mark.parametrize("kind", ["maskgit", "ar"])
def test_a_sample_depends_only_on_its_seed_and_index(kind):
    m = model(kind)
    labels = torch.tensor([0, 1, 2, 1])
    together = tokens.SampleNoise([10, 11, 12, 13], seed=5)
    alone = tokens.SampleNoise([12], seed=5)
    if kind == "maskgit":
        a = tokens.maskgit_sample(m, labels, together, steps=3, cfg_scale=1.5).codes
        b = tokens.maskgit_sample(m, labels[2:3], alone, steps=3, cfg_scale=1.5).codes
    else:
        a = tokens.ar_sample(m, labels, together, cfg_scale=1.5).codes
        b = tokens.ar_sample(m, labels[2:3], alone, cfg_scale=1.5).codes
    # Batches of 4 and of 1 run other CPU kernel blockings: a rounding-level difference may flip
    # a near-tie draw, so one differing code of K is tolerated; another seed changes many.
    assert (a[2:3] != b).sum() <= 1
    other = tokens.SampleNoise([10, 11, 12, 13], seed=6)
    c = (tokens.maskgit_sample(m, labels, other, steps=3, cfg_scale=1.5) if kind == "maskgit"
         else tokens.ar_sample(m, labels, other, cfg_scale=1.5)).codes
    assert (a != c).float().mean() > 0.25  # measured: 0.67 (maskgit), 0.54 (ar)


def test_guidance_mixes_conditional_and_unconditional_logits():
    m = model("maskgit")
    codes = torch.randint(0, V + 1, (4, K))
    y = torch.tensor([0, 1, 2, 0])
    cond, uncond = m(codes, y), m(codes, torch.full_like(y, C))
    torch.testing.assert_close(tokens.guided_logits(m, codes, y, 1.0), cond)
    torch.testing.assert_close(tokens.guided_logits(m, codes, y, 0.0), uncond)
    torch.testing.assert_close(tokens.guided_logits(m, codes, y, 3.0),
                               uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["maskgit", "ar"])
def test_guidance_before_the_head_equals_mixing_logits(kind):
    """The model mixes the head's inputs (half the head's work); the logits are those of the
    mix of conditional and unconditional logits, at positions and in ar's cached steps too.
    Weights far from the init's 0.02 scale, so the logits are large and differ by class."""
    m = model(kind)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    codes = torch.randint(0, V if kind == "ar" else V + 1, (4, K))
    y = torch.tensor([0, 1, 2, 0])
    null = torch.full_like(y, C)
    cond, uncond = m(codes, y), m(codes, null)
    assert (cond - uncond).abs().max() > 0.1  # guidance has something to mix (1000x the tolerance)
    scale = 2.5
    expected = uncond + scale * (cond - uncond)
    tol = {"atol": 1e-4, "rtol": 1e-5}  # fp32 rounding of logits of magnitude ~10
    torch.testing.assert_close(tokens.guided_logits(m, codes, y, scale), expected, **tol)
    positions = torch.tensor([[0, 2, 5]] * 4)
    torch.testing.assert_close(tokens.guided_logits(m, codes, y, scale, positions),
                               expected.gather(1, positions.unsqueeze(-1).expand(-1, -1, V)),
                               **tol)
    if kind == "ar":
        cache, prev, steps = None, None, []
        both = torch.cat([y, null])
        for i in range(K):
            logits, cache = m.decode_step(prev, both, i, cache, guidance=scale)
            steps.append(logits)
            prev = torch.cat([codes[:, i], codes[:, i]])
        torch.testing.assert_close(torch.stack(steps, 1), expected, **tol)
    with pytest.raises(ValueError, match="an even batch"):
        m(codes[:3], y[:3], guidance=scale)


def test_categorical_draws_follow_the_probabilities_and_skip_zero_ones():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    draws = tokens.categorical(probs.expand(200000, -1),
                               torch.rand(200000).clamp(1e-10, 1 - 1e-10))
    freq = torch.bincount(draws, minlength=6).float() / 200000
    assert freq[probs == 0].sum() == 0
    torch.testing.assert_close(freq, probs, atol=0.005, rtol=0)  # 200k draws: sd <= 0.0012


@pytest.mark.parametrize("v", [1, 2, 7, 97, 1000, 1003])
def test_categorical_in_blocks_inverts_the_whole_cdf(v: int) -> None:
    g = torch.Generator().manual_seed(v)
    probs = torch.rand(4000, v, generator=g) * (torch.rand(4000, v, generator=g) < 0.3)
    probs[:, 0] = 0.0  # zero mass where a block starts and ends
    probs[:, -1] = 0.0
    probs[probs.sum(-1) == 0, v // 2] = 1.0
    if v == 1:
        probs[:] = 1.0
    probs = probs / probs.sum(-1, keepdim=True)
    u = torch.rand(4000, generator=g).clamp(1e-10, 1 - 1e-10)
    draws = tokens.categorical(probs, u)
    assert (probs.gather(-1, draws.unsqueeze(-1)) > 0).all()  # never a code of mass 0
    # One CDF over all V (float64): the same code, except where u sits within rounding of
    # a boundary between two codes.
    cdf = probs.double().cumsum(-1)
    reference = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    reference = reference.clamp_max(v - 1)
    assert (draws == reference).float().mean() > 0.999
    # u at the ends: the first and the last code with mass
    ends = tokens.categorical(probs[:2], torch.tensor([1e-10, 1 - 1e-10]))
    nonzero = (probs[:2] > 0).float()
    assert ends[0] == nonzero[0].argmax() and ends[1] == v - 1 - nonzero[1].flip(-1).argmax()


def test_cdf_blocks_divide_the_vocabulary_where_a_divisor_is_near_its_root():
    # 1000 = 25 x 40 and 1003 = 17 x 59: each pair is equally far from the root; the smaller wins
    assert [tokens.cdf_block_size(v) for v in (1000, 1024, 4096, 65536, 1003, 2 * 5**4)] == [
        25, 32, 64, 256, 17, 25]
    assert tokens.cdf_block_size(97) == 10  # prime: 10 blocks of 10, the last padded


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    keep = torch.isfinite
    assert keep(tokens.filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert keep(tokens.filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert keep(tokens.filter_logits(logits, top_p=0.75)).tolist() == [[True, True, False, False]]
    assert keep(tokens.filter_logits(logits, top_p=0.76)).tolist() == [[True, True, True, False]]
    assert keep(tokens.filter_logits(logits, top_p=0.1)).tolist() == [[True, False, False, False]]
    assert keep(tokens.filter_logits(logits)).all()
    # ar sampling with top_k = 1 is greedy
    m = model("ar")
    labels = torch.tensor([0, 1])
    greedy = tokens.ar_sample(m, labels, tokens.SampleNoise([0, 1], 0), cfg_scale=1.0, top_k=1)
    cache, prev = None, None
    for i in range(K):
        logits_i, cache = m.decode_step(prev, labels, i, cache)
        prev = logits_i.argmax(-1)
        assert torch.equal(greedy.codes[:, i], prev)


@pytest.mark.parametrize("kind", ["maskgit", "ar"])
def test_token_log_probs_match_the_rollout_and_sum_to_the_sequence(kind):
    m = model(kind)
    ro = rollout(m, n=6, cfg_scale=2.0)
    new, full = tokens.token_log_probs(m, ro, cfg_scale=2.0, temperature=1.0)
    torch.testing.assert_close(new, ro.log_prob, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(6, K))
    if kind == "ar":
        # the sequence's log-probability by the chain rule, position by position
        seq = torch.zeros(6)
        for i in range(K):
            logits = tokens.guided_logits(m, ro.codes, ro.labels, 2.0)[:, i]
            seq += torch.log_softmax(logits, -1).gather(-1, ro.codes[:, i:i + 1])[:, 0]
        torch.testing.assert_close(new.sum(1), seq, atol=1e-4, rtol=1e-5)
    else:
        # each code's log-probability is from the step that decided it: recompute step by step
        assert ro.states is not None and ro.decided is not None
        for s in range(ro.states.shape[1]):
            logp = torch.log_softmax(tokens.guided_logits(m, ro.states[:, s], ro.labels, 2.0), -1)
            picked = logp.gather(-1, ro.codes.unsqueeze(-1))[..., 0]
            mask = ro.decided[:, s]
            torch.testing.assert_close(new[mask], picked[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["maskgit", "ar"])
def test_token_grpo_zero_step_on_equal_rewards_and_ascent_on_advantage(kind):
    policy, reference = model(kind), model(kind)
    policy.train()
    ro = rollout(policy, n=6, cfg_scale=1.0)
    kwargs = {"cfg_scale": 1.0, "temperature": 1.0, "clip_range": 0.2, "kl_beta": 0.0}
    valid = torch.ones(6, dtype=torch.bool)
    # all advantages 0 (a batch of equal rewards): no gradient at all
    loss, stats = tokens.token_grpo_loss(policy, reference, ro, torch.zeros(6), valid, **kwargs)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in policy.parameters())
    assert float(stats["approx_kl"]) < 1e-9 and float(stats["clip_fraction"]) == 0
    # a positive advantage on sample 0 only: a small step raises its codes' log-probability
    adv = torch.zeros(6)
    adv[0] = 1.0
    opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
    before, _ = tokens.token_log_probs(policy, ro, cfg_scale=1.0, temperature=1.0)
    opt.zero_grad()
    tokens.token_grpo_loss(policy, reference, ro, adv, valid, **kwargs)[0].backward()
    opt.step()
    after, _ = tokens.token_log_probs(policy, ro, cfg_scale=1.0, temperature=1.0)
    assert after[0].sum() > before[0].sum()


def test_token_grpo_clip_acts_after_the_policy_moves_and_kl_is_exact():
    policy, reference = model("ar", seed=0), model("ar", seed=1)
    ro = rollout(policy, n=6, cfg_scale=1.0)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    valid = torch.ones(6, dtype=torch.bool)
    kwargs = {"cfg_scale": 1.0, "temperature": 1.0, "clip_range": 0.01}
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    for _ in range(2):  # two inner steps on the same rollouts: the ratio leaves 1
        opt.zero_grad()
        loss, stats = tokens.token_grpo_loss(policy, reference, ro, adv, valid, kl_beta=0.0,
                                             **kwargs)
        loss.backward()
        opt.step()
    _, stats = tokens.token_grpo_loss(policy, reference, ro, adv, valid, kl_beta=0.0, **kwargs)
    assert float(stats["clip_fraction"]) > 0
    # the KL term is the exact categorical KL of the code distributions from the same states
    loss_kl, stats = tokens.token_grpo_loss(policy, reference, ro, torch.zeros(6), valid,
                                            kl_beta=1.0, **kwargs)
    _, p = tokens.token_log_probs(policy, ro, cfg_scale=1.0, temperature=1.0)
    _, q = tokens.token_log_probs(reference, ro, cfg_scale=1.0, temperature=1.0)
    exact = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=p),
                                              torch.distributions.Categorical(logits=q))
    torch.testing.assert_close(stats["kl"], exact.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_kl.detach(), exact.mean(), atol=1e-5, rtol=1e-5)


def test_kind_and_quantizer_must_fit():
    raw = Params().to_dict()
    raw["generator"]["kind"] = "maskgit"
    with pytest.raises(ConfigError, match=r"generator.kind = 'maskgit'.*tokenizer.quantizer = "
                                         r"'kl'"):
        build_params(raw)
    raw["tokenizer"].update(quantizer="fsq", token_dim=4)
    raw["generator"]["maskgit_steps"] = 17
    with pytest.raises(ConfigError, match="generator.maskgit_steps = 17 is more than the 16"):
        build_params(raw)
    raw["generator"]["maskgit_steps"] = 8
    assert build_params(raw).generator.kind == "maskgit"
    # More codes than the token generator's output layer takes: refused here, not after the
    # tokenizer trained (it failed at the generator stage with a ValueError traceback).
    for tokenizer, key in (({"quantizer": "binary", "token_dim": 17}, "tokenizer.token_dim"),
                           ({"quantizer": "fsq", "token_dim": 4, "fsq_levels": [16, 16, 16, 17]},
                            "tokenizer.fsq_levels")):
        raw["tokenizer"].update(tokenizer)
        with pytest.raises(ConfigError, match=rf"generator.kind = 'maskgit' predicts one of the "
                                              rf"tokenizer's \d+ codes .*lower {key}"):
            build_params(raw)
        raw["generator"]["kind"] = "flow"  # continuous latents: any number of codes
        build_params(raw)
        raw["generator"]["kind"] = "maskgit"
    raw["tokenizer"].update(quantizer="binary", token_dim=16)
    assert build_params(raw).tokenizer.token_dim == 16


def test_rl_policy_runs_without_dropout_so_ratios_compare_one_network():
    from latentforge.config import RLConfig
    from latentforge.tasks.rl import FineTuner

    torch.manual_seed(0)
    base = TokenTransformer(token_generator_config("tiny", kind="maskgit", num_tokens=K,
                                                   vocab_size=V, num_classes=C, dropout=0.5))
    tuner = FineTuner(RLConfig(), 0, base, reward=None, decode=None, device=torch.device("cpu"),
                      token_sampling={"steps": 3, "temperature": 1.0, "choice_temperature": 1.0,
                                      "top_k": 0, "top_p": 1.0})
    ro = tokens.maskgit_sample(tuner.policy, torch.tensor([0, 1]), tokens.SampleNoise([0, 1], 0),
                               steps=3, cfg_scale=1.0)
    a, _ = tokens.token_log_probs(tuner.policy, ro, cfg_scale=1.0, temperature=1.0)
    b, _ = tokens.token_log_probs(tuner.policy, ro, cfg_scale=1.0, temperature=1.0)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, ro.log_prob, atol=1e-5, rtol=1e-5)
