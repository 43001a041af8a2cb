"""The randomness of a draw.

Unseeded rows: the exponential race, argmax_v(logit_v - T * log E_v) with E_v ~ Exp(1) from torch's
global generator, draws v from softmax(logit / T) with no cumulative sum and no sort.

Seeded rows: inverse-CDF sampling from ONE uniform number per row and step, a pure function of (seed,
sample index, step) computed on the host (splitmix64). It does not depend on which other rows share the
batch, costs one float per row to send, and leaves no per-request generator state to keep or free; the
device work is a softmax and a cumulative sum over the row (no per-token hashing, no loop over rows).
"""
import torch

MASK64 = (1 << 64) - 1
# The smallest exponential noise: exponential_ may return exactly 0 on some devices (CPU: -log1p(-u) at
# u = 0), and log(0) would let any token with a finite logit win. 2**-25 is below float32 uniform steps.
MIN_NOISE = 2.0 ** -25


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, sample_index: int, step: int) -> float:
    """A uniform number in (0, 1) for a seeded row at a step; seeds are taken mod 2**64."""
    bits = splitmix64(splitmix64(splitmix64(seed & MASK64) ^ sample_index) ^ step)
    # The top 24 bits, centred in their interval: exact in float32, never 0 or 1.
    return ((bits >> 40) + 0.5) * 2.0 ** -24


def exponential_noise(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device=device).exponential_().clamp_min_(MIN_NOISE)


def inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """weights: [R, K] >= 0 (unnormalized probabilities), uniform: [R] in (0, 1) -> [R] index: the first
    position whose cumulative weight reaches uniform * total. That position has a positive weight, and
    u * total <= total, so it always exists."""
    cdf = weights.cumsum(-1)
    threshold = uniform * cdf[:, -1]
    return (cdf < threshold.unsqueeze(1)).sum(-1)


def draw(logits: torch.Tensor, temperature: torch.Tensor, seeded_uniform: torch.Tensor | None,
         all_seeded: bool, weights: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row from softmax(logits / T). logits: [R, K], -inf = excluded; temperature: [R],
    0 = argmax (never a seeded row); seeded_uniform: None or [R], -1 for unseeded rows; all_seeded: every
    row is seeded (skip the race); weights: the rows' probabilities if the caller has them.
    Returns positions [R] into K."""
    if seeded_uniform is not None:
        if weights is None:
            weights = (logits / torch.where(temperature > 0, temperature, 1.0).unsqueeze(1)).softmax(-1)
        seeded = inverse_cdf(weights, seeded_uniform.clamp(min=0.5 ** 24))  # the clamp: unseeded rows' -1
        if all_seeded:
            return seeded
    log_noise = exponential_noise(logits.shape, logits.device).log_()
    raced = torch.addcmul(logits, log_noise, temperature.unsqueeze(1), value=-1).argmax(-1)
    return raced if seeded_uniform is None else torch.where(seeded_uniform >= 0, seeded, raced)
