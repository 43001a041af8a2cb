"""GPU memory limits: a gpu_memory_utilization too small for the weights is refused with the numbers
before any weight is placed, and the process can then build a working engine."""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.conftest import make_gpu_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_too_small_memory_share_names_the_numbers_then_a_valid_engine_works(tmp_path):
    model = make_gpu_model(str(tmp_path))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0\.001 of this GPU's .* GiB.*weights need"):
        LLM(model, gpu_memory_utilization=0.001, kvcache_block_size=16, max_model_len=256)
    # Refused before any weight reached the GPU (earlier tests' garbage may have been freed meanwhile).
    assert torch.cuda.memory_allocated() <= before
    with LLM(model, kvcache_block_size=16, max_model_len=256, max_num_seqs=8) as llm:
        [out] = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert len(out["token_ids"]) == 8
