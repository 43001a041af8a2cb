"""BatchJob: what to run, where the rows come from and go, and on what; validated before any work starts."""
import os
from dataclasses import dataclass, field

from nanovllm.batch.reader import check_parquet_support, input_format
from nanovllm.batch.requests import sampling_fields
from nanovllm.config import Config, check_model_dir
from nanovllm.sampling_params import SamplingParams, check_number, check_type


def check_ray_installed() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("ray=True needs Ray: pip install 'nano-vllm[ray]'") from None


@dataclass
class BatchJob:
    """An offline batch job: every row of `input` through `model`, results to `output` (JSON lines).

    engine: LLM options (see README, "Engine options"). sampling: SamplingParams fields used for every row
    unless the row sets its own. errors: a file for rows that cannot run; None stops the job at the first one.
    """
    model: str
    input: str
    output: str
    errors: str | None = None
    chunk_size: int = 512
    data_parallel_size: int = 1
    ray: bool = False
    ray_address: str | None = None
    engine: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self):
        for name in ("model", "input", "output"):
            check_type(name, getattr(self, name), (str, os.PathLike), "a path")
            setattr(self, name, os.path.expanduser(os.fspath(getattr(self, name))))
        if not self.ray:  # on a Ray cluster the model lives on the workers' disks, maybe not on this one
            check_model_dir(self.model)
        self._check_paths()
        check_number("chunk_size", self.chunk_size, 1, integer=True)
        check_number("data_parallel_size", self.data_parallel_size, 1, integer=True)
        check_type("ray", self.ray, bool, "a bool")
        check_type("progress", self.progress, bool, "a bool")
        if self.ray_address is not None:
            check_type("ray_address", self.ray_address, str, "a Ray address such as 'ray://head:10001'")
            if not self.ray:
                raise ValueError("ray_address is set but ray=False; set ray=True to run on that cluster")
        if self.ray:
            check_ray_installed()
        self._check_options()

    def _check_paths(self):
        if not os.path.isfile(self.input):
            raise FileNotFoundError(f"input {self.input!r} is not a file")
        if input_format(self.input) == "parquet":
            check_parquet_support()
        if os.path.isdir(self.output):
            raise ValueError(f"output {self.output!r} is a directory; pass a file path (results are JSON lines)")
        if not os.path.isdir(os.path.dirname(os.path.abspath(self.output))):
            raise FileNotFoundError(f"output {self.output!r}: its directory does not exist")
        if self.errors is not None:
            check_type("errors", self.errors, (str, os.PathLike), "a path or None")
            self.errors = os.path.expanduser(os.fspath(self.errors))
        paths = {"input": self.input, "output": self.output, "errors": self.errors}
        real = {name: os.path.realpath(path) for name, path in paths.items() if path is not None}
        if len(set(real.values())) < len(real):
            raise ValueError(f"input, output and errors must be different files, got {paths}")

    def _check_options(self):
        check_type("engine", self.engine, dict, "a dict of LLM options")
        unknown = sorted(set(self.engine) - Config.field_names())
        if unknown:
            raise TypeError(f"engine: unknown LLM option(s) {unknown}; allowed: {sorted(Config.field_names())}")
        check_type("sampling", self.sampling, dict, "a dict of SamplingParams fields")
        unknown = sorted(set(self.sampling) - set(sampling_fields()))
        if unknown:
            raise TypeError(f"sampling: unknown field(s) {unknown}; allowed: {list(sampling_fields())}")
        try:
            SamplingParams(**self.sampling)
        except (TypeError, ValueError) as e:
            raise type(e)(f"sampling: {e}") from None

    @property
    def tensor_parallel_size(self) -> int:
        return self.engine.get("tensor_parallel_size", 1)
