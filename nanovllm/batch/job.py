"""The job driver: check every row, then stream the rows still to do through the engines in chunks,
writing each finished chunk before asking for more, and finally fold the chunks into the output file."""
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm.auto import tqdm

from nanovllm.batch.config import BatchJob
from nanovllm.batch.parallel import DataParallelRunner, LocalRunner
from nanovllm.batch.reader import position_name, read_rows
from nanovllm.batch.requests import Request, RowError, iter_requests
from nanovllm.batch.store import ErrorLog, OutputStore
from nanovllm.batch.worker import Chunk
from nanovllm.sampling_params import check_type

logger = logging.getLogger(__name__)


class BatchInputError(ValueError):
    """An input row that cannot run, when the job stops at the first one (no errors file)."""


@dataclass
class BatchSummary:
    output: str
    rows_written: int  # by this run
    rows_already_done: int  # found in the output from an earlier run, skipped
    rows_failed: int  # recorded in the errors file
    completion_tokens: int
    startup_seconds: float  # building the engines
    generation_seconds: float  # from engines ready to the last chunk written


@dataclass
class Scan:
    rows_pending: int = 0
    rows_already_done: int = 0


def make_runner(job: BatchJob):
    if job.ray:
        from nanovllm.batch.ray_runner import RayRunner  # Ray is optional
        return RayRunner(job.model, job.engine, job.data_parallel_size, job.ray_address)
    if job.data_parallel_size > 1:
        return DataParallelRunner(job.model, job.engine, job.data_parallel_size)
    return LocalRunner(job.model, job.engine)


def chunks_of(items: Iterator[Request | RowError | None], size: int) -> Iterator[Chunk]:
    """Consecutive requests, at most size per chunk. A row already done ends a chunk: its part file lies
    between, and a chunk spanning it would make the output's order depend on the crash."""
    requests = []
    for item in items:
        if isinstance(item, RowError):
            continue  # reported by the scan
        if item is None or len(requests) == size:
            if requests:
                yield Chunk(requests)
            requests = []
        if item is not None:
            requests.append(item)
    if requests:
        yield Chunk(requests)


class Driver:
    def __init__(self, job: BatchJob):
        self.job = job
        self.position = position_name(job.input)
        self.store = OutputStore(job.output)
        self.errors = ErrorLog(job.errors, self.position) if job.errors is not None else None

    def report(self, error: RowError) -> None:
        if self.errors is None:
            raise BatchInputError(f"{self.job.input} {self.position} {error.line}: {error.message} (with an "
                                  f"errors file, errors= / --errors, such rows are recorded and the rest runs)")
        self.errors.add(error)

    def requests(self, done_ids: set):
        return iter_requests(read_rows(self.job.input), self.job.sampling, done_ids, self.position)

    def scan(self, done_ids: set) -> Scan:
        """Check every row before any engine starts, so a bad row costs no GPU time when the job stops on it."""
        scan = Scan()
        for item in self.requests(done_ids):
            if isinstance(item, RowError):
                self.report(item)
            elif item is None:
                scan.rows_already_done += 1
            else:
                scan.rows_pending += 1
        return scan

    def generate(self, done_ids: set, num_rows: int) -> tuple[int, int, float, float]:
        start = time.perf_counter()
        written = tokens = 0
        with make_runner(self.job) as runner:
            ready = time.perf_counter()
            progress = tqdm(total=num_rows, unit="row", desc="batch", dynamic_ncols=True,
                            disable=not self.job.progress)
            with progress:
                for result in runner.results(chunks_of(self.requests(done_ids), self.job.chunk_size)):
                    if result.rows:
                        self.store.write_part(result.first_position, result.rows)
                    for error in result.errors:
                        self.report(error)
                    written += len(result.rows)
                    tokens += result.num_completion_tokens
                    progress.update(result.num_requests)
                    progress.set_postfix_str(f"{tokens / (time.perf_counter() - ready):.0f} tok/s")
            finished = time.perf_counter()  # before the engines shut down
        return written, tokens, ready - start, finished - ready

    def run(self) -> BatchSummary:
        done_ids = self.store.done_ids()
        try:
            scan = self.scan(done_ids)
            if scan.rows_already_done:
                logger.info("resuming: %d rows already in the output, %d to do", scan.rows_already_done,
                            scan.rows_pending)
            written = tokens = 0
            startup = seconds = 0.0
            if scan.rows_pending:
                written, tokens, startup, seconds = self.generate(done_ids, scan.rows_pending)
        except BaseException:
            if self.errors is not None:
                self.errors.discard()
            raise
        if self.errors is not None:
            self.errors.commit()
        if self.store.has_parts() or not os.path.exists(self.job.output):
            self.store.merge()
        return BatchSummary(self.job.output, written, scan.rows_already_done,
                            self.errors.count if self.errors else 0, tokens, startup, seconds)


def run_batch(job: BatchJob) -> BatchSummary:
    """Run a batch job to the end. Rerunning it after a crash resumes: rows already written are skipped."""
    check_type("job", job, BatchJob, "a BatchJob")
    return Driver(job).run()
