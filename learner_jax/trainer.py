"""The RL loop: placement, rollout, reward, logprobs, advantages, update, sync, log, checkpoint.

`train(cfg)` reads top to bottom as one iteration does; with `rollout.max_staleness` k > 0 the engines generate
the next k iterations meanwhile (`rollouts.py`), and with `rollout.colocate` they sleep while the learner works.
The pieces live beside it: `setup.py` builds the run once and holds the loop's state, `learner.py` the compiled
passes and steps, `experience.py` the batch layout.
Under several learner processes (`launch.py`) every process runs this loop; process 0 (`run.leader`) alone
generates, scores, logs, evaluates and shows progress, and shares the rollout with the others (`run.share`).
"""
from __future__ import annotations

import jax
import numpy as np
from tqdm import trange

from shared.config import Config

from .experience import make_experience
from .learner import group_permutation
from .rollouts import RolloutQueue
from .metrics import progress_postfix, sample_rows
from .setup import build_run


def train(cfg: Config, resume: bool = False) -> dict:
    run, state = build_run(cfg, resume=resume)  # once: Ray, engines, compiled learner, scorer, logger; state: the rest
    r, t = cfg.rollout, cfg.train
    n = r.n_samples_per_prompt
    queue = RolloutQueue(run, state)  # rollout.max_staleness k: the engines generate up to k iterations ahead
    bar = trange(state.iteration, run.total_rollouts, desc=cfg.name, initial=state.iteration, total=run.total_rollouts,
                 disable=not run.leader)  # fmt: skip
    last: dict = {}
    for it in bar:
        timer = run.new_timer()
        # 1. rollout: n samples per prompt from the engines, at most k policy versions old
        with timer("generate"):  # the learner's wait; the engines' own time is batch.engine_seconds
            batch = queue.take(it)
        if r.colocate:
            with timer("sleep"):
                if run.leader:
                    run.rollout.sleep(r.sleep_level)  # the learner's phases get the engines' memory
                run.place_state(state, "device")  # back from host memory (train.offload_between_phases)
        # 2. reward: rules on the decoded responses
        scores = None
        if run.leader:
            with timer("reward"):
                scores = run.scorer.score([s.text for g in batch.groups for s in g],
                                          [p.label for p in batch.prompts for _ in range(n)])  # fmt: skip
            if t.log_samples and run.logger is not None:
                run.logger.log_samples(it, sample_rows(batch.prompts, batch.groups, scores, t.log_samples))
        groups, vision, scores = run.share(batch.groups, batch.vision, scores)  # to the other learner processes
        exp = make_experience(groups, vision, np.array([s.total for s in scores]), r.generate_max_len)
        # 3. old policy, reference and critic passes on the first update's partition (groups shuffled, kept whole)
        perm = group_permutation(state.rng, exp.size, n)
        batches = run.batches(exp)  # each micro-batch built and placed once, reused by every pass
        with timer("logprobs"):
            arrays = {**run.learner.per_sample(exp), **run.passes(state, batches, perm)}
            # 4. KL and advantages, one compiled function
            kl, arrays["adv_BL"], arrays["returns_BL"], kl_mean = run.learner.kl_and_advantages(
                arrays["rewards_B"], arrays["mask_BL"], arrays["old_logp_BL"], arrays["ref_logp_BL"],
                arrays["values_BL"], state.kl_ctl.value)  # fmt: skip
            jax.block_until_ready(arrays)  # the passes run asynchronously: charge their time to this phase
        # 5. update: critic then actor, PPO epochs over train batches of micro-batches
        with timer("update"):
            stats = run.update(state, batches, perm, arrays)
        # 6. sync: push the new policy into the engines (behind any generation already submitted), verified
        if r.colocate and run.leader:
            with timer("wake"):
                run.rollout.wake()  # before the push: level 2 discarded the weights it now refills
        with timer("sync"):
            sync = run.push_weights(state, it)
        # 7. log and checkpoint
        kl_mean = float(kl_mean)
        state.kl_ctl.update(kl_mean, exp.size)
        state.iteration = it + 1
        overlap = queue.overlap(batch, timer) if run.leader else {}
        last = run.log(state, it, timer, exp, scores, {**stats, **sync, **overlap}, kl_mean)
        bar.set_postfix(progress_postfix(last))
        if (it + 1) % t.save_steps == 0 or it + 1 == run.total_rollouts:
            run.save(state)
        if t.eval_steps and (it + 1) % t.eval_steps == 0:
            run.evaluate(it + 1)  # process 0's engines only
        if r.colocate and it + 1 < run.total_rollouts:
            run.place_state(state, "pinned_host")  # the engines generate next: free the devices for them
    run.finish(state)
    return last
