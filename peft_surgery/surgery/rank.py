"""Global rank allocation under a parameter budget.

Given every module's singular values, choose per-module ranks ``r_i`` that maximise the retained energy
``Σ_i Σ_{j<r_i} s_ij²`` (equivalently: minimise the total squared Frobenius error ``Σ_i ‖ΔW_i − B_iA_i‖²``)
subject to ``Σ_i c_i·r_i ≤ budget``, where ``c_i`` is the number of parameters one rank costs in module i
(``out + in·k`` for a LoRA). This is a knapsack over concave per-module curves; we solve it greedily by
energy-per-parameter (optimal for the fractional relaxation) and then compare with the best *uniform* rank
that fits the same budget, keeping whichever retains more. So the result is never worse than uniform ranks at
the same parameter count, by construction.

>>> import torch
>>> specs = [ModuleSpectrum("a", torch.tensor([4.0, 1.0]), 17.0, 10),
...          ModuleSpectrum("b", torch.tensor([3.0, 2.0]), 13.0, 10)]
>>> allocate_budget(specs, 30).ranks
{'a': 1, 'b': 2}
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class ModuleSpectrum:
    """One module's (possibly truncated) spectrum and the cost of one rank.

    ``S``: singular values, descending (only the first ``len(S)`` ranks are available).
    ``total_energy``: the exact ‖ΔW‖_F² (not the sum of the available S²).
    ``cost_per_rank``: parameters added per rank (``out + in·k`` for a LoRA factor pair).
    ``max_rank``: an optional extra cap (defaults to ``len(S)``).
    """

    name: str
    S: Tensor
    total_energy: float
    cost_per_rank: int
    max_rank: int | None = None

    @property
    def cap(self) -> int:
        n = int(self.S.numel())
        return n if self.max_rank is None else max(0, min(n, int(self.max_rank)))

    def energies(self) -> list[float]:
        """s_j² for the available ranks, in float64."""
        return (self.S[: self.cap].double() ** 2).tolist()

    def retained(self, rank: int) -> float:
        return float((self.S[: min(rank, self.cap)].double() ** 2).sum())


@dataclass
class Allocation:
    """Chosen ranks, their parameter count and retained energy, and which strategy won."""

    ranks: dict[str, int]
    params: int
    retained_energy: float
    total_energy: float
    method: str  # "greedy" or "uniform"
    uniform_rank: int = 0
    uniform_retained_energy: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def squared_error(self) -> float:
        return max(self.total_energy - self.retained_energy, 0.0)

    @property
    def relative_error(self) -> float:
        """sqrt(Σ error² / Σ ‖ΔW‖²) over all modules."""
        return math.sqrt(self.squared_error / self.total_energy) if self.total_energy > 0 else 0.0


def allocation_params(spectra: Sequence[ModuleSpectrum], ranks: dict[str, int]) -> int:
    return sum(s.cost_per_rank * ranks.get(s.name, 0) for s in spectra)


def allocation_energy(spectra: Sequence[ModuleSpectrum], ranks: dict[str, int]) -> float:
    return sum(s.retained(ranks.get(s.name, 0)) for s in spectra)


def uniform_ranks(spectra: Sequence[ModuleSpectrum], rank: int) -> dict[str, int]:
    """The same rank everywhere, clipped to what each module has available."""
    return {s.name: min(rank, s.cap) for s in spectra}


def best_uniform_rank(spectra: Sequence[ModuleSpectrum], budget: int) -> int:
    """The largest uniform rank whose (cap-clipped) parameter count fits ``budget`` (0 if none)."""
    if not spectra:
        return 0
    hi = max(s.cap for s in spectra)
    lo = 0
    # params(rank) is non-decreasing in rank: binary search the largest feasible rank.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if allocation_params(spectra, uniform_ranks(spectra, mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def greedy_ranks(spectra: Sequence[ModuleSpectrum], budget: int, *, min_rank: int = 0) -> dict[str, int]:
    """Greedy by energy per parameter: repeatedly add the next rank with the largest s²/c that still fits.

    Within a module the gains s_j² are non-increasing, so the module's next rank is always its best one; a
    module whose next rank no longer fits is closed (all its later ranks cost the same and gain less).
    """
    ranks = {s.name: 0 for s in spectra}
    left = budget
    # Honour min_rank first (as far as the budget allows), in order of best first-rank efficiency.
    if min_rank > 0:
        order = sorted(spectra, key=lambda s: -(s.energies()[0] / s.cost_per_rank if s.cap else 0.0))
        for s in order:
            want = min(min_rank, s.cap)
            if want * s.cost_per_rank <= left:
                ranks[s.name] = want
                left -= want * s.cost_per_rank
    heap: list[tuple[float, int, int]] = []
    energies = [s.energies() for s in spectra]
    for i, s in enumerate(spectra):
        r = ranks[s.name]
        if r < s.cap and s.cost_per_rank > 0:
            heapq.heappush(heap, (-energies[i][r] / s.cost_per_rank, i, r))
    while heap:
        _, i, r = heapq.heappop(heap)
        s = spectra[i]
        if s.cost_per_rank > left:
            continue  # closed: later ranks of this module cannot fit either
        ranks[s.name] = r + 1
        left -= s.cost_per_rank
        if r + 1 < s.cap:
            heapq.heappush(heap, (-energies[i][r + 1] / s.cost_per_rank, i, r + 1))
    return ranks


def allocate_budget(spectra: Sequence[ModuleSpectrum], budget: int, *, min_rank: int = 0) -> Allocation:
    """Per-module ranks maximising retained energy with ``Σ cost_per_rank·rank ≤ budget``.

    The greedy solution is compared with the best uniform rank for the same budget and the better one is
    returned (ties go to uniform, which is simpler to read), so the result is never worse than uniform.
    """
    if budget < 0:
        raise ValueError(f"budget must be ≥ 0, got {budget}")
    total = sum(s.total_energy for s in spectra)
    greedy = greedy_ranks(spectra, budget, min_rank=min_rank)
    g_energy = allocation_energy(spectra, greedy)
    u_rank = best_uniform_rank(spectra, budget)
    uniform = uniform_ranks(spectra, u_rank)
    u_energy = allocation_energy(spectra, uniform)
    if g_energy > u_energy:
        ranks, energy, method = greedy, g_energy, "greedy"
    else:
        ranks, energy, method = uniform, u_energy, "uniform"
    return Allocation(ranks=ranks, params=allocation_params(spectra, ranks), retained_energy=energy,
                      total_energy=total, method=method, uniform_rank=u_rank, uniform_retained_energy=u_energy)


def lora_cost_per_rank(math_shape: Sequence[int]) -> int:
    """Parameters per rank of a LoRA on a weight with math shape ``(out, in, *k)``: out + in·∏k."""
    out = int(math_shape[0])
    rest = 1
    for d in math_shape[1:]:
        rest *= int(d)
    return out + rest


__all__ = [
    "Allocation",
    "ModuleSpectrum",
    "allocate_budget",
    "allocation_energy",
    "allocation_params",
    "best_uniform_rank",
    "greedy_ranks",
    "lora_cost_per_rank",
    "uniform_ranks",
]
