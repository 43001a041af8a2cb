"""The exponential race (noise.py) in one Triton kernel, for CUDA batches with no control but temperature.

The torch version casts the logits to float32, draws a float32 noise tensor, clamps it, takes its log and
a fused multiply-add, then an argmax: about 1.5 GB of memory traffic at 256 rows of Qwen3's 151,936-token
vocabulary (8% of an H200 decode step). Here each program reads its row of logits once, in their own
dtype, makes the noise in registers (Philox, tl.rand) and keeps the running argmax.
"""
import torch
import triton
import triton.language as tl

from nanovllm.sampling.noise import MIN_NOISE

BLOCK_V = 2048


@triton.jit(do_not_specialize=["seed", "vocab_start"])
def _race_kernel(logits_ptr, temperature_ptr, token_ptr, score_ptr, seed, num_columns, vocab_start, vocab_size,
                 stride_row, MIN_NOISE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Column c of a row holds token vocab_start + c of a vocabulary of vocab_size tokens; each token's
    noise depends on (seed, row, token) alone, so a rank's slice of the vocabulary draws the same noise
    as the whole row would."""
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr + row)
    best_score = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_token = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, num_columns, BLOCK_V):
        columns = start + tl.arange(0, BLOCK_V)
        in_row = columns < num_columns
        logit = tl.load(logits_ptr + row * stride_row + columns, mask=in_row, other=float("-inf")).to(tl.float32)
        tokens = vocab_start + columns
        uniform = tl.rand(seed, row * vocab_size + tokens)  # [0, 1)
        noise = tl.maximum(-tl.log(1.0 - uniform), MIN_NOISE)  # Exp(1)
        # argmax(l - T log E) draws from softmax(l / T); T = 0 leaves the greedy argmax.
        score = logit - temperature * tl.log(noise)
        better = score > best_score  # strict: among equal scores the first token stays
        best_score = tl.where(better, score, best_score)
        best_token = tl.where(better, tokens, best_token)
    top = tl.max(best_score, 0)
    tl.store(token_ptr + row, tl.min(tl.where(best_score == top, best_token, vocab_size), 0).to(tl.int64))
    tl.store(score_ptr + row, top)


def race(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] (any float dtype, rows contiguous); temperature: [B] float32, 0 = greedy -> [B] int64.
    The Philox seed is drawn from torch's default (CPU) generator, so torch.manual_seed repeats a run."""
    seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    return race_slice(logits, temperature, seed, 0, logits.shape[1])[0]


def race_slice(logits: torch.Tensor, temperature: torch.Tensor, seed: int, vocab_start: int,
               vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The race over a slice of the vocabulary: logits [B, S] are tokens vocab_start .. vocab_start + S - 1
    of vocab_size. -> (each row's winning token [B] int64, its score [B] float32). The winner of the whole
    vocabulary is the slices' winner with the highest score (the first slice among equal ones), the
    same token race(logits of the whole vocabulary) draws with the same seed."""
    num_rows, num_columns = logits.shape
    assert logits.stride(1) == 1 and num_rows * max(logits.stride(0), vocab_size) < 2 ** 31  # int32 offsets
    tokens = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    scores = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    _race_kernel[(num_rows,)](logits, temperature, tokens, scores, seed, num_columns, vocab_start, vocab_size,
                              logits.stride(0), MIN_NOISE=MIN_NOISE, BLOCK_V=BLOCK_V, num_warps=8)
    return tokens, scores
