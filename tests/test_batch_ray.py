"""The batch job on a local Ray cluster: two CPU engine actors give what one engine gives, and an actor
that dies mid-job is rebuilt by Ray while every id is still written exactly once."""
import pytest

pytest.importorskip("ray")

from nanovllm.batch.worker import CRASH_ENV  # noqa: E402
from tests.test_batch_job import CHUNK_SIZE, ROWS, run_job  # noqa: E402

RAY_FLAGS = ("--ray", "--data-parallel-size", "2")


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> list[dict]:
    return run_job(tiny_model, tmp_path_factory.mktemp("reference"))


def test_two_ray_actors_equal_one_engine(tiny_model, tmp_path, reference):
    assert run_job(tiny_model, tmp_path, ROWS, *RAY_FLAGS) == reference


def test_killed_actor_is_retried_and_every_id_written_once(tiny_model, tmp_path, reference, monkeypatch):
    marker = tmp_path / "crashed"
    # The actor holding the second chunk exits abruptly once; the local cluster this job starts inherits it.
    monkeypatch.setenv(CRASH_ENV, f"{CHUNK_SIZE + 1}:{marker}")
    out = run_job(tiny_model, tmp_path, ROWS, *RAY_FLAGS)
    assert marker.exists()  # the actor really died
    assert sorted(map(str, (row["id"] for row in out))) == sorted(map(str, (row["id"] for row in ROWS)))
    assert out == reference
