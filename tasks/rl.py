"""The `rl` stage: Flow-GRPO fine-tuning of the class-conditional generator against a reward.

Rollouts turn the generator's ODE into the SDE with the same marginals (``flow.sde_sample``),
so each of the ``rl.train_steps`` sampling steps is a Gaussian policy step whose
log-probability is stored. Per update, ``rl.classes_per_step`` labels get ``rl.group_size``
rollouts each; the final latents are decoded by the tokenizer and scored by the reward, and
each sample's advantage is its reward relative to its group. The policy then minimises a
PPO-clipped ratio of new to rollout step probabilities on a random subset of each rollout's
steps, plus ``rl.kl_beta`` times the closed-form KL between its step and the frozen base
generator's step from the same state. Ratio, clip range and KL are in Flow-GRPO's
per-dimension units, so the paper's values mean what they mean there (``latentforge/flow.py``
derives the conversion). ``rl.inner_epochs`` x ``rl.minibatches`` optimizer steps per batch of
rollouts let the policy move off the rollouts' so that the clip acts. A fixed, class-balanced
ODE sample is scored before the first update, every ``rl.eval_every`` updates and at the end
(the reward, and gFD-eval and accuracy from the evaluator, a network the reward never saw), so
that reward hacking (reward up, gFD-eval up) shows in the curves.

Every update's randomness (labels, rollout noise, trained steps) is a pure function of
(seed, update), so a run resumed from a checkpoint reproduces an uninterrupted one.

maskgit and ar generators (``generator.kind``) take the same loop with GRPO over tokens
(``tokens.token_grpo_loss``): a rollout is the generator's own sampler at ``rl.cfg_scale``
(maskgit: confidence unmasking; ar: the full distribution, no top-k/top-p), each sampled code
is an action whose log-probability is taken under the state it was decided in, and the KL to
the frozen base is the exact KL of the code distributions from those states. Ratio clip and
KL weight are per code (``rl.token_clip_range``, ``rl.token_kl_beta``); the SDE keys
(train_steps, noise_level, timestep_*) do not apply, and every code is trained in each pass.

``rl.seeds`` fine-tunes the same base once per seed through the same code (``train_seed``;
each with its own checkpoints, so adding a seed reruns only that seed): on a CPU side by side,
each seed in a worker process of its own (``procs.map_processes``; ``compute.parallel_seeds``),
since a second thread speeds these small models up by a few percent while a second process
doubles the work done; else one after another in this process. The first seed's model
is the stage's RL model (the rl folder itself: registered, sampled, swept by evaluate); the
others are generator folders under ``seeds/seed_<n>/`` that evaluate grades beside it. All
seeds share the fixed evaluation sample (seed EVAL_SAMPLE_SEED, whatever rl.seeds holds, so
reordering or extending the seeds keeps every finished seed's checkpoints), so their numbers
pair.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from latentforge import checkpoint as ckpt
from latentforge import flow, paths, procs, storage, tokens
from latentforge.config import Params, RLConfig
from latentforge.data import load_prepared
from latentforge.images import save_png
from latentforge.lineage import REGISTERED_MODELS
from latentforge.models.generator import FlowTransformer
from latentforge.rewards import Reward
from latentforge.runner import StageResult
from latentforge.tasks.generator import (
    META,
    TOKEN_KINDS,
    WEIGHTS,
    GeneratorHandle,
    GeneratorModel,
    build_model,
    class_grid,
    load_generator,
    sample_token_rollout,
    sampling_record,
    score_samples,
)
from latentforge.tasks.judge import JudgeScorer, load_judge
from latentforge.tasks.posttrain import apply_decoder
from latentforge.tasks.tokenizer import TokenizerHandle
from latentforge.tracking import Tracker
from latentforge.training import EMA, capture_rng, clip_gradients, driver_device, restore_rng

log = logging.getLogger(__name__)

KEEP_LAST = 2
SEEDS_DIR = "seeds"  # in the rl folder: one generator folder per RL seed after the first
EVAL_SAMPLE_SEED = 0  # noise of the fixed evaluation sample, shared by every RL seed
# Flow-GRPO's epsilon: keeps groups whose rewards differ by round-off from getting huge
# advantages.
ADV_EPS = 1e-4
# A group whose reward spread is below this fraction of its mean is float round-off of a
# constant: its advantages would be noise divided by noise, so the group is masked.
ZERO_SPREAD_RTOL = 1e-9
# Bound on |log new/old probability ratio| before exponentiating (see grpo_loss).
MAX_LOG_RATIO = 20.0
# rl params that change bookkeeping only: a checkpoint written under other values is resumed.
BOOKKEEPING_FIELDS = ("save_every",)
CURVE_COLUMNS = ("reward_mean", "reward_std", "kl", "clip_fraction", "approx_kl",
                 "log_ratio_min", "log_ratio_max", "zero_spread")
EVAL_COLUMNS = ("reward_mean", "gfd_eval", "eval_accuracy")
# Evaluation metrics compared before/after in the DVC metrics file.
COMPARED = ("reward_mean", "gfd_eval", "eval_accuracy", "precision", "recall", "diversity",
            "is_eval")


# --------------------------------------------------------------------------------------------
# Rollouts and the policy objective (small, pure, tested on their own)
# --------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """A batch of SDE trajectories in normalised latent space; T = rl.train_steps."""

    labels: torch.Tensor
    """(N,) requested classes."""
    times: torch.Tensor
    """(T,) start time of each step, exactly as the rollout used it."""
    x_t: torch.Tensor
    """(N, T, K, D) state at the start of each step."""
    x_next: torch.Tensor
    """(N, T, K, D) sampled state at the end of each step."""
    log_prob: torch.Tensor
    """(N, T) log-probability of each step under the rollout policy."""

    @property
    def final(self) -> torch.Tensor:
        """(N, K, D) latents at t = 1 (still normalised)."""
        return self.x_next[:, -1]

    def select(self, rows: torch.Tensor) -> Rollout:
        """The trajectories `rows` (a minibatch)."""
        return Rollout(self.labels[rows], self.times, self.x_t[rows], self.x_next[rows],
                       self.log_prob[rows])


def guided_velocity(model: FlowTransformer, labels: torch.Tensor,
                    cfg_scale: float) -> flow.VelocityFn:
    """The model's velocity for fixed labels (N,), with classifier-free guidance."""
    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model.forward_with_cfg(x, t, labels, cfg_scale)

    return velocity


@torch.no_grad()
def rollout(model: FlowTransformer, labels: torch.Tensor, *, steps: int, noise_level: float,
            cfg_scale: float, generator: torch.Generator) -> Rollout:
    """Sample N trajectories of the marginal-preserving SDE from noise, storing every step."""
    k, d = model.cfg.num_tokens, model.cfg.token_dim
    device = labels.device
    noise = torch.randn((len(labels), k, d), generator=generator, device=device)
    _, trajectory = flow.sde_sample(guided_velocity(model, labels, cfg_scale), noise, steps,
                                    noise_level, generator=generator)
    return Rollout(labels=labels, times=torch.stack([s.t[0] for s in trajectory]),
                   x_t=torch.stack([s.x_t for s in trajectory], dim=1),
                   x_next=torch.stack([s.x_next for s in trajectory], dim=1),
                   log_prob=torch.stack([s.log_prob for s in trajectory], dim=1))


def rescore_steps(model: FlowTransformer, ro: Rollout, step_index: torch.Tensor, *,
                  noise_level: float, cfg_scale: float) -> flow.SDEStep:
    """Score step ``step_index[i]`` (N,) of every trajectory i under ``model``.

    Returns the SDE step whose ``log_prob`` (N,) is the new log-probability of the stored next
    state and whose ``mean`` carries gradients into the model.
    """
    rows = torch.arange(len(step_index), device=step_index.device)
    steps = ro.x_t.shape[1]
    return flow.sde_step(guided_velocity(model, ro.labels, cfg_scale), ro.x_t[rows, step_index],
                         ro.times[step_index], 1.0 / steps, noise_level,
                         prev_sample=ro.x_next[rows, step_index])


def group_advantages(rewards: np.ndarray, group_size: int, clip: float, mode: str = "group",
                     std_floor: float = ADV_EPS) -> tuple[np.ndarray, np.ndarray]:
    """(advantages (N,), valid (N,) bool) of rewards laid out as consecutive groups.

    Advantages are (reward - group mean) / scale, clipped to +-clip, where scale is the
    group's std (mode group), the whole batch's std (global, as Flow-GRPO's reference configs
    do) or 1 (none); a std below `std_floor` counts as `std_floor`, so near-equal rewards make a
    near-zero step. Groups with no reward spread carry no signal and are marked invalid
    (advantage 0).
    """
    groups = rewards.reshape(-1, group_size)  # (G, group_size)
    mean = groups.mean(1, keepdims=True)
    std = groups.std(1, keepdims=True)
    flat = std <= ZERO_SPREAD_RTOL * np.abs(mean)
    if mode == "group":
        scale = np.maximum(std, std_floor)
    elif mode == "global":
        scale = np.full_like(std, max(float(rewards.std()), std_floor))
    elif mode == "none":
        scale = np.ones_like(std)
    else:
        raise ValueError(f"advantage mode {mode!r}: expected group, global or none")
    adv = np.where(flat, 0.0, np.clip((groups - mean) / scale, -clip, clip))
    valid = np.broadcast_to(~flat, groups.shape)
    return adv.reshape(-1), valid.reshape(-1).copy()


def grpo_loss(policy: FlowTransformer, reference: FlowTransformer, ro: Rollout,
              step_index: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor,
              cfg: RLConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio policy loss on one step per trajectory plus kl_beta * KL to the reference.

    advantages (N,) float, valid (N,) bool. The policy term averages over valid trajectories
    only, so that masking flat groups does not shrink the step; the KL term covers all of them.
    """
    kwargs = {"noise_level": cfg.noise_level, "cfg_scale": cfg.cfg_scale}
    new = rescore_steps(policy, ro, step_index, **kwargs)
    with torch.no_grad():
        ref = rescore_steps(reference, ro, step_index, **kwargs)
    rows = torch.arange(len(step_index), device=step_index.device)
    # Ratio, clip and KL in Flow-GRPO's per-dimension units (flow.py: "Flow-GRPO's units").
    dims = ro.x_t[0, 0].numel()  # K * D
    dt = 1.0 / ro.x_t.shape[1]
    log_ratio = flow.per_dimension_log_ratio(new.log_prob - ro.log_prob[rows, step_index], dims)
    # A policy far from the rollout's could give ratios past float range; that far outside
    # the trust region they only need to stay finite.
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    clipped = torch.clamp(ratio, 1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
    per_sample = torch.maximum(-advantages * ratio, -advantages * clipped)
    weight = valid.float()
    n_valid = weight.sum().clamp_min(1.0)
    # where, not a product: a masked sample's 0 * inf must not turn the loss into NaN.
    policy_loss = torch.where(valid, per_sample, 0.0).sum() / n_valid
    # Same x_t and the same std for both models, so the step KL has the closed form.
    kl = flow.flow_grpo_kl(flow.gaussian_kl_equal_std(new.mean, ref.mean, new.std), dims, dt)
    loss = policy_loss + cfg.kl_beta * kl.mean()
    with torch.no_grad():
        stats = {"policy_loss": policy_loss.detach(), "kl": kl.mean(),
                 "clip_fraction": (((ratio - 1).abs() > cfg.clip_range).float() * weight).sum()
                 / n_valid,
                 "approx_kl": (0.5 * log_ratio.pow(2) * weight).sum() / n_valid,
                 "ratio_mean": (ratio * weight).sum() / n_valid,
                 "ratio_max": ratio.max(), "ratio_min": ratio.min(),
                 "log_ratio_min": log_ratio.min(), "log_ratio_max": log_ratio.max()}
    return loss, stats


def trained_steps(n: int, steps: int, fraction: float, generator: torch.Generator,
                  choice: str = "random") -> torch.Tensor:
    """(n, m) distinct step indices per trajectory, m = max(1, round(fraction * steps)): a
    random subset per trajectory, or the first m steps (choice "first")."""
    m = max(1, round(fraction * steps))
    if choice == "first":
        return torch.arange(m).expand(n, m).clone()
    return torch.rand((n, steps), generator=generator).argsort(dim=1)[:, :m]


# --------------------------------------------------------------------------------------------
# The fine-tuning loop
# --------------------------------------------------------------------------------------------


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> 1)


def update_labels(cfg: RLConfig, seed: int, step: int, num_classes: int) -> np.ndarray:
    """(classes_per_step * group_size,) labels of update `step` of RL seed `seed`,
    group-major."""
    rng = np.random.default_rng([seed, step, 0x1AB])
    classes = rng.choice(num_classes, cfg.classes_per_step,
                         replace=cfg.classes_per_step > num_classes)
    return np.repeat(classes, cfg.group_size).astype(np.int64)


@dataclass
class EvalSet:
    """The fixed evaluation sample: what is sampled and what it is compared against."""

    labels: np.ndarray
    ref_features: np.ndarray
    seed: int
    steps: int
    sampler: str
    cfg_scale: float

    def protocol(self) -> dict[str, Any]:
        return {"samples": len(self.labels), "per_class": int(np.bincount(self.labels).max()),
                "seed": self.seed, "sampler": self.sampler, "steps": self.steps,
                "cfg_scale": self.cfg_scale, "reference": "train split evaluator features",
                "graded_by": "evaluator"}


def evaluate(model: GeneratorModel, meta: dict[str, Any], tok: TokenizerHandle,
             evaluator: JudgeScorer, reward: Reward, es: EvalSet
             ) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of the fixed ODE sample of `model` (a CPU model), and its images: the
    evaluator's grades, and the reward (the judge's) beside them."""
    handle = GeneratorHandle(model, meta, tok)
    images = handle.sample_images(es.labels, seed=es.seed, steps=es.steps,
                                  cfg_scale=es.cfg_scale, sampler=es.sampler)
    m = score_samples(evaluator, images, es.labels, es.ref_features)
    total, parts = reward(images, es.labels)
    m["reward_mean"] = float(total.mean())
    m.update({f"reward/{name}": value for name, value in parts.items()})
    return {k: float(v) for k, v in m.items()}, images


@dataclass
class FineTuneResult:
    history: list[dict[str, float]]
    resumed_from: int
    seconds: float
    rollouts_per_s: float


class FineTuner:
    """Policy, frozen reference, optimizer and EMA, with checkpointed resume."""

    def __init__(self, cfg: RLConfig, seed: int, base: GeneratorModel, reward: Reward,
                 decode: Callable[[torch.Tensor], np.ndarray], device: torch.device,
                 token_sampling: dict[str, Any] | None = None) -> None:
        """`decode` maps the rollouts' final latents (flow) or codes (maskgit, ar) to images;
        `token_sampling` is a token generator's meta["sampling"] (None for flow)."""
        self.cfg, self.seed, self.reward, self.decode = cfg, seed, reward, decode
        self.device, self.token_sampling = device, token_sampling
        self.reference = copy.deepcopy(base).to(device).eval().requires_grad_(False)
        # Eval mode even while training: with dropout on (token generators train with it),
        # rollouts and rescoring would see different networks and the ratio would be noise.
        self.policy = copy.deepcopy(base).to(device).eval()
        self.ema = EMA(self.policy, cfg.ema_decay)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)

    def ema_model(self) -> GeneratorModel:
        """A CPU copy of the policy with the EMA weights (what is evaluated and saved)."""
        model = build_model(self.policy.cfg)
        model.load_state_dict({k: v.detach().cpu() for k, v in self.ema.state_dict().items()})
        return model.eval()

    def resume(self, ckpt_dir: Path, fingerprint: str) -> tuple[int, list[dict[str, float]]]:
        """Load the newest checkpoint of this configuration; (step, history) or (0, [])."""
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(ckpt_dir)
        # An unreadable newest checkpoint is set aside (logged); the one before it is used.
        state = ckpt.find_resume_checkpoint(ckpt_dir)
        if state is None:
            return 0, []
        if state.train_state.get("fingerprint") != fingerprint:
            log.warning("checkpoints in %s belong to another rl configuration or code; starting "
                        "afresh", ckpt_dir)
            ckpt.prune_checkpoints(ckpt_dir, keep_last=0)
            (ckpt_dir / ckpt.LATEST_FILE).unlink(missing_ok=True)
            return 0, []
        self.policy.load_state_dict(state.model_state)
        self.ema.load_state_dict(state.ema_state)
        self.optimizer.load_state_dict(state.train_state["optimizer"])
        restore_rng(state.train_state["rng"])
        return state.step, [dict(row) for row in state.train_state["history"]]

    def save(self, ckpt_dir: Path, step: int, fingerprint: str,
             history: list[dict[str, float]]) -> None:
        ckpt.save_checkpoint(ckpt_dir, step, self.policy.state_dict(), self.ema.state_dict(),
                             {"optimizer": self.optimizer.state_dict(), "rng": capture_rng(),
                              "fingerprint": fingerprint, "history": history},
                             keep_last=KEEP_LAST)

    def objective(self, ro: Rollout | tokens.TokenRollout, step_index: torch.Tensor,
                  advantages: torch.Tensor, valid: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a minibatch: Flow-GRPO on one step per trajectory, or GRPO over codes."""
        if isinstance(ro, tokens.TokenRollout):
            assert self.token_sampling is not None
            return tokens.token_grpo_loss(
                self.policy, self.reference, ro, advantages, valid, cfg_scale=self.cfg.cfg_scale,
                temperature=self.token_sampling["temperature"],
                clip_range=self.cfg.token_clip_range, kl_beta=self.cfg.token_kl_beta)
        return grpo_loss(self.policy, self.reference, ro, step_index, advantages, valid,
                         self.cfg)

    def update(self, step: int) -> dict[str, float]:
        """One GRPO update: rollouts, rewards, advantages, inner_epochs optimizer steps."""
        cfg = self.cfg
        labels_np = update_labels(cfg, self.seed, step, self.policy.cfg.num_classes)
        labels = torch.from_numpy(labels_np).to(self.device)
        ro: Rollout | tokens.TokenRollout
        if self.token_sampling is not None:
            noise = tokens.SampleNoise(range(len(labels)), _seed(self.seed, step, 0x5DE),
                                       device=self.device)
            token_ro = sample_token_rollout(self.policy, self.token_sampling, labels, noise,
                                            cfg.cfg_scale, for_rl=True)
            ro, final = token_ro, token_ro.codes
        else:
            gen = torch.Generator(device=self.device).manual_seed(_seed(self.seed, step, 0x5DE))
            ro = rollout(self.policy, labels, steps=cfg.train_steps, noise_level=cfg.noise_level,
                         cfg_scale=cfg.cfg_scale, generator=gen)
            final = ro.final
        rewards, parts = self.reward(self.decode(final), labels_np)
        adv_np, valid_np = group_advantages(rewards, cfg.group_size, cfg.adv_clip,
                                            cfg.advantage, cfg.adv_std_floor)
        adv = torch.from_numpy(adv_np).float().to(self.device)
        valid = torch.from_numpy(valid_np).to(self.device)

        # Timestep subsets come from a CPU generator: they index, they are not sampled noise.
        cpu_gen = torch.Generator().manual_seed(_seed(self.seed, step, 0x7135))
        sums: dict[str, float] = {}
        grad_norms = []
        passes = 0
        extremes = {"log_ratio_min": np.inf, "log_ratio_max": -np.inf}
        for _ in range(cfg.inner_epochs):
            if self.token_sampling is None:
                chosen = trained_steps(len(labels), cfg.train_steps, cfg.timestep_fraction,
                                       cpu_gen, cfg.timestep_choice).to(self.device)  # (N, m)
            else:  # token GRPO scores every code of a rollout in one pass
                chosen = torch.zeros((len(labels), 1), dtype=torch.long, device=self.device)
            # Minibatches of trajectories, in a fresh order each pass; one optimizer step each.
            order = (torch.randperm(len(labels), generator=cpu_gen) if cfg.minibatches > 1
                     else torch.arange(len(labels))).to(self.device)
            for rows in torch.tensor_split(order, cfg.minibatches):
                self.optimizer.zero_grad(set_to_none=True)
                passes += chosen.shape[1]
                sub_ro = ro.select(rows)
                for j in range(chosen.shape[1]):
                    loss, stats = self.objective(sub_ro, chosen[rows, j], adv[rows],
                                                 valid[rows])
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"rl loss is {loss.item()} at update {step}")
                    # The mean over trained steps, as one accumulated gradient (Flow-GRPO/DDPO).
                    (loss / chosen.shape[1]).backward()
                    for key, value in stats.items():
                        if key in ("log_ratio_min", "log_ratio_max"):
                            pick = min if key.endswith("min") else max
                            extremes[key] = pick(extremes[key], float(value))
                        else:
                            sums[key] = sums.get(key, 0.0) + float(value)
                grad_norms.append(float(clip_gradients(self.policy.parameters(), cfg.grad_clip)))
                self.optimizer.step()
        self.ema.update()  # once per update, whatever the optimizer steps: rl.ema_decay's unit
        row = {key: value / passes for key, value in sums.items()}
        row.update(extremes)
        groups = rewards.reshape(-1, cfg.group_size)
        row.update({"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                    "group_std": float(groups.std(1).mean()),
                    "zero_spread": float(1.0 - valid_np.mean()),
                    "adv_abs_mean": float(np.abs(adv_np).mean()),
                    "grad_norm": float(np.mean(grad_norms))})
        row.update({f"reward/{name}": value for name, value in parts.items()})
        return row


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def fine_tune(tuner: FineTuner, cfg: RLConfig, ckpt_dir: Path, fingerprint: str,
              evaluate_ema: Callable[[], dict[str, float]], tracker: Tracker,
              before: dict[str, float] | None = None, prefix: str = "") -> FineTuneResult:
    """Run (or resume, or return a finished) fine-tuning to cfg.steps updates.

    `evaluate_ema()` -> metrics of the current EMA policy; it runs before the first update
    (step 0; unless `before` gives the base model's, as another seed measured them) and every
    eval_every updates except the last (the stage evaluates the end itself). Every row reaches
    the tracker, earlier attempts' rows included, its keys prefixed by `prefix`.
    """
    started = time.perf_counter()
    name = f"rl seed {tuner.seed}"

    def track(row: dict[str, float]) -> None:
        tracker.log_metrics({prefix + k: v for k, v in row.items() if k != "step"},
                            step=int(row["step"]))

    start, history = tuner.resume(ckpt_dir, fingerprint)
    for row in history:
        track(row)
    if start >= cfg.steps:
        log.info("%s: %s already holds update %d of %d; nothing to train", name, ckpt_dir,
                 start, cfg.steps)
    elif start:
        log.info("%s: resuming from update %d in %s", name, start, ckpt_dir)
    if not history:
        row = {"step": 0, **{f"eval/{k}": v for k, v in (before or evaluate_ema()).items()}}
        history.append(row)
        track(row)
        log.info("rl base model: reward %.4f, gFD-eval %.3f, evaluator accuracy %.4f",
                 row["eval/reward_mean"], row["eval/gfd_eval"], row["eval/eval_accuracy"])

    loop_start = time.perf_counter()
    for step in range(start + 1, cfg.steps + 1):
        row = {"step": step, **tuner.update(step), "lr": cfg.lr}
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            row.update({f"eval/{k}": v for k, v in evaluate_ema().items()})
        history.append(row)
        track(row)
        eta = (time.perf_counter() - loop_start) / (step - start) * (cfg.steps - step)
        log.info("%s step %d/%d reward %.4f (std %.3f) kl %.5f clip %.3f zero-spread %.2f%s "
                 "ETA %s", name, step, cfg.steps, row["reward_mean"], row["reward_std"], row["kl"],
                 row["clip_fraction"], row["zero_spread"],
                 f" | eval reward {row['eval/reward_mean']:.4f} gFD-eval "
                 f"{row['eval/gfd_eval']:.3f} acc {row['eval/eval_accuracy']:.3f}"
                 if "eval/reward_mean" in row else "", _format_eta(eta))
        if step % cfg.save_every == 0 or step == cfg.steps:
            tuner.save(ckpt_dir, step, fingerprint, history)
    seconds = time.perf_counter() - loop_start
    done = cfg.steps - start
    rollouts = done * cfg.classes_per_step * cfg.group_size
    return FineTuneResult(history=history, resumed_from=start,
                          seconds=time.perf_counter() - started,
                          rollouts_per_s=rollouts / seconds if done else 0.0)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def run_fingerprint(cfg: RLConfig, seed: int, inputs: dict[str, Any]) -> str:
    """What must match for a checkpoint of RL seed `seed` to be resumed: rl params (less
    bookkeeping and the other seeds), the seed, the inputs."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in BOOKKEEPING_FIELDS and k != "seeds"}
    return json.dumps({"rl": fields, "seed": seed, "inputs": inputs}, sort_keys=True,
                      default=str)


def curve_csv(history: list[dict[str, float]]) -> str:
    """One row per update: the training curve plus the evaluation columns where evaluated."""
    header = ["step", *CURVE_COLUMNS, *(f"eval_{c}" for c in EVAL_COLUMNS)]
    lines = [",".join(header)]
    for row in history:
        if row["step"] < 1:
            continue
        cells = [str(int(row["step"]))] + [f"{row[c]:.6g}" for c in CURVE_COLUMNS]
        cells += [f"{row[f'eval/{c}']:.6f}" if f"eval/{c}" in row else "" for c in EVAL_COLUMNS]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def stage_metrics(before: dict[str, float], after: dict[str, float],
                  history: list[dict[str, float]], samples: int) -> dict[str, float]:
    """Deterministic DVC metrics: before/after on the fixed sample of `samples` images (FD
    depends on the count: the generator and evaluate stages measure at theirs) and the end of
    training."""
    m: dict[str, float] = {}
    for key in COMPARED:
        m[f"before_{key}"], m[f"after_{key}"] = before[key], after[key]
    m["reward_gain"] = after["reward_mean"] - before["reward_mean"]
    m["eval_accuracy_gain"] = after["eval_accuracy"] - before["eval_accuracy"]
    m["gfd_change_ratio"] = after["gfd_eval"] / max(before["gfd_eval"], 1e-9)
    updates = [r for r in history if r["step"] >= 1]
    last = updates[-1]
    m.update({"final_kl": last["kl"], "final_train_reward_mean": last["reward_mean"],
              "final_clip_fraction": last["clip_fraction"],
              "mean_zero_spread": float(np.mean([r["zero_spread"] for r in updates])),
              "updates": float(len(updates)),
              "eval_samples": float(samples)})  # last: the run tables show the first four
    return {k: round(float(v), 6) for k, v in m.items()}


# Per-seed keys of the DVC metrics (the first seed's are the unprefixed ones), and the means
# over all seeds of the gains.
SEED_KEYS = ("after_reward_mean", "after_eval_accuracy", "after_gfd_eval", "after_diversity",
             "reward_gain", "eval_accuracy_gain", "gfd_change_ratio")
SEED_MEANS = ("reward_gain", "eval_accuracy_gain", "gfd_change_ratio")


def seeds_metrics(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """`seed<n>_<key>` for every seed after the first, and `seeds_mean_<gain>` over all."""
    seeds = list(per_seed)
    m = {f"seed{s}_{k}": per_seed[s][k] for s in seeds[1:] for k in SEED_KEYS}
    if len(seeds) > 1:
        m.update({f"seeds_mean_{k}": round(float(np.mean([per_seed[s][k] for s in seeds])), 6)
                  for k in SEED_MEANS})
    return m


@dataclass
class SeedResult:
    """One seed's fine-tuned model and what the stage writes about it."""

    seed: int
    model: GeneratorModel
    meta: dict[str, Any]
    csv: str
    grid: np.ndarray
    metrics: dict[str, float]


def seed_folder(seed: int) -> str:
    """Where an RL seed after the first is written, relative to the rl folder."""
    return f"{SEEDS_DIR}/seed_{seed}"


def _weights(model: GeneratorModel) -> dict[str, torch.Tensor]:
    """A model's tensors as safetensors stores them (contiguous)."""
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _write_generator(folder: Path, r: SeedResult) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.save_weights(_weights(r.model), folder / WEIGHTS)
    storage.write_bytes_atomic(folder / META, json.dumps(r.meta, indent=2, sort_keys=True).encode())
    storage.write_bytes_atomic(folder / "train_curve.csv", r.csv.encode())
    save_png(r.grid, folder / "samples.png")


def save_outputs(out_dir: Path, plot_file: Path, results: list[SeedResult]) -> str:
    """Write the generator-format folder (the first seed; the others under seeds/) in one
    swap, then the first seed's plot CSV; the first seed's weights' sha256."""
    with storage.atomic_dir(out_dir) as tmp:
        _write_generator(tmp, results[0])
        for r in results[1:]:
            _write_generator(tmp / seed_folder(r.seed), r)
    storage.write_bytes_atomic(plot_file, results[0].csv.encode())
    return storage.sha256_file(out_dir / WEIGHTS)


@dataclass(frozen=True)
class InputDirs:
    """Where the stage's inputs live (a worker process loads them again from here)."""

    generator: Path
    tokenizer: Path
    judge: Path
    prepared: Path
    evaluator: Path
    decoder: Path


@dataclass
class Inputs:
    """Everything a seed's fine-tuning reads, loaded once per process."""

    params: Params
    base: GeneratorHandle
    judge: JudgeScorer
    evaluator: JudgeScorer
    reward: Reward
    es: EvalSet
    device: torch.device
    prepared_sha: str
    decoder_sha: str | None
    fingerprint_inputs: dict[str, Any]

    def decode(self, z: torch.Tensor) -> np.ndarray:
        """Final rollout latents (flow, normalised) or codes (maskgit, ar) -> uint8 images."""
        tok = self.base.tokenizer
        if self.base.kind in TOKEN_KINDS:
            with torch.no_grad():
                return tok.decode(tok.model.codes_to_latents(z.detach().cpu()).float().numpy())
        return tok.decode((z.detach().cpu() * self.base.scale + self.base.shift).numpy())

    @property
    def base_meta(self) -> dict[str, Any]:
        return {k: v for k, v in self.base.meta.items() if k != "sha256"}


def load_inputs(params: Params, dirs: InputDirs, es: EvalSet | None = None) -> Inputs:
    """Load base generator (with the post-trained decoder where there is one), judge, evaluator
    and data; unknown or unimportable rewards fail here, early. `es`: the evaluation set where
    the stage's process made it (a worker then does not score the train split again)."""
    base = load_generator(dirs.generator, dirs.tokenizer)
    apply_decoder(base.tokenizer, dirs.decoder)
    judge = load_judge(dirs.judge)
    evaluator = load_judge(dirs.evaluator)
    prepared = load_prepared(dirs.prepared, verify=True)
    train_x, train_y = prepared.split("train")
    # judge_density fits on the train split.
    reward = Reward(params.rl.rewards, judge, reference=(train_x, train_y))
    es = es or EvalSet(labels=flow.balanced_labels(len(base.class_names),
                                                   params.rl.eval_per_class).numpy(),
                       ref_features=evaluator.score(train_x)[0], seed=EVAL_SAMPLE_SEED,
                       steps=params.generator.sample_steps, sampler=params.generator.sampler,
                       cfg_scale=params.rl.cfg_scale)
    # Rollouts' rewards read decoded images: another decoder, another run (checkpoint key).
    decoder_sha = base.tokenizer.meta.get("decoder", {}).get("sha256")
    fingerprint_inputs = {"generator": base.meta["sha256"], "judge": judge.sha256,
                          "evaluator": evaluator.sha256, "tokenizer": base.tokenizer.sha256,
                          "prepared": prepared.manifest_sha256, "eval": es.protocol(),
                          "code": paths.code_sha256("rl"),
                          **({"decoder": decoder_sha} if decoder_sha else {})}
    return Inputs(params=params, base=base, judge=judge, evaluator=evaluator, reward=reward,
                  es=es, device=driver_device(params.compute, "RL fine-tuning"),
                  prepared_sha=prepared.manifest_sha256, decoder_sha=decoder_sha,
                  fingerprint_inputs=fingerprint_inputs)


class RowRecorder(Tracker):
    """The tracker of a seed trained in a worker process: its metric rows go back to the stage,
    which logs them to its MLflow run as soon as the seed is done."""

    def __init__(self) -> None:
        self.rows: list[tuple[dict[str, float], int | None]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.rows.append((dict(metrics), step))


@dataclass
class SeedRun:
    """One seed's fine-tuning, as the stage collects it."""

    result: SeedResult
    before: dict[str, float]
    seconds: float
    eval_seconds: float
    rollouts_per_s: float
    resumed_from: int


def train_seed(inp: Inputs, seed: int, prefix: str, tracker: Tracker,
               before: dict[str, float] | None, other_seeds: list[int] | None) -> SeedRun:
    """Fine-tune (or resume, or pick up the finished) seed `seed` and evaluate its EMA model on
    the fixed sample. `prefix` starts its MLflow keys; `before` is the base model's numbers on
    that sample where another seed measured them; `other_seeds`: the first seed's meta lists
    the others (None for the others)."""
    cfg, base, tok = inp.params.rl, inp.base, inp.base.tokenizer
    base_sha, base_meta = base.meta["sha256"], inp.base_meta
    tuner = FineTuner(cfg, seed, base.model, inp.reward, inp.decode, inp.device,
                      base.meta.get("sampling") if base.kind in TOKEN_KINDS else None)
    key = hashlib.sha256((f"{base_sha}\n{inp.reward.definition()}\n{seed}"
                          + (f"\n{inp.decoder_sha}" if inp.decoder_sha else "")).encode()
                         ).hexdigest()

    def evaluate_ema() -> dict[str, float]:
        return evaluate(tuner.ema_model(), base_meta, tok, inp.evaluator, inp.reward, inp.es)[0]

    result = fine_tune(tuner, cfg, paths.checkpoint_dir("rl", key),
                       run_fingerprint(cfg, seed, inp.fingerprint_inputs), evaluate_ema, tracker,
                       before=before, prefix=prefix)
    # The base model's numbers on the shared sample (measured once, or handed in).
    before = {k.removeprefix("eval/"): v for k, v in result.history[0].items() if k != "step"}
    started = time.perf_counter()
    model = tuner.ema_model()
    after, images = evaluate(model, base_meta, tok, inp.evaluator, inp.reward, inp.es)
    eval_seconds = time.perf_counter() - started
    result.history[-1].update({f"eval/{k}": v for k, v in after.items()})
    tracker.log_metrics({f"{prefix}eval/{k}": v for k, v in after.items()}, step=cfg.steps)
    meta = copy.deepcopy(base_meta)
    # Sampled as RL evaluated it (its rollout CFG), not as the base was.
    meta["sample_defaults"] = sampling_record(inp.es.steps, inp.es.sampler, inp.es.cfg_scale)
    meta["rl"] = {"base_generator_sha256": base_sha, "judge_sha256": inp.judge.sha256,
                  "evaluator_sha256": inp.evaluator.sha256, "tokenizer_sha256": tok.sha256,
                  "reward": inp.reward.definition(), "params": dataclasses.asdict(cfg),
                  "seed": seed, "eval_protocol": inp.es.protocol(), "eval_before": before,
                  "eval_after": after, "base_generator_metrics": base.meta.get("metrics", {}),
                  "decoder_sha256": inp.decoder_sha}
    if other_seeds is not None:  # the first seed's folder lists the others (evaluate reads it)
        # A list, in rl.seeds order (a mapping would be key-sorted by the JSON writer).
        meta["rl"]["other_seeds"] = [[s, seed_folder(s)] for s in other_seeds]
    # "metrics" describes this model; the base's own stage metrics move to rl.
    meta["metrics"] = {k: round(v, 6) for k, v in after.items()}
    # Likewise "training": the RL loop updates in fp32, uncompiled, whatever the base's was.
    meta["training"] = {"precision": "fp32", "compile": False}
    seed_result = SeedResult(seed, model, meta, curve_csv(result.history),
                             class_grid(images, inp.es.labels, base.class_names),
                             stage_metrics(before, after, result.history, len(inp.es.labels)))
    m = seed_result.metrics
    log.info("rl seed %d: reward %.4f -> %.4f, evaluator accuracy %.4f -> %.4f, gFD-eval "
             "%.3f -> %.3f (x%.2f, %d samples), final KL %.5f", seed, m["before_reward_mean"],
             m["after_reward_mean"], m["before_eval_accuracy"], m["after_eval_accuracy"],
             m["before_gfd_eval"], m["after_gfd_eval"], m["gfd_change_ratio"],
             m["eval_samples"], m["final_kl"])
    return SeedRun(seed_result, before, result.seconds, eval_seconds, result.rollouts_per_s,
                   result.resumed_from)


def _train_seed_in_worker(params: Params, dirs: InputDirs, es: EvalSet, seed: int, prefix: str,
                          other_seeds: list[int] | None) -> tuple[SeedRun, bytes, list[Any]]:
    """`train_seed` in a worker process (procs.map_processes): the model travels back as
    safetensors bytes, the metric rows for the stage to log."""
    recorder = RowRecorder()
    run_ = train_seed(load_inputs(params, dirs, es), seed, prefix, recorder, None, other_seeds)
    model, run_.result.model = run_.result.model, None  # type: ignore[assignment]
    weights = safetensors_save(_weights(model))
    return run_, weights, recorder.rows


def seed_processes(params: Params, device: torch.device) -> tuple[int, int]:
    """(processes, threads each) for rl.seeds: compute.parallel_seeds, or on its auto (0) one
    process per seed up to twice the CPU count, sharing the CPUs; one on a GPU. The CPUs: this
    process's affinity mask, or fewer where its thread count says so (OMP_NUM_THREADS=4 for
    one of 4 `dvc queue` jobs on 16 cores means 4).

    Twice: the models are small enough that a second thread adds little (8% per RL update on
    2 cores), so 3 seeds on 2 CPUs run best all at once, 1 thread each (time-sliced, which
    single-threaded processes take without spinning), not 2 and then 1 beside an idle CPU."""
    seeds, cpus = len(params.rl.seeds), min(procs.available_cpus(), torch.get_num_threads())
    wanted = params.compute.parallel_seeds or (1 if device.type != "cpu" else 2 * cpus)
    processes = max(1, min(seeds, wanted))
    return processes, max(1, cpus // processes)


def run(params: Params, out_dir: str | Path = paths.RL,
        generator_dir: str | Path = paths.GENERATOR, tokenizer_dir: str | Path = paths.TOKENIZER,
        judge_dir: str | Path = paths.JUDGE, prepared_dir: str | Path = paths.PREPARED,
        plot_file: str | Path = paths.PLOTS / "rl_reward.csv",
        tracker: Tracker | None = None, evaluator_dir: str | Path | None = None,
        decoder_dir: str | Path | None = None) -> StageResult:
    """Fine-tune against the judge's reward, once per rl.seeds entry (side by side in worker
    processes where compute.parallel_seeds allows); the evaluator (default: the folder
    `evaluator` beside `judge_dir`) grades the fixed evaluation sample. Rollouts decode with
    the posttrain stage's decoder where it post-trained one (default: the folder `decoder`
    beside `tokenizer_dir`), else with the tokenizer's."""
    cfg: RLConfig = params.rl
    tracker = tracker or Tracker()
    dirs = InputDirs(
        generator=Path(generator_dir).resolve(), tokenizer=Path(tokenizer_dir).resolve(),
        judge=Path(judge_dir).resolve(), prepared=Path(prepared_dir).resolve(),
        evaluator=Path(evaluator_dir or Path(judge_dir).parent / "evaluator").resolve(),
        decoder=Path(decoder_dir or Path(tokenizer_dir).parent / "decoder").resolve())
    inp = load_inputs(params, dirs)
    base, tok = inp.base, inp.base.tokenizer
    base_sha = base.meta["sha256"]
    tracker.log_input("generator", str(dirs.generator), base_sha, context="base_model")
    tracker.log_input("judge", str(dirs.judge), inp.judge.sha256, context="reward")
    tracker.log_input("evaluator", str(dirs.evaluator), inp.evaluator.sha256,
                      context="evaluation")
    tracker.log_input("tokenizer", str(dirs.tokenizer), tok.sha256, context="decoder")
    if "decoder" in tok.meta:
        tracker.log_input("decoder", str(dirs.decoder), tok.meta["decoder"]["sha256"],
                          context="decoder")
    tracker.log_input("prepared", str(dirs.prepared), inp.prepared_sha, context="evaluation")

    # MLflow keys: the first seed's plain, the others' under seed<n>/.
    prefixes = ["" if i == 0 else f"seed{seed}/" for i, seed in enumerate(cfg.seeds)]
    others: list[list[int] | None] = [list(cfg.seeds[1:])] + [None for _ in cfg.seeds[1:]]
    processes, threads = seed_processes(params, inp.device)
    runs: list[SeedRun] = []
    started = time.perf_counter()
    if processes > 1:
        log.info("rl: %d seeds, %d at a time in worker processes of %d thread(s) each",
                 len(cfg.seeds), processes, threads)

        def collect(_: int, outcome: tuple[SeedRun, bytes, list[Any]]) -> None:
            """As each seed ends: its rows to MLflow (a later failure keeps them), its model."""
            run_, weights, rows = outcome
            for metrics, step in rows:
                tracker.log_metrics(metrics, step=step)
            model = build_model(base.model.cfg)
            model.load_state_dict(safetensors_load(weights))
            run_.result.model = model.eval()

        jobs = [(params, dirs, inp.es, seed, prefix, other)
                for seed, prefix, other in zip(cfg.seeds, prefixes, others, strict=True)]
        runs = [outcome[0] for outcome in procs.map_processes(
            _train_seed_in_worker, jobs, processes, threads,
            names=[f"rl seed {seed}" for seed in cfg.seeds], on_result=collect)]
    else:
        before: dict[str, float] | None = None
        for i, (seed, prefix, other) in enumerate(zip(cfg.seeds, prefixes, others,
                                                      strict=True)):
            log.info("rl: seed %d (%d of %d)", seed, i + 1, len(cfg.seeds))
            runs.append(train_seed(inp, seed, prefix, tracker, before, other))
            before = runs[-1].before  # measured once, for every seed
    wall_seconds = time.perf_counter() - started
    results = [r.result for r in runs]
    seconds = sum(r.seconds for r in runs)  # each seed's own, summed
    eval_seconds = sum(r.eval_seconds for r in runs)
    rollouts_per_s = [r.rollouts_per_s for r in runs if r.rollouts_per_s]  # 0: already done
    resumed_from = [r.resumed_from for r in runs]

    weights_sha = save_outputs(Path(out_dir), Path(plot_file), results)
    for name in (META, "samples.png"):
        tracker.log_artifact(Path(out_dir) / name)
    # Its own registered model (the first seed's): the base generator's versions stay one
    # kind of model; the other seeds travel in the same folder, under seeds/.
    # It decodes as it was fine-tuned: with the post-trained decoder where there was one.
    decoder_sha = inp.decoder_sha
    tracker.log_model("generator", out_dir, registered_name=REGISTERED_MODELS["rl"].name,
                      artifacts={"tokenizer_dir": Path(tokenizer_dir),
                                 **({"decoder_dir": dirs.decoder} if decoder_sha else {})},
                      tags={"stage": "rl", "prepared_sha256": inp.prepared_sha,
                            "cache_key": base.meta.get("cache_key", ""),
                            "base_generator_sha256": base_sha, "judge_sha256": inp.judge.sha256,
                            "evaluator_sha256": inp.evaluator.sha256,
                            "tokenizer_sha256": tok.sha256, "reward": inp.reward.definition(),
                            "rl_seeds": ",".join(map(str, cfg.seeds)),
                            "weights_sha256": weights_sha,
                            **({"decoder_sha256": decoder_sha} if decoder_sha else {})})
    m = {**results[0].metrics, **seeds_metrics({r.seed: r.metrics for r in results})}
    first = results[0].meta["rl"]
    table = "\n".join(f"| {k} | {first['eval_before'][k]:.4g} | "
                      + " | ".join(f"{r.meta['rl']['eval_after'][k]:.4g}" for r in results)
                      + " |" for k in COMPARED)
    method = "GRPO over tokens" if base.kind in TOKEN_KINDS else "Flow-GRPO"
    summary = (f"{method} ({base.kind} generator) on `{inp.reward.definition()}`, {cfg.steps} "
               f"updates of {cfg.classes_per_step}x{cfg.group_size} rollouts per seed; fixed "
               f"sample of {len(inp.es.labels)} (the same for every seed)\n\n| metric | before | "
               + " | ".join(f"after, seed {r.seed}" for r in results) + " |\n|---|---|"
               + "---|" * len(results) + f"\n{table}")
    return StageResult(
        metrics=m, summary=summary, digests={"rl": weights_sha},
        timings={"seconds": seconds, "wall_seconds": wall_seconds,
                 "seed_processes": float(processes),
                 "rollouts_per_s": float(np.mean(rollouts_per_s)) if rollouts_per_s else 0.0,
                 "eval_seconds": eval_seconds, "resumed_from_step": resumed_from[0],
                 "resumed_from_step_min": min(resumed_from)})


def run_stage(params: Params, tracker: Tracker) -> StageResult:
    return run(params, tracker=tracker)
