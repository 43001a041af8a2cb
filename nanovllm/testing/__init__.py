"""Helpers that make random-weight Qwen3 checkpoints and small tokenizers (for tests and benchmarks,
where no model hub is reachable)."""
