"""The RL loop: placement, rollout, reward, logprobs, advantages, update, sync, log, checkpoint.

`train(cfg)` reads top to bottom as one iteration does. The pieces live beside it: `setup.py` builds the run
(models, optimizers, data, engines), `ppo.py` the compiled passes and steps, `experience.py` the batch layout.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from tqdm import trange

from shared.config import Config
from shared.records import SamplingSpec

from .experience import make_experience
from .ppo import partition
from .rl.advantages import compute_advantages
from .rl.kl import approx_kl
from .setup import Run, build_run


def train(cfg: Config, resume: bool = False) -> dict:
    run: Run = build_run(cfg, resume=resume)  # Ray, engines, learner state, data, reward workers, logger
    r, t = cfg.rollout, cfg.train
    n = r.n_samples_per_prompt
    bar = trange(run.iteration, run.total_rollouts, desc=cfg.name, initial=run.iteration, total=run.total_rollouts)
    last: dict = {}
    for it in bar:
        timer = run.new_timer()
        # 1. rollout: n samples per prompt from the engines, which hold policy version `run.version`
        rows = run.sampler.take(r.rollout_batch_size)
        with timer("generate"):
            prompts = run.rollout.prompts([run.row_record(row, it, k) for k, row in enumerate(rows)])
            sampling = SamplingSpec(n=n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                    max_tokens=r.generate_max_len, seed=run.sampling_seed(it))  # fmt: skip
            groups, vision = run.rollout.generate(prompts, sampling)
        # 2. reward: rules on the decoded responses
        with timer("reward"):
            scores = run.scorer.score([s.text for g in groups for s in g], [p.label for p in prompts for _ in range(n)])
        exp = make_experience(groups, vision, np.array([s.total for s in scores]))
        # 3. old policy, reference and critic passes, on the partition the first update will use
        order = run.rng.permutation(exp.size)
        parts = partition(order, run.micro_batch)
        with timer("logprobs"):
            old_logp = run.old_logprobs(exp, parts)
            ref_logp = run.ref_logprobs(exp, parts)
            values = run.learner.value_pass(run.critic.params, exp, parts) if cfg.uses_critic else None
        mask = exp.action_mask_BL
        kl = approx_kl(old_logp, ref_logp, mask, cfg.algo.kl_estimator) if ref_logp is not None else np.zeros_like(mask)
        # 4. advantages
        adv, returns = compute_advantages(cfg.algo, jnp.asarray(exp.rewards_B), jnp.asarray(kl), jnp.asarray(mask),
                                          None if values is None else jnp.asarray(values), n_samples=n,
                                          kl_coef=run.kl_ctl.value)  # fmt: skip
        adv, returns = np.asarray(adv), np.asarray(returns)
        # 5. update: critic then actor, PPO epochs over train batches of micro-batches
        with timer("update"):
            stats = run.update(exp, order, old_logp, ref_logp, adv, values, returns)
        # 6. sync: push the new policy into the engines, verified
        with timer("sync"):
            sync = run.push_weights(it)
        # 7. log and checkpoint
        kl_mean = float((kl * mask).sum() / max(mask.sum(), 1))
        run.kl_ctl.update(kl_mean, exp.size)
        last = run.log(it, timer, exp, scores, {**stats, **sync}, kl_mean, old_logp)
        bar.set_postfix(reward=f"{last['reward/mean']:.3f}", acc=f"{last['reward/accuracy']:.2f}")
        if (it + 1) % t.save_steps == 0 or it + 1 == run.total_rollouts:
            run.save(it + 1)
        if t.eval_steps and (it + 1) % t.eval_steps == 0:
            run.evaluate(it + 1)
    run.finish()
    return last
