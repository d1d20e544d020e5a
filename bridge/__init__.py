"""Flax parameters -> Hugging Face tensors -> rollout engines, every iteration, verified.

Learner side (never imports torch): `convert` (params <-> HF tensors from the model's name table), `sync`
(`WeightSync`: bucketed, versioned pushes), `transport` and `nccl` (the routes), `verify` (checksums, logprob
probe), `targets` (the rollout service as a push target). Engine side (never imports jax): `payload` (how buckets
are read back), `receiver` (checksums of what an engine holds). Shared: `naming`, `checksum`.
This file imports nothing, so either side can import one module without the other's framework.
"""
