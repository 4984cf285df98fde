from __future__ import annotations

import datetime
import math
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from numerics import assert_rounding_close
from torch.nn.parallel import DistributedDataParallel

from latentforge.flow import flow_matching_loss, ode_sample
from latentforge.models.generator import (
    GENERATOR_SIZES,
    AdaLNBlock,
    Attention,
    FlowTransformer,
    GeneratorModelConfig,
    generator_config,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _config(size: str = "tiny", **overrides) -> GeneratorModelConfig:
    """4 tokens of dim 3 and 2 classes: the smallest useful model."""
    return generator_config(
        size, **{"num_tokens": 4, "token_dim": 3, "num_classes": 2, **overrides}
    )


def _inputs(b: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 3, generator=gen)
    t = torch.rand(b, generator=gen)
    y = torch.randint(0, 2, (b,), generator=gen)
    return x, t, y


def _toy_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: every entry near +1; class 1: near -1. (n, 4, 3) latents, (n,) labels."""
    y = torch.randint(0, 2, (n,), generator=gen)
    mode = (1 - 2 * y.float()).view(-1, 1, 1)
    return mode + 0.05 * torch.randn(n, 4, 3, generator=gen), y


def _train(model: FlowTransformer, steps: int, lr: float = 3e-3, seed: int = 0) -> None:
    """Adam on flow_matching_loss over the two-mode toy data."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(steps):
            data, labels = _toy_batch(64, gen)
            loss, _ = flow_matching_loss(
                model,
                data,
                labels,
                class_dropout=0.2,
                time_sampling="logit_normal",
                null_class=model.null_class,
            )
            opt.zero_grad()
            loss.backward()
            opt.step()


# ------------------------------------------------------------------------------ config


def test_size_registry() -> None:
    assert list(GENERATOR_SIZES) == ["tiny", "small", "base", "large"]
    cfg = generator_config("large", num_tokens=32, token_dim=16, num_classes=1000)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio) == (512, 12, 8, 4.0)
    assert _config("small", depth=1).depth == 1
    with pytest.raises(ValueError, match="unknown generator size"):
        generator_config("huge", num_tokens=4, token_dim=3, num_classes=2)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"heads": 5}, "not divisible by heads"),
        ({"num_tokens": 0}, "num_tokens"),
        ({"token_dim": 0}, "token_dim"),
        ({"num_classes": 0}, "num_classes"),
        ({"depth": 0}, "depth"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
    ],
)
def test_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


# ------------------------------------------------------------------------------- model


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_shapes(size: str) -> None:
    model = FlowTransformer(_config(size, num_tokens=6, token_dim=5, num_classes=10))
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 6, 5, generator=gen), torch.rand(3, generator=gen)
    y = torch.tensor([0, 9, 10])  # 10 is the null label
    assert model.null_class == 10
    assert model(x, t, y).shape == (3, 6, 5)
    assert model(x, torch.tensor(0.5), y).shape == (3, 6, 5)  # a scalar time broadcasts
    assert model.forward_with_cfg(x, t, y, 3.0).shape == (3, 6, 5)


def test_adaln_zero_init_is_identity_with_zero_output() -> None:
    torch.manual_seed(0)
    model = FlowTransformer(_config("small"))
    x, t, y = _inputs()
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    h = torch.randn(5, 4, model.cfg.width)
    c = model.condition(t, y)
    for block in model.blocks:
        assert isinstance(block, AdaLNBlock)
        assert torch.equal(block(h, c), h)


def _reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Multi-head attention written out: separate q, k, v, softmax(q k^T / sqrt(d)) v."""
    b, t, w = x.shape
    d = w // attn.heads
    q, k, v = (z.view(b, t, attn.heads, d).transpose(1, 2) for z in attn.qkv(x).chunk(3, -1))
    weights = (q @ k.transpose(-2, -1) / math.sqrt(d)).softmax(-1)  # (B, heads, T, T)
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, t, w))


def test_attention_and_its_gradients_match_the_written_out_reference() -> None:
    """The fused qkv projection split by unbind into SDPA: same values, same gradients."""
    torch.manual_seed(0)
    attn = Attention(16, 4)
    x = torch.randn(3, 5, 16)
    out = attn(x)
    grads = torch.autograd.grad(out.pow(2).sum(), list(attn.parameters()))
    ref = _reference_attention(attn, x)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), list(attn.parameters()))
    assert_rounding_close(out, ref, what="attention")
    for g, r in zip(grads, ref_grads, strict=True):
        assert_rounding_close(g, r, what="attention gradient")


def test_block_computes_the_dit_formula() -> None:
    """The addcmul forms of modulation and gating against DiT's x * (1 + scale) + shift and
    x + gate * branch, with a modulation moved off its zero start."""
    torch.manual_seed(0)
    block = AdaLNBlock(8, 2, 4.0)
    torch.nn.init.normal_(block.modulation.weight, std=0.5)
    x, c = torch.randn(3, 5, 8), torch.randn(3, 8)
    shift1, scale1, gate1, shift2, scale2, gate2 = (
        m.unsqueeze(1) for m in block.modulation(F.silu(c)).chunk(6, dim=-1))
    h = x + gate1 * block.attn(block.norm1(x) * (1 + scale1) + shift1)
    ref = h + gate2 * block.mlp(block.norm2(h) * (1 + scale2) + shift2)
    assert_rounding_close(block(x, c), ref, what="block output")


def test_bf16_autocast_loss_and_gradients_follow_fp32() -> None:
    """bf16 autocast rounds matmul inputs to 8 significant bits and keeps the loss in fp32:
    the loss stays within 2 bf16 epsilons (2^-7, relative) of fp32's (measured: 0.1) and the
    gradient points the same way. Weights off their zero start, so every branch counts."""
    torch.manual_seed(0)
    model = FlowTransformer(_config())
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    data, labels = _toy_batch(16, gen)
    losses, grads = {}, {}
    for bf16 in (False, True):
        torch.manual_seed(2)  # the same noise, times and dropped labels
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = flow_matching_loss(model, data, labels, class_dropout=0.1,
                                         time_sampling="logit_normal",
                                         null_class=model.null_class)
        losses[bf16] = loss.float()
        grads[bf16] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    assert abs(losses[True] - losses[False]) <= 2 * 2**-8 * abs(losses[False])
    assert F.cosine_similarity(grads[True], grads[False], dim=0) > 0.99


def test_gelu_is_erf_and_folders_from_before_the_field_load_tanh() -> None:
    from dataclasses import asdict

    from latentforge.tasks.generator import build_generator_model

    cfg = _config()
    assert cfg.gelu_approximate == "none"
    with pytest.raises(ValueError, match="gelu_approximate"):
        _config(gelu_approximate="fast")

    def gelus(model: torch.nn.Module) -> set[str]:
        return {m.approximate for m in model.modules() if isinstance(m, torch.nn.GELU)}

    assert gelus(build_generator_model(asdict(cfg))) == {"none"}
    old = {k: v for k, v in asdict(cfg).items() if k != "gelu_approximate"}
    assert gelus(build_generator_model(old)) == {"tanh"}


def test_every_parameter_gets_a_gradient() -> None:
    """DDP without find_unused_parameters needs every parameter in the graph of one call.

    Zero-initialised layers block gradients until they move: the output layer moves in step
    1, the modulation layers in step 2, and from step 3 on everything gets a gradient.
    """
    torch.manual_seed(0)
    model = FlowTransformer(_config())
    _train(model, 3)
    x, t, _ = _inputs()
    y = torch.tensor([0, 1, 2, 0, 1])  # includes the null label
    model.zero_grad()
    model(x, t, y).pow(2).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_ddp_training_step_calls_forward_once(tmp_path, monkeypatch) -> None:
    """The trainer's path: one model(x, t, y) through a DDP wrapper per step."""
    assert not dist.is_initialized()
    # Loopback, not the address the host name resolves to (a CI machine's may not answer),
    # and a bounded wait: a collective that cannot complete fails in a minute, not 30.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = FlowTransformer(_config())
        calls = []
        model.register_forward_hook(lambda module, args, out: calls.append(len(args)))
        ddp = DistributedDataParallel(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
        data, labels = _toy_batch(8, torch.Generator().manual_seed(0))
        for _ in range(2):
            loss, metrics = flow_matching_loss(
                ddp,
                data,
                labels,
                class_dropout=0.1,
                time_sampling="uniform",
                null_class=model.null_class,
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert calls == [3, 3]  # x, t, y; no forward_with_cfg or second pass in training
        assert torch.isfinite(loss) and "class_dropped" in metrics
        assert model.final.linear.weight.abs().sum() > 0  # the update reached the module
    finally:
        dist.destroy_process_group()


def test_null_class_changes_output_after_training() -> None:
    torch.manual_seed(0)
    model = FlowTransformer(_config())
    x, t, _ = _inputs()
    labels = torch.zeros(5, dtype=torch.long)
    null = torch.full((5,), model.null_class)
    # adaLN-zero: at init no condition reaches the output.
    assert torch.equal(model(x, t, labels), model(x, t, null))
    _train(model, 5)
    with torch.no_grad():
        cond, uncond = model(x, t, labels), model(x, t, null)
    assert (cond - uncond).abs().max() > 1e-4


def test_forward_with_cfg() -> None:
    torch.manual_seed(0)
    model = FlowTransformer(_config())
    _train(model, 5)
    x, t, y = _inputs()
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, model.null_class))
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), cond)
        for scale in (0.0, 2.5):
            torch.testing.assert_close(
                model.forward_with_cfg(x, t, y, scale), uncond + scale * (cond - uncond)
            )

    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        model.forward_with_cfg(x, t, y, 1.0)
        model.forward_with_cfg(x, t, y, 4.0)
    assert calls == [5, 10]  # scale 1: one plain pass; otherwise one batch of both halves


def test_tiny_model_learns_two_class_modes() -> None:
    torch.manual_seed(0)
    model = FlowTransformer(_config())
    _train(model, 200)
    model.eval()
    noise = torch.randn(32, 4, 3, generator=torch.Generator().manual_seed(1))
    for label, mode in ((0, 1.0), (1, -1.0)):
        y = torch.full((32,), label)
        with torch.no_grad():
            velocity = partial(model.forward_with_cfg, y=y, cfg_scale=1.0)
            x1, nfe = ode_sample(velocity, noise, 10, "heun")
        assert nfe == 19
        assert (x1.mean() - mode).abs() < 0.15
        # An undertrained model may send the odd sample to the other class's mode; nearly
        # all must land on their own.
        per_sample = (x1 - mode).pow(2).mean((1, 2)).sqrt()  # (32,)
        assert (per_sample < 0.3).float().mean() >= 0.9
