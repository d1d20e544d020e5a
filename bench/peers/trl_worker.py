"""TRL side of bench/peers/trl_grpo.py; runs inside the TRL venv, not the project's.

Trains `--iterations` GRPO steps with TRL's GRPOTrainer on one demo data file and writes per-iteration phase
times (seconds) as {"iterations": [{phase: s}], "info": {...}}. Timers wrap TRL's own methods through a subclass
that only calls super(), so TRL's behaviour is unchanged.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # shared.rewards, shared.data and rollout_torch.processing need only numpy/PIL/etc.

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.data_utils import prepare_multimodal_messages  # noqa: E402

from rollout_torch.processing import load_processor  # noqa: E402
from shared.data import load_rows  # noqa: E402
from shared.rewards.lmmr1 import lmmr1_math  # noqa: E402

PHASES = ("generate", "logprobs", "reward", "update")


def to_trl_row(messages: list[dict], label: str, image_paths: list[str]) -> dict:
    """An LMM-R1 row as a TRL conversational row: every content a list of {type, text} blocks (one Arrow schema),
    image items as placeholders that TRL fills from the `images` column in order."""
    prompt = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        else:
            content = [{"type": "image", "text": None} if it.get("type") == "image" or "image" in it
                       else {"type": "text", "text": it["text"]} for it in content]  # fmt: skip
        prompt.append({"role": m["role"], "content": content})
    row: dict[str, Any] = {"prompt": prompt, "answer": label}
    if image_paths:
        row["images"] = [Image.open(p).convert("RGB") for p in image_paths]
    return row


def lmmr1_reward(completions: list, answer: list[str], **_: Any) -> list[float]:
    """The project's rule reward on the decoded completion, as our trainer scores `Sample.text`."""
    return [lmmr1_math(c[0]["content"], a).total for c, a in zip(completions, answer, strict=True)]


class TimedGRPOTrainer(GRPOTrainer):
    """Adds up wall time per phase; every override only times a call to super()."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.phase: dict[str, float] = defaultdict(float)
        self.last_step_end = 0.0
        super().__init__(*args, **kwargs)

    @contextmanager
    def clock(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phase[name] += time.perf_counter() - t

    def _generate(self, prompts):  # chat template + processor + HF generate + decode
        with self.clock("generate"):
            return super()._generate(prompts)

    def _get_per_token_logps_and_entropies(self, model, *args: Any, **kwargs: Any):
        if torch.is_grad_enabled():  # the policy forward of the loss: part of "update"
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        with self.clock("logprobs"):  # no-grad passes: the reference model (and old policy, if TRL needs one)
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    def _calculate_rewards(self, *args: Any, **kwargs: Any):
        with self.clock("reward"):
            return super()._calculate_rewards(*args, **kwargs)

    def _prepare_inputs(self, *args: Any, **kwargs: Any):  # generation and scoring, run inside training_step
        with self.clock("prepare"):
            return super()._prepare_inputs(*args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any):
        with self.clock("training_step"):
            out = super().training_step(*args, **kwargs)
        self.last_step_end = time.perf_counter()
        return out


class IterationClock(TrainerCallback):
    """Closes an iteration at each optimizer step (one per iteration by construction)."""

    def __init__(self, trainer: TimedGRPOTrainer):
        self.trainer, self.iterations, self.start = trainer, [], 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now, p = time.perf_counter(), self.trainer.phase
        # update = forward+backward of the micro-batches (training_step minus the generation inside it) plus the
        # clip/optimizer/scheduler tail after the last micro-batch.
        row = {k: p[k] for k in ("generate", "logprobs", "reward")}
        row["update"] = p["training_step"] - p["prepare"] + (now - self.trainer.last_step_end)
        row["total"] = now - self.start
        row["other"] = row["total"] - sum(row[k] for k in PHASES)  # processor for the loss, advantages, data
        self.iterations.append(row)
        self.start = now
        p.clear()


def check_template(processor, rows, dataset: Dataset) -> None:
    """TRL's rendering of the first prompt must equal ours (processing.messages_to_prompt: the checkpoint's
    template on the raw LMM-R1 messages)."""
    ex = dataset[0]
    trl_text = processor.apply_chat_template(prepare_multimodal_messages(ex["prompt"], ex.get("images")),
                                             tokenize=False, add_generation_prompt=True)  # fmt: skip
    ours = processor.apply_chat_template(rows[0].messages, tokenize=False, add_generation_prompt=True)
    if trl_text != ours:
        raise SystemExit(f"chat template mismatch:\nTRL:  {trl_text!r}\nours: {ours!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    # Only the rows the run draws (16 per iteration): the rest would only slow the start.
    rows = load_rows(a.data, max_rows=a.prompts * a.iterations)
    dataset = Dataset.from_list([to_trl_row(r.messages, r.label, r.image_paths) for r in rows])
    processor = load_processor(a.model)
    check_template(processor, rows, dataset)

    batch = a.prompts * a.samples
    if batch % a.micro_batch:
        raise SystemExit(f"{a.prompts} x {a.samples} samples is not a multiple of micro-batch {a.micro_batch}")
    args = GRPOConfig(
        output_dir=a.workdir, max_steps=a.iterations, seed=a.seed, use_cpu=True, bf16=False, fp16=False,
        model_init_kwargs={"dtype": torch.float32},
        # one optimizer step per iteration: 16 prompts x 16 samples = 4 micro-batches of 64, generated at once
        per_device_train_batch_size=a.micro_batch, gradient_accumulation_steps=batch // a.micro_batch,
        num_generations=a.samples, max_completion_length=a.max_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.001, learning_rate=1e-4, warmup_steps=0, lr_scheduler_type="constant",
        gradient_checkpointing=False,  # our demo runs without remat; TRL's default would recompute activations
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = TimedGRPOTrainer(model=a.model, reward_funcs=lmmr1_reward, args=args, train_dataset=dataset,
                               processing_class=processor)  # fmt: skip
    clock = IterationClock(trainer)
    trainer.add_callback(clock)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "reward" in h]  # sanity: the work matches ours
    info = {"reward_mean": [h["reward"] for h in logged], "torch_threads": torch.get_num_threads(),
            "completion_mean_length": [h["completions/mean_length"] for h in logged]}
    Path(a.out).write_text(json.dumps({"iterations": clock.iterations, "info": info}, indent=1))


if __name__ == "__main__":
    main()
