"""Qwen2.5-VL in JAX: `config` (architecture, runtime options), `hf_names` (the HF <-> Flax name table),
`hf_io` (checkpoint reading), `batch` (host-side batch assembly), `qwen2_5_vl` (forward and log-probability
entry points), `logprobs` (chunked per-token log-probabilities and entropies)."""
