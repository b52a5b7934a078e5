"""Alpha-beta-gamma cost model of every collective algorithm, the size-based choice, and its
calibration.

Thakur, Rabenseifner and Gropp (2005): a message of n bytes costs alpha + n*beta, reducing it
n*gamma. `algorithm_cost` is linear in (alpha, beta, gamma), so `fit_link_params` fits them by least
squares from measured times, and `calibrate` measures a sweep and saves the fit per transport as
JSON; `impl="auto"` picks the cheapest (algorithm, transport) with those values, like NCCL's tuner
does with its own table. Sizes follow nccl-tests: all_reduce/broadcast the buffer, all_gather the
output, reduce_scatter the input, all_to_all one rank's buffer."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

# point-to-point algorithms: run on any transport
ALGORITHMS: dict[str, tuple[str, ...]] = {
    "all_reduce": ("ring", "rabenseifner", "recursive_doubling", "double_binary_tree"),
    "all_gather": ("ring", "recursive_doubling"),
    "reduce_scatter": ("ring", "recursive_halving"),
    "broadcast": ("binomial_tree", "scatter_allgather"),
    "all_to_all": ("pairwise",),
    "barrier": ("dissemination",),
}
# direct algorithms: read peers' buffers in place, shared-memory transport only
SHM_ALGORITHMS: dict[str, tuple[str, ...]] = {
    "all_reduce": ("one_shot", "two_shot", "cma_two_shot", "push_two_shot"),
    "all_gather": ("direct",),
    "reduce_scatter": ("direct",),
    "broadcast": ("direct",),
    "all_to_all": ("direct",),
    "barrier": ("direct",),
}
# need an in-place buffer from CommGroup.alloc(); other tensors run as staging two_shot
REGISTERED_ONLY = ("push_two_shot",)
NATIVE = "native"  # torch.distributed's own collective (gloo, NCCL)
# cost-model keys: shm direct algorithms, point-to-point on shm mailboxes, on torch, and native
TRANSPORTS = ("shm", "shm_p2p", "torch", NATIVE)
# ShmConfig.chunk_bytes default: direct algorithms pay a barrier per chunk, and on a CPU shared with
# other jobs each barrier can cost a scheduling delay (measured there: 16 MiB chunks ran a 64 MiB
# all_reduce about twice as fast as 1 MiB chunks); staging costs 2 chunks of memory per rank
SHM_CHUNK_BYTES = 8 << 20
# a call's kernel set-up as the bytes a copy moves meanwhile (a beta term, so the model needs no
# fourth parameter, and not an alpha one: alpha also prices scheduling delays at barriers): 1 MiB
# pieces added ~3.5 ms over 63 more calls, ~55 us a call, ~0.5 MB at the default shm beta
CMA_CALL_BYTES = 512 << 10
# a process_vm_writev byte costs more CPU than a memcpy byte (the kernel pins each 4 KiB page of the
# peer before copying it: 7.0 against 3.0 ms per 32 MiB on one core here), but cma_two_shot pushes
# its reduced slice from this core's cache while the peers work, and it skips the gather copies out
# of staging (at 64 MiB 15-25% faster than staging two_shot at world 2, ~10% at world 4), which
# the model sees from a factor near 1 (calibrate() fits each algorithm's own scale)
CMA_BETA_FACTOR = 1.05
# 8 B .. 64 MiB every factor of 2: the per-byte cost of the shm algorithms does not fall smoothly
# with size (the buffers leave the 2 MiB L2s between 2 and 8 MiB), so the fit needs every octave
CALIBRATION_SIZES = tuple(8 << k for k in range(24))
DEFAULT_TUNING_PATH = Path.home() / ".cache" / "aiinfra" / "comm_tuning.json"


@dataclass(frozen=True, kw_only=True)
class LinkParams:
    """Alpha-beta-gamma model of one transport / link."""

    alpha_s: float  # per-message latency, seconds
    beta_s_per_byte: float  # transfer time per byte
    gamma_s_per_byte: float  # reduction compute time per byte
    # size-dependent efficiency (caches): a byte of an n-byte message costs byte_factor(n) times a
    # byte of the largest knot's size; knots (bytes, factor), interpolated in log2(size), constant
    # beyond both ends; () = 1 at every size (the planner's links)
    byte_factors: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        for field in ("alpha_s", "beta_s_per_byte", "gamma_s_per_byte"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{field} ({value}) must be finite and >= 0")
        sizes = [n for n, _ in self.byte_factors]
        if sizes != sorted(set(sizes)) or any(n < 1 for n in sizes):
            raise ValueError(f"byte_factors sizes ({sizes}) must be >= 1 and increasing")
        if any(not (math.isfinite(f) and f >= 0) for _, f in self.byte_factors):
            raise ValueError(f"byte_factors ({self.byte_factors}) must be finite and >= 0")

    def byte_factor(self, nbytes: int) -> float:
        """Cost of a byte at this message size relative to a byte of a large message.

        A message that fits in cache streams faster than one that goes to memory, and the curve has
        more than one knee: measured here, shm all_reduce's per-byte cost steps up where the
        buffers leave the 2 MiB L2s (1 -> 2 MiB: push_two_shot 3.6x the time for 2x the bytes) and
        again where they leave the last-level cache (32 -> 64 MiB: cma_two_shot 2.6x), with a
        plateau, even a dip, between. So the factor is piecewise linear in log2(size) through
        fitted knots (calibrate() puts them every 4x from 64 KiB to 64 MiB), not a formula.
        """
        knots = self.byte_factors
        if not knots:
            return 1.0
        if nbytes <= knots[0][0]:
            return knots[0][1]
        for (n0, f0), (n1, f1) in zip(knots, knots[1:], strict=False):
            if nbytes <= n1:
                w = math.log2(nbytes / n0) / math.log2(n1 / n0)
                return f0 + w * (f1 - f0)
        return knots[-1][1]


# the knots of the fitted byte_factors: every 4x from 64 KiB (smaller messages are latency-bound) to
# 64 MiB; a fit uses those inside its samples' size range
CACHE_KNOTS = tuple((64 << 10) << 2 * k for k in range(6))


# Until calibrate() has run: rough values for this class of machine (2 CPU cores, loopback TCP for
# gloo).
DEFAULT_PARAMS: dict[str, LinkParams] = {
    # an add streams 3 arrays where a copy streams 2: gamma ~ 1.5 beta in memory-bound code
    "shm": LinkParams(alpha_s=8e-6, beta_s_per_byte=1 / 8e9, gamma_s_per_byte=1 / 5.3e9),
    # a mailbox message is copied twice (into the slot, out of it) in 1 MiB handshakes
    "shm_p2p": LinkParams(alpha_s=40e-6, beta_s_per_byte=1 / 3e9, gamma_s_per_byte=1 / 5.3e9),
    "torch": LinkParams(alpha_s=150e-6, beta_s_per_byte=1 / 1.5e9, gamma_s_per_byte=1 / 8e9),
    NATIVE: LinkParams(alpha_s=400e-6, beta_s_per_byte=1 / 1.5e9, gamma_s_per_byte=1 / 8e9),
}


def cost_terms(
    op: str, algorithm: str, nbytes: int, world_size: int, chunk_bytes: int = SHM_CHUNK_BYTES
) -> tuple[float, float, float]:
    """Coefficients (of alpha, beta, gamma) of the time of `algorithm` for `op` on `world_size`
    ranks."""
    p, n = world_size, float(nbytes)
    if p == 1:
        return (0.0, 0.0, 0.0)
    L = math.ceil(math.log2(p))  # rounds of a tree over p ranks
    p2 = 1 << (p.bit_length() - 1)
    L2, fold = math.log2(p2), float(p != p2)  # non-powers of two fold the extra ranks in and out
    f = (p - 1) / p
    c = max(1, math.ceil(n / chunk_bytes))
    if algorithm == NATIVE:  # modelled as the bandwidth-optimal algorithm torch's backends use
        algorithm = {"broadcast": "binomial_tree", "all_to_all": "pairwise"}.get(op, "ring")
        algorithm = "dissemination" if op == "barrier" else algorithm
    table: dict[tuple[str, str], tuple[float, float, float]] = {
        ("all_reduce", "ring"): (2 * (p - 1), 2 * f * n, f * n),
        ("all_reduce", "rabenseifner"): (
            2 * L2 + 2 * fold,
            2 * (p2 - 1) / p2 * n + 2 * fold * n,
            (p2 - 1) / p2 * n + fold * n,
        ),
        ("all_reduce", "recursive_doubling"): (L2 + 2 * fold, (L2 + 2 * fold) * n, (L2 + fold) * n),
        ("all_reduce", "double_binary_tree"): _tree_terms(p, n),
        # direct: alpha counts barriers (a release is a store); beta a copy, gamma an add per byte
        ("all_reduce", "one_shot"): (c, n, (p - 1) * n),
        # two-shot is software-pipelined: one barrier per chunk plus one to drain
        ("all_reduce", "two_shot"): (c + 1, 2 * f * n + n / p, f * n),
        # a barrier per chunk plus a closing one; copy in the peers' slices (memcpy), then push
        # the reduced slice into the p-1 peers' outputs (one process_vm_writev each per chunk)
        ("all_reduce", "cma_two_shot"): (
            c + 1,
            f * n + (f * n + CMA_CALL_BYTES * (p - 1) * c) * CMA_BETA_FACTOR,
            f * n,
        ),
        # registered buffers only (other tensors run as two_shot): two barriers, reduce slice r of
        # every buffer in place, copy it into the p-1 peers' buffers
        ("all_reduce", "push_two_shot"): (2, f * n, f * n),
        ("all_gather", "ring"): (p - 1, f * n, 0.0),
        ("all_gather", "recursive_doubling"): (
            L2 + 2 * fold,
            (p2 - 1) / p2 * n + fold * (n / p + n),
            0.0,
        ),
        ("all_gather", "direct"): (2 * max(1, math.ceil(n / p / chunk_bytes)), n / p + n, 0.0),
        ("reduce_scatter", "ring"): (p - 1, f * n, f * n),
        ("reduce_scatter", "recursive_halving"): (
            L2 + 2 * fold,
            (p2 - 1) / p2 * n + fold * (n + n / p),
            (p2 - 1) / p2 * n + fold * n,
        ),
        ("reduce_scatter", "direct"): (2 * c, f * n, f * n),
        ("broadcast", "binomial_tree"): (L, L * n, 0.0),
        ("broadcast", "scatter_allgather"): (L + p - 1, 2 * f * n, 0.0),
        ("broadcast", "direct"): (2 * c, 2 * n, 0.0),
        ("all_to_all", "pairwise"): (p - 1, f * n, 0.0),
        ("all_to_all", "direct"): (2 * c, 2 * f * n + n / p, 0.0),
        ("barrier", "dissemination"): (L, 0.0, 0.0),
        ("barrier", "direct"): (1.0, 0.0, 0.0),
    }
    if (op, algorithm) not in table:
        known = sorted(a for o, a in table if o == op) + [NATIVE]
        raise ValueError(f"algorithm ({algorithm!r}) is not one of {known} for op ({op!r})")
    return table[(op, algorithm)]


def _tree_terms(p: int, n: float) -> tuple[float, float, float]:
    # Not pipelined: each of d levels a node takes k halves from its children, then sends k halves
    # down.
    d = p.bit_length() - 1
    k = min(2, p - 1)
    return (2 * d * k, d * k * n, d * k * n / 2)


def algorithm_cost(
    op: str, algorithm: str, nbytes: int, world_size: int, params: LinkParams
) -> float:
    """Seconds `algorithm` takes for `op` on `nbytes` over `world_size` ranks on a link with
    `params`."""
    a, b, g = cost_terms(op, algorithm, nbytes, world_size)
    f = params.byte_factor(nbytes)
    return a * params.alpha_s + f * (b * params.beta_s_per_byte + g * params.gamma_s_per_byte)


def choose_algorithm(
    op: str,
    nbytes: int,
    world_size: int,
    params: LinkParams,
    candidates: Sequence[str] | None = None,
    overrides: Mapping[str, LinkParams] | None = None,
) -> str:
    """The cheapest of `candidates` (default: the point-to-point algorithms for `op`); an algorithm
    named in `overrides` is priced with its own parameters instead of `params`."""
    if op not in ALGORITHMS:
        raise ValueError(f"op ({op!r}) is not one of {sorted(ALGORITHMS)}")
    names = list(candidates) if candidates is not None else list(ALGORITHMS[op])
    if not names:
        raise ValueError(f"candidates ({candidates!r}) is empty")
    own = overrides or {}
    return min(names, key=lambda a: algorithm_cost(op, a, nbytes, world_size, own.get(a, params)))


def algorithm_key(transport: str, op: str, algorithm: str) -> str:
    """Key of one algorithm's own fitted parameters beside its transport's, e.g.
    "shm/all_reduce/two_shot"."""
    return f"{transport}/{op}/{algorithm}"


def algorithm_params(
    params: Mapping[str, LinkParams], transport: str, op: str, algorithm: str
) -> LinkParams:
    """The algorithm's own calibrated parameters if calibrate() fitted them, else the
    transport's."""
    return params.get(algorithm_key(transport, op, algorithm)) or params[transport]


# --- fitting --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    """One measured point: `seconds` per call of `algorithm` for `op` at `nbytes` on `world_size`
    ranks."""

    op: str
    algorithm: str
    nbytes: int
    world_size: int
    seconds: float


def fit_link_params(samples: Sequence[Sample]) -> LinkParams:
    """Non-negative least squares on relative error (times span five decades: weight 1/time)."""
    if not samples:
        raise ValueError("samples is empty")
    terms = np.array([cost_terms(s.op, s.algorithm, s.nbytes, s.world_size) for s in samples])
    x, _ = _nnls_relative(terms, np.array([s.seconds for s in samples]))
    return LinkParams(alpha_s=x[0], beta_s_per_byte=x[1], gamma_s_per_byte=x[2])


def fit_algorithm_params(
    samples: Sequence[Sample], transport: LinkParams, *, knots: Sequence[int] = ()
) -> LinkParams:
    """One algorithm's own alpha, byte-cost scale and byte_factors, from its samples alone.

    The samples of one algorithm cannot separate beta from gamma (both grow with n), so the
    transport's fitted ratio of the two is kept and only their common scale is fitted, one weight
    per knot: t = a_terms * alpha + sum_j w_j * hat_j(n) * (b_terms * beta + g_terms * gamma), where
    hat_j is 1 at knot j and falls linearly in log2(size) to 0 at its neighbours (the first and
    last extend flat). All linear: one non-negative least squares, no search. The last knot's
    weight becomes the scale, the others its byte_factors. What this adds over the transport's fit
    is each algorithm's own barrier cost (alpha), copy/add mix and cache curve."""
    if not samples:
        raise ValueError("samples is empty")
    if len({s.algorithm for s in samples}) != 1:
        raise ValueError(f"samples mix algorithms ({sorted({s.algorithm for s in samples})})")
    sizes = [s.nbytes for s in samples]
    inside = [k for k in knots if min(sizes) <= k <= max(sizes)]
    hats = [
        LinkParams(alpha_s=0, beta_s_per_byte=0, gamma_s_per_byte=0,
                   byte_factors=tuple((k, float(k == j)) for k in inside))
        for j in inside
    ] or [_ZERO]  # fmt: skip
    terms = np.array([cost_terms(s.op, s.algorithm, s.nbytes, s.world_size) for s in samples])
    per_byte = terms[:, 1] * transport.beta_s_per_byte + terms[:, 2] * transport.gamma_s_per_byte
    basis = np.array([[h.byte_factor(n) for h in hats] for n in sizes])
    x, _ = _nnls_relative(np.concatenate([terms[:, :1], basis * per_byte[:, None]], axis=1),
                          np.array([s.seconds for s in samples]))  # fmt: skip
    alpha, weights = x[0], x[1:]
    scale = weights[-1] if weights[-1] > 0 else max(weights.max(), 0.0)
    factors: tuple[tuple[int, float], ...] = ()
    if inside and scale > 0:
        factors = tuple((k, float(w / scale)) for k, w in zip(inside, weights, strict=True))
    return LinkParams(
        alpha_s=alpha,
        beta_s_per_byte=scale * transport.beta_s_per_byte,
        gamma_s_per_byte=scale * transport.gamma_s_per_byte,
        byte_factors=factors,
    )


_ZERO = LinkParams(alpha_s=0.0, beta_s_per_byte=0.0, gamma_s_per_byte=0.0)


def _nnls_relative(coeffs: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, float]:
    w = 1.0 / t
    Aw, tw = coeffs * w[:, None], t * w
    m = coeffs.shape[1]
    best, best_res = np.zeros(m), math.inf
    for mask in range(1, 1 << m):  # every subset of free parameters: exact NNLS for few unknowns
        cols = [i for i in range(m) if mask >> i & 1]
        x, *_ = np.linalg.lstsq(Aw[:, cols], tw, rcond=None)
        if (x < 0).any():
            continue
        full = np.zeros(m)
        full[cols] = x
        res = float(np.sum((Aw @ full - tw) ** 2))
        if res < best_res:
            best, best_res = full, res
    return best, best_res


# version 2 adds per-algorithm entries ("shm/all_reduce/two_shot", see algorithm_key) beside the
# per-transport ones; version 3 replaces the one-knee cache term (size_slope, size_ref_bytes,
# size_floor) by byte_factors. Older files load: version 1 as transport values only, version 2's
# cache terms are dropped (those entries price every byte alike until calibrate() runs again)
TUNING_VERSION = 3
_PARAM_FIELDS = {f.name for f in dataclasses.fields(LinkParams)}


def save_params(path: Path, world_size: int, params: dict[str, LinkParams]) -> None:
    """Merge the fit for `world_size` into the JSON file at `path` (one entry per world size)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data["version"] = TUNING_VERSION
    data.setdefault("world_sizes", {})[str(world_size)] = {k: asdict(v) for k, v in params.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def load_params(path: Path, world_size: int) -> dict[str, LinkParams] | None:
    """The fit for `world_size`, or for the nearest calibrated world size; None if none is saved."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    version = data.get("version", 1)
    if version > TUNING_VERSION:
        raise ValueError(f"{path}: version ({version}) is newer than this code's {TUNING_VERSION}")
    entries = data.get("world_sizes", {})
    if not entries:
        return None
    nearest = min(entries, key=lambda k: abs(int(k) - world_size))
    return {k: _from_json(v) for k, v in entries[nearest].items()}


def _from_json(entry: dict[str, Any]) -> LinkParams:
    values = {k: v for k, v in entry.items() if k in _PARAM_FIELDS}
    values["byte_factors"] = tuple((int(n), float(f)) for n, f in values.get("byte_factors", ()))
    return LinkParams(**values)


# a sample the first fit misses by more than this factor was hit by a scheduling delay (timed on
# a shared machine: a rank descheduled for ~100 us during 5 blocks of a 15 us call), not by the
# cost the model describes
OUTLIER_FACTOR = 1.5


def _refit_without_outliers(
    fit: Callable[[Sequence[Sample]], LinkParams], samples: Sequence[Sample]
) -> LinkParams:
    """fit(samples), then once more without the samples it misses by more than OUTLIER_FACTOR
    (kept if that would leave fewer than 4)."""
    first = fit(samples)

    def misses(s: Sample) -> float:
        predicted = algorithm_cost(s.op, s.algorithm, s.nbytes, s.world_size, first)
        return abs(math.log(predicted / s.seconds))

    kept = [s for s in samples if misses(s) <= math.log(OUTLIER_FACTOR)]
    return fit(kept) if len(kept) >= 4 and len(kept) < len(samples) else first


def calibrate(
    group: object,
    path: Path | None = DEFAULT_TUNING_PATH,
    sizes: Sequence[int] = CALIBRATION_SIZES,
    iters: int = 20,
) -> dict[str, LinkParams]:
    """Collective on `group` (a CommGroup): time all_reduce and all_gather algorithms on every
    transport over `sizes`, fit LinkParams per transport and per shm direct algorithm, save them
    to `path` (rank 0) and return them."""
    from aiinfra.comm.bench import measure_samples

    samples = measure_samples(group, sizes, iters)
    params = {}
    for transport, own in samples.items():
        if own:
            params[transport] = _refit_without_outliers(fit_link_params, own)
    if "shm" in params:
        # The direct algorithms differ in barriers per call and in their copy/add mix more than
        # one shared fit can follow (it priced staging two_shot 25-40% low): each gets its own,
        # with its cache curve (they run at memory speed, where caches shape the per-byte cost).
        by_algorithm: dict[tuple[str, str], list[Sample]] = {}
        for s in samples["shm"]:
            by_algorithm.setdefault((s.op, s.algorithm), []).append(s)
        shm = params["shm"]
        for (op, algorithm), own in by_algorithm.items():
            fit = _refit_without_outliers(
                partial(fit_algorithm_params, transport=shm, knots=CACHE_KNOTS), own
            )
            params[algorithm_key("shm", op, algorithm)] = fit
    if path is not None and getattr(group, "rank", 0) == 0:
        save_params(Path(path), getattr(group, "world_size", 1), params)
    return params
