"""Flow vs MaskGIT vs autoregressive generators at matched size: sampling and training speed.

For each kind, a generator of the same registry size over the same latent shape (K tokens; fsq
codes for maskgit and ar, their D-dim latents for flow); prints sampling throughput (latents
only, batch 256, CFG on, so every kind runs its guided batch of 2N in one pass) and the
network passes per sample (NFE), the training step time (forward + backward + AdamW, batch 64),
and each kind's speed-up over the flow generator's Heun sampler, measured in the same run.
Weights are random: speed does not depend on them (quality comes from the pipeline's
generator stage, see the README's table).

    python bench/token_generators.py [--size tiny] [--tokens 16] [--flow-steps 25]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from latentforge import flow, tokens
from latentforge.malloc import tune_malloc
from latentforge.models.generator import FlowTransformer, generator_config
from latentforge.models.token_generator import TokenTransformer, token_generator_config

FSQ_LEVELS = [8, 5, 5, 5]


def timed(fn, reps: int) -> float:
    """Seconds per call of fn, after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def interleaved(samplers: dict[str, Callable[[], object]], rounds: int
                ) -> dict[str, list[float]]:
    """Seconds per call of each sampler in each of `rounds` rounds, the samplers taking turns
    within a round (after one warm-up call each), so a change of machine load lands on all of
    them alike; ratios are then taken round by round."""
    for fn in samplers.values():
        fn()
    out: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(rounds):
        for name, fn in samplers.items():
            start = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--tokens", type=int, default=16, help="K")
    parser.add_argument("--flow-steps", type=int, default=25, help="Heun steps of the flow")
    parser.add_argument("--maskgit-steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    tune_malloc()  # as every stage process and actor does (latentforge/malloc.py)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    k, d, vocab, classes = args.tokens, len(FSQ_LEVELS), math.prod(FSQ_LEVELS), 10
    labels = torch.arange(args.batch) % classes

    fm = FlowTransformer(generator_config(args.size, num_tokens=k, token_dim=d,
                                          num_classes=classes)).eval()

    @torch.no_grad()
    def flow_sample() -> int:
        noise = torch.randn(args.batch, k, d)
        _, nfe = flow.ode_sample(lambda x, t: fm.forward_with_cfg(x, t, labels, 1.5), noise,
                                 args.flow_steps, "heun")
        return nfe

    models: dict[str, torch.nn.Module] = {"flow (Heun)": fm}
    samplers: dict[str, Callable[[], object]] = {"flow (Heun)": flow_sample}
    nfes = {"flow (Heun)": flow_sample()}
    for kind in ("maskgit", "ar"):
        tm = TokenTransformer(token_generator_config(args.size, kind=kind, num_tokens=k,
                                                     vocab_size=vocab,
                                                     num_classes=classes)).eval()

        def token_sample(tm: TokenTransformer = tm, kind: str = kind) -> None:
            noise = tokens.SampleNoise(range(args.batch), 0)
            if kind == "maskgit":
                tokens.maskgit_sample(tm, labels, noise, steps=args.maskgit_steps, cfg_scale=1.5)
            else:
                tokens.ar_sample(tm, labels, noise, cfg_scale=1.5)

        models[kind], samplers[kind] = tm, token_sample
        nfes[kind] = args.maskgit_steps if kind == "maskgit" else k
    times = interleaved(samplers, args.rounds)
    flow_times = np.array(times["flow (Heun)"])

    x, y = torch.randn(64, k, d), torch.randint(0, classes, (64,))
    codes = torch.randint(0, vocab, (64, k))
    print(f"size {args.size}, K={k}, fsq {FSQ_LEVELS} (V={vocab}), batch {args.batch}, CFG on, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} interleaved rounds")
    print(f"{'kind':<12} {'params':>8} {'NFE':>5} {'samples/s':>10} {'x flow':>7} "
          f"{'x flow range':>13} {'train step ms':>14}")
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def step(model: torch.nn.Module = model, name: str = name,
                 opt: torch.optim.Optimizer = opt) -> None:
            if name.startswith("flow"):
                loss, _ = flow.flow_matching_loss(model, x, y, class_dropout=0.1,
                                                  time_sampling="uniform", null_class=classes)
            elif name == "maskgit":
                loss, _ = tokens.maskgit_loss(model, codes, y, class_dropout=0.1,
                                              label_smoothing=0.1, null_class=classes,
                                              mask_code=vocab)
            else:
                loss, _ = tokens.ar_loss(model, codes, y, class_dropout=0.1,
                                         label_smoothing=0.1, null_class=classes)
            opt.zero_grad()
            loss.backward()
            opt.step()

        train_ms = timed(step, 5) * 1000
        seconds = np.array(times[name])
        speedup = flow_times / seconds  # round by round
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<12} {params / 1e3:>7.0f}k {nfes[name]:>5} "
              f"{args.batch / np.median(seconds):>10.0f} {np.median(speedup):>6.1f}x "
              f"{speedup.min():>6.1f}-{speedup.max():<5.1f}x {train_ms:>14.1f}")


if __name__ == "__main__":
    main()
