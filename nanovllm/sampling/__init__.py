"""Batched sampling (see sampler.py for the chain of steps)."""
from nanovllm.sampling.sampler import Sampler, SamplerOutput

__all__ = ["Sampler", "SamplerOutput"]
