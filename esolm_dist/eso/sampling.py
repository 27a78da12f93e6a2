"""Eso-LM sampling: the unmasking schedule of paper Alg. 2 and the KV-cached sampler of Alg. 3,
with uncached references and Eso-LM (A); and the samplers of the baselines trained by the same
framework (eso.model): AR (one token per step, KV cache), MDLM (full bidirectional forward per
step, no cache) and BD3-LM (diffusion within a block, finished blocks in the KV cache), each
with the mask it was trained with (esolm_dist.eso.masks).

Notation: L positions, a schedule S = (S_1, ..., S_K) of disjoint position sets covering all L;
NFE = K (one network call per step). All samplers here share one convention: a step's masks
attend causally, in the decoding order sigma = S_1 S_2 ... S_K, to everything decoded before
them and to the earlier masks of their own step (paper section 2, "Sampling mask").

Batches: every sequence of a batch has its own random positions, but the step SIZES are drawn
once and shared, so each step is one dense [B, n_k] tensor with no padding. Each sequence's
schedule has the paper's distribution; the sequences' step sizes are simply equal.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from esolm_dist.eso import DEFAULT_METHOD, METHODS
from esolm_dist.eso.masks import BIDIRECTIONAL, BLOCK_DIFFUSION, RowMaskSpec, diffusion_allowed, row_allowed


class Denoiser(Protocol):
    """What the samplers need from a network (esolm_dist.inference.model.EsoLM provides it)."""

    mask_token_id: int
    config: Any  # esolm_dist.inference.export_io.ExportConfig: model, bos_token_id, block_size

    def new_kv_cache(self, batch_size: int, capacity: int) -> Any: ...

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 kv_cache: Any = None, cache_append: int | torch.Tensor | None = None,
                 logits_rows: slice | None = None) -> torch.Tensor: ...


@dataclasses.dataclass(frozen=True)
class SamplingSchedule:
    """Paper Alg. 2's schedule S for a batch.

    order: [B, L], every position once, in decoding order; step k decodes the next
    step_sizes[k] entries. The first num_diffusion_steps steps are the diffusion phase, the
    rest the sequential phase (which only Eso-LM (A) treats differently).
    """

    order: torch.Tensor
    step_sizes: tuple[int, ...]
    num_diffusion_steps: int

    @property
    def nfe(self) -> int:
        return len(self.step_sizes)

    @property
    def length(self) -> int:
        return self.order.shape[1]

    def steps(self) -> tuple[torch.Tensor, ...]:
        """The position sets S_1, ..., S_K, each [B, n_k]."""
        return self.order.split(self.step_sizes, dim=1)

    def to(self, device: torch.device | str) -> SamplingSchedule:
        return dataclasses.replace(self, order=self.order.to(device))


@dataclasses.dataclass
class SamplingResult:
    """Sampled tokens [B, L], the number of network calls, and the decoding loop's wall time.

    step_logits (when recorded): per step, fp32 logits [B, n_k, V] of the positions it decoded.
    """

    tokens: torch.Tensor
    nfe: int
    wall_time_s: float
    step_logits: list[torch.Tensor] | None = None


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def first_hitting_step_sizes(length: int, alpha0: float, num_steps: int,
                             generator: torch.Generator | None = None) -> list[int]:
    """Diffusion step sizes n_t of paper Alg. 2 (steps 1-2), empty steps dropped.

    Alg. 2 walks t = 1, 1 - 1/T, ..., 1/T drawing n_t ~ Binomial(m, (alpha_s - alpha_t)/(1 - alpha_t))
    from the m masks left, alpha_t = alpha0 (1 - t). Because alpha_s - alpha_t = alpha0 / T for
    every step and the survival probabilities telescope (prod (1 - alpha_s)/(1 - alpha_t) =
    1 - alpha0), that chain is the same law as: each token independently is first hit at step k
    with probability alpha0 / T (each k), and never with probability 1 - alpha0. So we draw
    n_MDM ~ Binomial(L, alpha0), give each diffusion token a uniform step in [0, T), and count:
    O(L) work instead of O(T) (the paper times with T = 10^6).
    """
    device = _generator_device(generator)
    count = torch.tensor(float(length), device=device)
    num_diffusion = int(torch.binomial(count, torch.tensor(float(alpha0), device=device), generator=generator))
    hit_steps = torch.randint(num_steps, (num_diffusion,), generator=generator, device=device)
    return torch.unique(hit_steps, sorted=True, return_counts=True)[1].tolist()


def _random_permutations(batch_size: int, length: int, generator: torch.Generator | None) -> torch.Tensor:
    device = _generator_device(generator)
    return torch.stack([torch.randperm(length, generator=generator, device=device) for _ in range(batch_size)])


def first_hitting_schedule(batch_size: int, length: int, alpha0: float, num_steps: int,
                           generator: torch.Generator | None = None) -> SamplingSchedule:
    """Paper Alg. 2: the diffusion steps (sizes shared by the batch) take a random permutation's
    first n_MDM positions, partitioned in order; the other L - n_MDM positions follow as one-token
    steps in ascending (left-to-right) order."""
    sizes = first_hitting_step_sizes(length, alpha0, num_steps, generator)
    num_diffusion = sum(sizes)
    permutations = _random_permutations(batch_size, length, generator)
    sequential = permutations[:, num_diffusion:].sort(dim=1).values
    order = torch.cat((permutations[:, :num_diffusion], sequential), dim=1)
    return SamplingSchedule(order, tuple(sizes) + (1,) * (length - num_diffusion), len(sizes))


def subcontext_schedule(batch_size: int, length: int, alpha0: float, subcontext_len: int,
                        shuffle: bool = False, generator: torch.Generator | None = None) -> SamplingSchedule:
    """The block ("subcontext") option of paper section 3: S = subcontext_len steps of L/S tokens,
    step j decoding the interleaved positions {j, j+S, j+2S, ...}; steps in order j = 0..S-1 or,
    with shuffle, in a random order per sequence. The first int(S * alpha0) steps are diffusion."""
    if subcontext_len < 1 or length % subcontext_len:
        raise ValueError(f"subcontext_len {subcontext_len} must be positive and divide length {length}")
    device = _generator_device(generator)
    groups = torch.arange(length, device=device).view(length // subcontext_len, subcontext_len).T
    if shuffle:
        step_order = _random_permutations(batch_size, subcontext_len, generator)
    else:
        step_order = torch.arange(subcontext_len, device=device).expand(batch_size, -1)
    order = groups[step_order].flatten(1)
    sizes = (length // subcontext_len,) * subcontext_len
    return SamplingSchedule(order, sizes, int(subcontext_len * alpha0))


def nucleus_gumbel_sample(logits: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Token ids [...] from logits [..., V]: Gumbel-max over the top-p nucleus (paper Alg. 3).

    The nucleus is the smallest set of most likely ids whose mass reaches top_p (top_p = 1: all).
    The Gumbel noise always has the logits' shape, so every sampler draws the same noise. It is
    float64, as in the paper's code: float32 uniforms (spacing 2^-24 near 1) cut off the Gumbel
    tail at about 16.6, which measurably shifts generative perplexity.
    """
    logits = logits.float()
    if top_p < 1.0:
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        outside = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, sorted_ids, mass_before >= top_p)
        logits = logits.masked_fill(outside, float("-inf"))
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = uniform.clamp_(min=torch.finfo(uniform.dtype).tiny).log_().neg_().log_().neg_()  # -log(-log u)
    return gumbel.add_(logits).argmax(dim=-1)


# on_step(n): called after each network call with the number of positions it decoded (progress bars)
OnStep = Callable[[int], None]


class _Decoding:
    """One sampling run: the canvas being unmasked, the NFE count, timing and optional logits."""

    def __init__(self, model: Denoiser, schedule: SamplingSchedule, top_p: float,
                 generator: torch.Generator | None, record_logits: bool, on_step: OnStep | None):
        self.canvas = torch.full_like(schedule.order, model.mask_token_id)
        self.top_p = top_p
        self.generator = generator
        self.step_logits = [] if record_logits else None
        self.on_step = on_step
        self.nfe = 0
        self.started = time.perf_counter()

    def decode(self, positions: torch.Tensor, logits: torch.Tensor) -> None:
        """Sample the masks at `positions` [B, n] from their logits [B, n, V]."""
        if self.step_logits is not None:
            self.step_logits.append(logits.float().clone())
        tokens = nucleus_gumbel_sample(logits, self.top_p, self.generator)
        self.canvas.scatter_(1, positions, tokens)
        self.nfe += 1
        if self.on_step is not None:
            self.on_step(positions.shape[1])

    def result(self) -> SamplingResult:
        if self.canvas.is_cuda:
            torch.cuda.synchronize(self.canvas.device)
        return SamplingResult(self.canvas, self.nfe, time.perf_counter() - self.started, self.step_logits)


def _decode_cached(model: Denoiser, run: _Decoding, cache: Any, steps: tuple[torch.Tensor, ...],
                   previous: torch.Tensor) -> None:
    """Paper Alg. 3's loop: each step feeds the tokens decoded one step earlier (`previous`, now
    clean, at their original positions) followed by the step's masks; attention covers the whole
    cache plus causal attention inside the chunk; afterwards the cache keeps the clean rows only."""
    for positions in steps:
        chunk = torch.cat((previous, positions), dim=1)
        num_clean = previous.shape[1]
        logits = model(run.canvas.gather(1, chunk), chunk, kv_cache=cache, cache_append=num_clean,
                       logits_rows=slice(num_clean, None))
        run.decode(positions, logits)
        previous = positions


@torch.inference_mode()
def sample_eso_b(model: Denoiser, schedule: SamplingSchedule, top_p: float = 0.9,
                 generator: torch.Generator | None = None, record_logits: bool = False,
                 on_step: OnStep | None = None) -> SamplingResult:
    """Eso-LM (B) sampling, paper Alg. 3, with ONE unified KV cache over both phases.

    Step 1 feeds the masks of S_1 (nothing cached); step k feeds the tokens of S_{k-1} plus the
    masks of S_k. Unscheduled masks are never computed. With alpha0 = 0 this is AR decoding.
    `schedule` must be on the model's device.
    """
    run = _Decoding(model, schedule, top_p, generator, record_logits, on_step)
    cache = model.new_kv_cache(schedule.order.shape[0], schedule.length)
    _decode_cached(model, run, cache, schedule.steps(), schedule.order[:, :0])
    return run.result()


def _decode_uncached(model: Denoiser, run: _Decoding, schedule: SamplingSchedule, all_positions: bool) -> None:
    """Each step: one causal forward over the decoding order sigma, up to the end of S_k
    (decoded tokens then S_k's masks) or, with all_positions, over all L positions (the
    unscheduled masks come after S_k, so they cost compute but change nothing)."""
    start = 0
    for positions in schedule.steps():
        end = start + positions.shape[1]
        visible = schedule.order if all_positions else schedule.order[:, :end]
        logits = model(run.canvas.gather(1, visible), visible, logits_rows=slice(start, end))
        run.decode(positions, logits)
        start = end


@torch.inference_mode()
def sample_eso_b_uncached(model: Denoiser, schedule: SamplingSchedule, top_p: float = 0.9,
                          generator: torch.Generator | None = None, record_logits: bool = False,
                          on_step: OnStep | None = None) -> SamplingResult:
    """The reference for sample_eso_b: a full causal forward over decoded + S_k in sigma order at
    every step, no cache. Same tokens and (up to float rounding) the same logits for the same
    schedule and generator seed."""
    run = _Decoding(model, schedule, top_p, generator, record_logits, on_step)
    _decode_uncached(model, run, schedule, all_positions=False)
    return run.result()


@torch.inference_mode()
def sample_eso_b_all_positions(model: Denoiser, schedule: SamplingSchedule, top_p: float = 0.9,
                               generator: torch.Generator | None = None, record_logits: bool = False,
                               on_step: OnStep | None = None) -> SamplingResult:
    """An Eso-LM (B) network run the MDLM way: no cache, every step a forward over ALL L positions,
    masks included, causal in the decoding order (decoded tokens first, then S_k's masks, then the
    unscheduled masks). Draws the same samples as sample_eso_b; measures what the cache and the
    skipped masks save. (The MDLM baseline itself, a bidirectional network, is sample_mdlm.)
    """
    run = _Decoding(model, schedule, top_p, generator, record_logits, on_step)
    _decode_uncached(model, run, schedule, all_positions=True)
    return run.result()


def _clean_bidirectional_mask(num_clean: int, total: int, device: torch.device) -> torch.Tensor:
    """Eso-LM (A) mask [1, total, total] (True = attend), the training diffusion mask of (A): the
    first num_clean rows (clean tokens) see each other in both directions; the following masks
    see all clean tokens and attend causally among themselves."""
    rows = torch.arange(total, device=device)
    return diffusion_allowed(rows[:, None], rows, torch.tensor(num_clean, device=device), "A")[None]


def _recompute_step_a(model: Denoiser, run: _Decoding, order: torch.Tensor, start: int,
                      positions: torch.Tensor, cache: Any = None) -> int:
    """One Eso-LM (A) forward over the `start` decoded tokens plus the masks at `positions`;
    with a cache, the decoded tokens' keys/values are kept. Returns the new decoded count."""
    end = start + positions.shape[1]
    visible = order[:, :end]
    logits = model(run.canvas.gather(1, visible), visible,
                   attn_mask=_clean_bidirectional_mask(start, end, visible.device), kv_cache=cache,
                   cache_append=None if cache is None else start,
                   logits_rows=slice(start, end))
    run.decode(positions, logits)
    return end


@torch.inference_mode()
def sample_eso_a(model: Denoiser, schedule: SamplingSchedule, top_p: float = 0.9,
                 generator: torch.Generator | None = None, record_logits: bool = False,
                 on_step: OnStep | None = None) -> SamplingResult:
    """Eso-LM (A) sampling: cache in the sequential phase only (paper section 2, Eso-LM (A)).

    Diffusion steps recompute decoded + S_k with clean tokens bidirectional and masks causal.
    The first sequential step does the same over all diffusion-decoded tokens and caches their
    keys/values; from there on decoding is the cached loop of Alg. 3 (sequential tokens causal).
    """
    run = _Decoding(model, schedule, top_p, generator, record_logits, on_step)
    steps = schedule.steps()
    num_diffusion = schedule.num_diffusion_steps
    decoded = 0
    for positions in steps[:num_diffusion]:
        decoded = _recompute_step_a(model, run, schedule.order, decoded, positions)
    if num_diffusion < len(steps):
        cache = model.new_kv_cache(schedule.order.shape[0], schedule.length)
        _recompute_step_a(model, run, schedule.order, decoded, steps[num_diffusion], cache)
        _decode_cached(model, run, cache, steps[num_diffusion + 1:], steps[num_diffusion])
    return run.result()


# ---- the baselines (eso.model ar, mdlm, bd3lm) ---------------------------------------------------

def left_to_right_schedule(batch_size: int, length: int, device: torch.device | str = "cpu") -> SamplingSchedule:
    """AR decoding: L one-token steps in ascending order."""
    order = torch.arange(length, device=device).expand(batch_size, length)
    return SamplingSchedule(order, (1,) * length, 0)


def block_schedule(batch_size: int, length: int, block_size: int, steps_per_block: int,
                   generator: torch.Generator | None = None) -> SamplingSchedule:
    """BD3-LM: the blocks of block_size positions left to right, each unmasked by its own
    first-hitting schedule of steps_per_block steps at alpha0 = 1 (empty steps dropped)."""
    if block_size < 1 or length % block_size:
        raise ValueError(f"the length {length} must be a multiple of the block size {block_size}")
    orders, sizes = [], []
    for start in range(0, length, block_size):
        block = first_hitting_schedule(batch_size, block_size, 1.0, steps_per_block, generator)
        orders.append(block.order + start)
        sizes.extend(block.step_sizes)
    return SamplingSchedule(torch.cat(orders, dim=1), tuple(sizes), len(sizes))


@torch.inference_mode()
def sample_ar(model: Denoiser, schedule: SamplingSchedule, top_p: float = 0.9,
              generator: torch.Generator | None = None, record_logits: bool = False,
              on_step: OnStep | None = None) -> SamplingResult:
    """The AR baseline (shift by one): step i feeds x_{i-1} (BOS at step 0) at position i and
    samples x_i from its output; the cache keeps every fed token. NFE = L."""
    run = _Decoding(model, schedule, top_p, generator, record_logits, on_step)
    batch, length = schedule.order.shape
    cache = model.new_kv_cache(batch, length)
    fed = torch.full((batch, 1), model.config.bos_token_id, dtype=run.canvas.dtype, device=run.canvas.device)
    for positions in schedule.steps():
        logits = model(fed, positions, kv_cache=cache, cache_append=1)
        run.decode(positions, logits)
        fed = run.canvas.gather(1, positions)
    return run.result()


@torch.inference_mode()
def sample_ar_uncached(model: Denoiser, schedule: SamplingSchedule, top_p: float = 0.9,
                       generator: torch.Generator | None = None, record_logits: bool = False,
                       on_step: OnStep | None = None) -> SamplingResult:
    """The reference for sample_ar: step i runs the causal network over [BOS, x_0..x_{i-1}]."""
    run = _Decoding(model, schedule, top_p, generator, record_logits, on_step)
    batch, _ = schedule.order.shape
    bos = torch.full((batch, 1), model.config.bos_token_id, dtype=run.canvas.dtype, device=run.canvas.device)
    for step, positions in enumerate(schedule.steps()):
        fed = torch.cat((bos, run.canvas[:, :step]), dim=1)
        logits = model(fed, schedule.order[:, :step + 1], logits_rows=slice(step, step + 1))
        run.decode(positions, logits)
    return run.result()


def _baseline_mask(model_name: str, kind: int, length: int, block_size: int, device) -> torch.Tensor:
    """The training mask [1, S, S] of one row of a baseline (esolm_dist.eso.masks), for a full forward."""
    spec = RowMaskSpec("B", length, torch.tensor([kind]), torch.zeros(1, 2, dtype=torch.long), model_name, block_size)
    return spec.dense(device)[:, 0]


@torch.inference_mode()
def sample_mdlm(model: Denoiser, schedule: SamplingSchedule, top_p: float = 0.9,
                generator: torch.Generator | None = None, record_logits: bool = False,
                on_step: OnStep | None = None) -> SamplingResult:
    """The MDLM baseline: every step one bidirectional forward over all L positions in the original
    order (masks included; MDLM has no cache), S_k sampled from its outputs."""
    run = _Decoding(model, schedule, top_p, generator, record_logits, on_step)
    batch, length = schedule.order.shape
    positions_all = torch.arange(length, device=run.canvas.device).expand(batch, length)
    mask = _baseline_mask("mdlm", BIDIRECTIONAL, length, 1, run.canvas.device)
    for positions in schedule.steps():
        logits = model(run.canvas, positions_all, attn_mask=mask)
        run.decode(positions, logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1])))
    return run.result()


def _block_of(positions: torch.Tensor, block_size: int) -> int:
    return int(positions[0, 0]) // block_size


def _bd3lm_chunk_mask(query_rows: torch.Tensor, key_rows: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """[1, S, S_kv] of the BD3-LM training predicate at the given indices of the [x_t ; x] row."""
    kind, unused = torch.tensor(BLOCK_DIFFUSION, device=query_rows.device), torch.zeros((), device=query_rows.device)
    return row_allowed(query_rows[:, None], key_rows[None, :], kind, unused, unused, length, "B", block_size)[None]


@torch.inference_mode()
def sample_bd3lm(model: Denoiser, schedule: SamplingSchedule, top_p: float = 0.9,
                 generator: torch.Generator | None = None, record_logits: bool = False,
                 on_step: OnStep | None = None) -> SamplingResult:
    """The BD3-LM baseline (schedule from block_schedule): blocks left to right, diffusion steps
    within a block (its noisy tokens see each other and the finished blocks), the finished blocks'
    clean keys/values in the KV cache. As in Eso-LM's Alg. 3 the caching lags one step: the first
    step of block b also feeds the now clean block b - 1, whose rows the cache then keeps."""
    run = _Decoding(model, schedule, top_p, generator, record_logits, on_step)
    batch, length = schedule.order.shape
    block_size = model.config.block_size
    device = run.canvas.device
    cache = model.new_kv_cache(batch, length)
    block_positions = torch.arange(block_size, device=device)
    current = -1
    for positions in schedule.steps():
        block = _block_of(positions, block_size)
        noisy = block * block_size + block_positions  # original positions = x_t row indices
        clean = noisy[:0]
        if block != current and block > 0:  # feed the finished previous block once, then cache it
            clean = noisy - block_size
        current = block
        chunk = torch.cat((clean, noisy))
        cached_rows = length + torch.arange(cache.length, device=device)  # x rows of the blocks before
        mask = _bd3lm_chunk_mask(torch.cat((length + clean, noisy)), torch.cat((cached_rows, length + clean, noisy)),
                                 length, block_size)
        logits = model(run.canvas[:, chunk], chunk.expand(batch, -1), attn_mask=mask, kv_cache=cache,
                       cache_append=len(clean) if len(clean) else None, logits_rows=slice(len(clean), None))
        offsets = positions - block * block_size
        run.decode(positions, logits.gather(1, offsets[..., None].expand(-1, -1, logits.shape[-1])))
    return run.result()


@torch.inference_mode()
def sample_bd3lm_uncached(model: Denoiser, schedule: SamplingSchedule, top_p: float = 0.9,
                          generator: torch.Generator | None = None, record_logits: bool = False,
                          on_step: OnStep | None = None) -> SamplingResult:
    """The reference for sample_bd3lm: every step one forward over the whole training row
    [x_t ; x] = [canvas ; canvas] with the training mask (x_t block b sees itself and the x blocks
    before it, which hold the finished blocks), no cache."""
    run = _Decoding(model, schedule, top_p, generator, record_logits, on_step)
    batch, length = schedule.order.shape
    block_size = model.config.block_size
    mask = _baseline_mask("bd3lm", BLOCK_DIFFUSION, length, block_size, run.canvas.device)
    positions_all = torch.arange(length, device=run.canvas.device).repeat(2).expand(batch, -1)
    for positions in schedule.steps():
        logits = model(run.canvas.repeat(1, 2), positions_all, attn_mask=mask)
        run.decode(positions, logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1])))
    return run.result()


def model_of(model: Denoiser) -> str:
    """Which model a network is (its export's config.json "model"; esolm when it has none)."""
    return getattr(getattr(model, "config", None), "model", "esolm")


def check_method(method: str, model_name: str) -> None:
    """One line when ``method`` cannot sample a ``model_name`` network."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {tuple(METHODS)}")
    if METHODS[method] != model_name:
        raise ValueError(f"method {method!r} samples {METHODS[method]} models, this is an {model_name} model; "
                         f"use method {DEFAULT_METHOD[model_name]!r}")


def sample(model: Denoiser, batch_size: int, length: int, *, method: str | None = None, variant: str = "B",
           alpha0: float = 0.25, num_steps: int | None = None, top_p: float = 0.9,
           subcontext_len: int | None = None, subcontext_shuffle: bool = False,
           generator: torch.Generator | None = None, device: torch.device | str = "cpu",
           record_logits: bool = False, on_step: OnStep | None = None) -> SamplingResult:
    """Draw a schedule and run the model's sampler on it (esolm_dist.eso.METHODS).

    method (default: the model's own, ``model.config.model``): "eso": Eso-LM, Alg. 2 (or the
    subcontext option) at alpha0 (variant "B": sample_eso_b, "A": sample_eso_a); "ar": one token
    per step, cached (NFE = L); "mdlm": first-hitting schedule of T steps at alpha0 = 1 (or the
    subcontext option), full forward per step; "bd3lm": T / (L / L') steps per block, cached.
    The baselines ignore alpha0 and variant. A method that cannot sample the model raises a
    one-line ValueError. num_steps is T (default: length). The generator (if any) must live on
    `device`. Returns the tokens [B, L] and the NFE (SamplingResult).
    """
    model_name = model_of(model)
    method = method or DEFAULT_METHOD[model_name]
    check_method(method, model_name)
    if variant not in ("A", "B"):
        raise ValueError(f"variant {variant!r} is not 'A' or 'B'")
    if not 0.0 <= alpha0 <= 1.0:
        raise ValueError(f"alpha0 {alpha0} must lie in [0, 1]")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p {top_p} must lie in (0, 1]")
    if num_steps is not None and num_steps < 1:
        raise ValueError(f"num_steps {num_steps} must be positive")
    if subcontext_len is not None and method in ("ar", "bd3lm"):
        raise ValueError(f"subcontext_len applies to the eso and mdlm methods, not {method!r}")
    if method == "ar":
        schedule = left_to_right_schedule(batch_size, length, device)
        return sample_ar(model, schedule, top_p, generator, record_logits, on_step)
    if method == "bd3lm":
        block_size = model.config.block_size
        steps_per_block = max(1, (num_steps or length) * block_size // length)
        schedule = block_schedule(batch_size, length, block_size, steps_per_block, generator)
        return sample_bd3lm(model, schedule.to(device), top_p, generator, record_logits, on_step)
    if method == "mdlm":
        alpha0 = 1.0
    if subcontext_len is not None:
        schedule = subcontext_schedule(batch_size, length, alpha0, subcontext_len, subcontext_shuffle, generator)
    else:
        schedule = first_hitting_schedule(batch_size, length, alpha0, num_steps or length, generator)
    if method == "mdlm":
        sampler = sample_mdlm
    elif method == "eso" and variant == "A":
        sampler = sample_eso_a
    else:
        sampler = sample_eso_b
    return sampler(model, schedule.to(device), top_p, generator, record_logits, on_step)
