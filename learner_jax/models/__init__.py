"""Qwen2.5-VL in JAX: `config` (runtime options; the architecture and the parameter table are in `shared.models`),
`hf_io` (checkpoint reading), `batch` (host-side batch assembly), `qwen2_5_vl` (forward and log-probability
entry points), `logprobs` (chunked per-token log-probabilities and entropies)."""
