"""Offline batch jobs: a file of prompts in, a file of completions out, on one engine, several engine
processes (data parallel) or a Ray cluster; resumable after a crash. See README, "Batch jobs"."""
from nanovllm.batch.config import BatchJob
from nanovllm.batch.job import BatchInputError, BatchSummary, run_batch

__all__ = ["BatchJob", "BatchInputError", "BatchSummary", "run_batch"]
