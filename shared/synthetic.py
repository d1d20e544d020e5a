"""Synthetic reasoning tasks in the LMM-R1 row format, with images drawn on disk.

Two families mirror the recipe's two stages: text-only arithmetic (FRE) and image questions (MGT: count the
shapes, add the numbers drawn in the picture, or count the shapes and add a number from the question, which needs
the perception of the first and the arithmetic FRE trains). Every row carries a worked `solution` in the
`<think>…</think><answer>…$\\boxed{…}$</answer>` form for warm-start SFT. With `slip` > 0, that share of the
solutions makes each typical mistake: the box holds the working's first number instead of its result, and one of
three or more squares is missed. Labels stay right, so a model imitating them has the right answer among
its samples but not always as its first choice, which is where rule-based RL helps. Splits use disjoint seeds.

    python -m shared.synthetic --out data/synth --train 512 --test 128
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LMMR1_SYSTEM_PROMPT = (
    "Solve the question. The user asks a question, and you solves it. You first thinks about the reasoning process "
    "in the mind and then provides the user with the answer. The answer is in latex format and wrapped in $...$. "
    "The final answer must be wrapped using the \\boxed{} command. The reasoning process and answer are enclosed "
    "within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> Since $1+1=2$, so the answer "
    "is $2$. </think><answer> The answer is $\\boxed{2}$ </answer>, which means assistant's output should start "
    "with <think> and end with </answer>.\n"
)
SHORT_SYSTEM_PROMPT = "Think in <think> </think>, then answer in <answer> </answer> with \\boxed{}."
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}


def _solution(steps: str, answer: int) -> str:
    return f"<think>{steps}</think><answer>The answer is $\\boxed{{{answer}}}$</answer>"


def _slips(rng: random.Random, slip: float, prone: bool = True) -> bool:
    # Draws only when slip > 0: with slip=0 the random stream, and so every row, is the plain generator's.
    return slip > 0 and prone and rng.random() < slip


def _boxed(rng: random.Random, result: int, first: int, slip: float) -> int:
    """The number a worked solution boxes: with probability `slip`, the working's first number, not its result."""
    return first if _slips(rng, slip) else result


def text_task(rng: random.Random, max_operand: int = 49, ops: str = "+-*", slip: float = 0.0) -> tuple[str, int, str]:
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    op = rng.choice(list(ops))
    if op == "*":
        a, b = rng.randint(2, min(12, max_operand)), rng.randint(2, 9)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}?", value, _solution(f"{a} {op} {b} = {value}", _boxed(rng, value, a, slip))


def _squares(rng: random.Random, size: int) -> tuple[str, int, Image.Image]:
    color = rng.choice(list(COLORS))
    k = rng.randint(1, 4)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cell = size // 2
    for slot in rng.sample(range(4), k):  # one shape per quadrant, so shapes never overlap
        x0, y0 = (slot % 2) * cell + 4, (slot // 2) * cell + 4
        draw.rectangle([x0, y0, x0 + cell - 8, y0 + cell - 8], fill=COLORS[color])
    return color, k, img


def _counted(rng: random.Random, k: int, slip: float) -> int:
    """The count a worked solution writes: with probability `slip`, one of three or more squares is missed."""
    return k - 1 if _slips(rng, slip, prone=k >= 3) else k


def count_task(
    rng: random.Random, size: int, max_operand: int = 49, slip: float = 0.0
) -> tuple[str, int, str, Image.Image]:
    color, k, img = _squares(rng, size)
    q = f"How many {color} squares are in the image?"
    seen = _counted(rng, k, slip)
    return q, k, _solution(f"I count {seen} {color} squares.", seen), img


def count_add_task(
    rng: random.Random, size: int, max_operand: int = 49, slip: float = 0.0
) -> tuple[str, int, str, Image.Image]:
    color, k, img = _squares(rng, size)
    b = rng.randint(1, max_operand)
    q = f"What is the number of {color} squares in the image plus {b}?"
    seen = _counted(rng, k, slip)
    steps = f"I count {seen} {color} squares. {seen} + {b} = {seen + b}"
    return q, k + b, _solution(steps, _boxed(rng, seen + b, seen, slip)), img


def sum_task(
    rng: random.Random, size: int, max_operand: int = 49, slip: float = 0.0
) -> tuple[str, int, str, Image.Image]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=size // 3)
    draw.text((size // 10, size // 3), str(a), fill=(0, 0, 0), font=font)
    draw.text((size * 6 // 10, size // 3), str(b), fill=(0, 0, 0), font=font)
    q = "What is the sum of the two numbers in the image?"
    steps = f"The image shows {a} and {b}. {a} + {b} = {a + b}"
    return q, a + b, _solution(steps, _boxed(rng, a + b, a, slip)), img


IMAGE_TASKS = {"count": count_task, "sum": sum_task, "count_add": count_add_task}


def _row(system: str, question: str, answer: int, solution: str, task: str, image: str | None = None) -> dict:
    content: list[dict] = [{"type": "text", "text": question}]
    if image is not None:
        content.append({"type": "image", "image": image})
    messages = [{"role": "system", "content": system}, {"role": "user", "content": content}]
    return {"message": json.dumps(messages), "answer": str(answer), "solution": solution, "task": task}


def write_split(
    out_dir: Path, name: str, n: int, seed: int, kind: str, *, image_size: int = 56, system: str = SHORT_SYSTEM_PROMPT,
    max_operand: int = 49, ops: str = "+-*", image_tasks: tuple[str, ...] = ("count", "sum"), slip: float = 0.0,
) -> Path:
    """Write `name.jsonl` (and its images under `images/name/`) with n rows of kind 'text' or 'image'
    (`image_tasks`: names in IMAGE_TASKS, drawn uniformly; `slip`: the chance of each mistake a solution can make)."""
    if not 0.0 <= slip <= 1.0:
        raise ValueError(f"slip: expected a probability in [0, 1], got {slip}")
    unknown = sorted(set(image_tasks) - set(IMAGE_TASKS))
    if unknown or not image_tasks:
        raise ValueError(f"image_tasks {list(image_tasks)}: expected a non-empty list of {sorted(IMAGE_TASKS)}")
    rng = random.Random(seed)
    img_dir = out_dir / "images" / name
    path = out_dir / f"{name}.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            if kind == "text":
                f.write(json.dumps(_row(system, *text_task(rng, max_operand, ops, slip), task="arith")) + "\n")
                continue
            task = rng.choice(list(image_tasks))
            q, ans, sol, img = IMAGE_TASKS[task](rng, image_size, max_operand, slip)
            img_dir.mkdir(parents=True, exist_ok=True)
            rel = f"images/{name}/{i:05d}.png"
            img.save(out_dir / rel)
            f.write(json.dumps(_row(system, q, ans, sol, task, image=rel)) + "\n")
    return path


def write_suite(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, **kwargs) -> dict[str, Path]:
    out = Path(out_dir)
    return {
        "text_train": write_split(out, "text_train", n_train, seed * 4 + 1, "text", **kwargs),
        "text_test": write_split(out, "text_test", n_test, seed * 4 + 2, "text", **kwargs),
        "image_train": write_split(out, "image_train", n_train, seed * 4 + 3, "image", **kwargs),
        "image_test": write_split(out, "image_test", n_test, seed * 4 + 4, "image", **kwargs),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=512)
    ap.add_argument("--test", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--max-operand", type=int, default=49, help="largest operand of the arithmetic tasks")
    ap.add_argument("--image-tasks", nargs="+", choices=sorted(IMAGE_TASKS), default=["count", "sum"])
    ap.add_argument("--system", choices=["short", "lmmr1"], default="short")
    ap.add_argument("--slip", type=float, default=0.0, help="chance of each typical mistake in a worked solution")
    args = ap.parse_args(argv)
    system = SHORT_SYSTEM_PROMPT if args.system == "short" else LMMR1_SYSTEM_PROMPT
    try:
        paths = write_suite(args.out, args.train, args.test, args.seed, image_size=args.image_size, system=system,
                            max_operand=args.max_operand, image_tasks=tuple(args.image_tasks),
                            slip=args.slip)  # fmt: skip
    except ValueError as e:  # bad arguments: a usage error naming the value, not a traceback
        ap.error(str(e))
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
