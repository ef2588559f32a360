"""Budgets and verdicts: do a host's models fit its GPUs (dgpu) or its unified memory (Jetson)?

Why here and not on the box: the same check runs from `vilms plan` and from the Ansible preflight, before any
host changes, so an over-full host fails with numbers and a fix instead of an engine crash mid-rollout.

Pools: one per GPU on dgpu hosts (vLLM reserves `gpu-memory-utilization` x card on each of its
tensor-parallel GPUs, 0..tp-1, because compose hands every engine all GPUs and each takes the first ones;
Ollama and CUDA-resident gateway models take the GPU with most room, Ollama splitting across GPUs when one is
not enough), plus host RAM for what the gateway runs on CPU; on a Jetson one unified pool, minus an OS reserve.
Verdicts: over (headroom < 0, or vLLM utilisations on a GPU sum past 1), tight (headroom under 20% of the
estimated part: the estimates are good to about +-20%; for vLLM's own need inside its reservation, 20% of
KV cache + overhead and 5% of the weights), fits. A tight host passes only with
`host.accept-tight-fit: true`. A model with no figure is a warning asking for `memory-gb`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vilms.deploy import capacity_data as data
from vilms.deploy.capacity import Demand, demands, max_context_for
from vilms.config.model import Config

TIGHT = 0.2
_RANK = {"fits": 0, "tight": 1, "over": 2}
# A declared host.memory-gb (or --memory-gb) that the probe contradicts by more than this share of the probed figure
# stops the plan, naming both: the declaration is what `vilms plan --inventory` plans the fleet with, so a wrong one
# must be corrected, not silently outvoted on the day of the run (docs/capacity.md).
DECLARED_TOLERANCE = 0.10


class DeclaredMemoryMismatch(ValueError):
    """host.memory-gb says one size, the host's probe (nvidia-smi, device tree + MemTotal) another."""

    pointer = "/host/memory-gb"


@dataclass(frozen=True)
class Facts:
    """What was probed on the host (all optional: a CLI run may know only --memory-gb)."""

    gpu_mib: tuple[float, ...] = ()    # nvidia-smi memory.total per GPU
    device_model: str = ""             # /proc/device-tree/model (Jetson)
    meminfo_mib: float | None = None   # MemTotal
    gpu: bool = True                   # false = the host runs the CPU profile (vilms_gpu: false)


@dataclass(frozen=True)
class HostMemory:
    """The memory a host offers models. Jetson: `unified` minus `reserve`; dgpu: each GPU, and RAM."""

    platform: str
    gpus: tuple[float, ...] = ()
    unified: float | None = None
    ram: float | None = None
    reserve: float = 0.0
    description: str = ""


@dataclass
class Pool:
    name: str
    capacity: float
    budget: float | None                 # None: size unknown, not checked (dgpu RAM without MemTotal)
    reserved: float = 0.0                # vLLM reservations: exact
    estimated: float = 0.0               # everything else: estimates
    utilization: float = 0.0             # sum of vLLM gpu-memory-utilization on this GPU
    members: list[str] = field(default_factory=list)

    @property
    def headroom(self) -> float | None:
        return None if self.budget is None else self.budget - self.reserved - self.estimated

    @property
    def verdict(self) -> str:
        room = self.headroom
        if room is None:
            return "fits"
        if room < -1e-9 or self.utilization > 1 + 1e-9:
            return "over"
        return "tight" if self.estimated and room < TIGHT * self.estimated else "fits"

    def as_dict(self) -> dict[str, Any]:
        return {"pool": self.name, "capacity_gib": _r(self.capacity), "budget_gib": _r(self.budget),
                "reserved_gib": _r(self.reserved), "estimated_gib": _r(self.estimated),
                "utilization": round(self.utilization, 3), "headroom_gib": _r(self.headroom),
                "verdict": self.verdict, "models": list(self.members)}


@dataclass
class ModelLine:
    model: str
    engine: str
    estimate: float | None     # what the host must hold for it (vLLM: its reservation)
    need: float | None         # vLLM: what it needs inside the reservation
    pools: list[str]
    basis: str
    verdict: str = "fits"

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "engine": self.engine, "estimate_gib": _r(self.estimate),
                "need_gib": _r(self.need), "pools": self.pools, "basis": self.basis, "verdict": self.verdict}


@dataclass
class HostPlan:
    host: str
    memory: HostMemory
    pools: list[Pool]
    models: list[ModelLine]
    problems: list[str]
    warnings: list[str]
    remote: list[str]
    accept_tight_fit: bool
    layers: list[str] = field(default_factory=list)   # the inventory's config layers, in merge order (--inventory)

    @property
    def verdict(self) -> str:
        ranks = [_RANK[p.verdict] for p in self.pools] + [_RANK.get(m.verdict, 0) for m in self.models]
        return {v: k for k, v in _RANK.items()}[max(ranks, default=0)]

    @property
    def ok(self) -> bool:
        return self.verdict == "fits" or (self.verdict == "tight" and self.accept_tight_fit)

    def as_dict(self) -> dict[str, Any]:
        m = self.memory
        return {"host": self.host, "platform": m.platform, "memory": m.description, "gpus_gib": [_r(g) for g in m.gpus],
                "unified_gib": _r(m.unified), "ram_gib": _r(m.ram), "os_reserve_gib": _r(m.reserve),
                "pools": [p.as_dict() for p in self.pools], "models": [x.as_dict() for x in self.models],
                "verdict": self.verdict, "accept_tight_fit": self.accept_tight_fit, "ok": self.ok,
                "problems": self.problems, "warnings": self.warnings, "remote": self.remote,
                **({"layers": self.layers} if self.layers else {})}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


# --- budgets ---------------------------------------------------------------------------------------------

def jetson_reserve(size_gb: float) -> float:
    """The OS reserve the SKU table gives a board of this nominal size (first family listing it); else a share."""
    for sku in data.JETSON_SKUS:
        if size_gb in sku.sizes:
            return sku.sizes[int(size_gb)]
    share, floor = data.JETSON_GENERIC_RESERVE
    return max(floor, share * size_gb)


def jetson_memory(facts: Facts, memory_gb: float | None = None, reserve_gb: float | None = None) -> HostMemory:
    """Jetson: the SKU from the device tree (family) and MemTotal (size within it), or a declared size."""
    meminfo = facts.meminfo_mib / 1024 if facts.meminfo_mib else None
    model = facts.device_model.strip("\x00 \n").lower()
    sku = next((s for s in data.JETSON_SKUS if s.match in model), None) if model else None
    if memory_gb is not None:
        size, what = float(memory_gb), f"{memory_gb:g} GB (declared)"
        if meminfo:
            _check_declared(size, [_jetson_probe(sku, meminfo)])
            what = f"{memory_gb:g} GB (declared; the probe agrees)"
    elif sku and meminfo:
        size, what = _jetson_probe(sku, meminfo)
    elif sku:
        size = float(max(sku.sizes))
        what = f"{sku.family} {size:g} GB (device tree; MemTotal unknown: largest of the family)"
    elif meminfo:
        size, what = meminfo, f"MemTotal {meminfo:.1f} GiB (board not in the SKU table)"
    else:
        raise ValueError("no memory figure: pass --memory-gb, or set host.memory-gb in the config")
    if reserve_gb is not None:
        reserve = float(reserve_gb)
    elif sku and size in sku.sizes:
        reserve = sku.sizes[int(size)]
    else:
        reserve = jetson_reserve(size)
    return HostMemory("js", unified=size, reserve=reserve, description=f"{what} - {reserve:g} GiB OS reserve")


def _jetson_probe(sku: data.JetsonSku | None, meminfo: float) -> tuple[float, str]:
    """(the board's size as probed, how it was found): the SKU's nominal size nearest MemTotal, else MemTotal."""
    if sku:
        size = float(min(sku.sizes, key=lambda s: abs(s - meminfo)))
        return size, f"{sku.family} {size:g} GB (device tree, MemTotal {meminfo:.1f} GiB)"
    return meminfo, f"MemTotal {meminfo:.1f} GiB"


def _check_declared(declared: float, probed: list[tuple[float, str]], per: str = "") -> None:
    """Raise DeclaredMemoryMismatch when a probed figure is more than DECLARED_TOLERANCE away from the declared one."""
    off = [(size, what) for size, what in probed if abs(declared - size) > DECLARED_TOLERANCE * size]
    if off:
        found = ", ".join(what for _, what in probed)
        raise DeclaredMemoryMismatch(
            f"host.memory-gb declares {declared:g} GB{per} but the host reports {found}: more than "
            f"{DECLARED_TOLERANCE:.0%} apart. Correct host.memory-gb in the host's config layer (or remove it, and "
            f"the probe decides)")


def dgpu_memory(facts: Facts, memory_gb: float | None = None, gpus: int | None = None,
                reserve_gb: float | None = None) -> HostMemory:
    """dgpu: each GPU's memory (nvidia-smi, or declared per GPU x count), and RAM for CPU-resident models."""
    ram = facts.meminfo_mib / 1024 if facts.meminfo_mib else None
    reserve = data.DGPU_RAM_RESERVE_GIB if reserve_gb is None else float(reserve_gb)
    if not facts.gpu and memory_gb is None and gpus is None:
        return HostMemory("dgpu", ram=ram, reserve=reserve, description="CPU profile: host RAM only")
    if memory_gb is not None:
        per_gpu = (float(memory_gb),) * (gpus or len(facts.gpu_mib) or 1)
        what = f"{len(per_gpu)} x {memory_gb:g} GB GPU (declared)"
        probed = [m / 1024 for m in facts.gpu_mib][: gpus or None]
        if probed:
            _check_declared(float(memory_gb), [(g, f"GPU {i} {g:.1f} GiB (nvidia-smi)") for i, g in enumerate(probed)],
                            " per GPU")
            what = f"{len(per_gpu)} x {memory_gb:g} GB GPU (declared; nvidia-smi agrees)"
    else:
        per_gpu = tuple(m / 1024 for m in facts.gpu_mib)
        if gpus is not None:
            per_gpu = (per_gpu[:gpus] + per_gpu[-1:] * gpus)[:gpus] if per_gpu else ()
        if not per_gpu:
            raise ValueError("no GPU memory figure: pass --memory-gb (per GPU), or set host.memory-gb")
        what = f"{len(per_gpu)} GPU(s), " + ", ".join(f"{g:.1f}" for g in per_gpu) + " GiB (nvidia-smi)"
    return HostMemory("dgpu", gpus=per_gpu, ram=ram, reserve=reserve, description=what)


def host_memory(config: Config, facts: Facts, memory_gb: float | None = None, gpus: int | None = None) -> HostMemory:
    """Explicit arguments, then the config's `host` overrides (the inventory's say), then the probed facts."""
    host = config.raw.get("host", {})
    memory_gb = memory_gb if memory_gb is not None else host.get("memory-gb")
    gpus = gpus if gpus is not None else host.get("gpus")
    reserve = host.get("os-reserve-gb")
    if config.platform == "js":
        return jetson_memory(facts, memory_gb, reserve)
    return dgpu_memory(facts, memory_gb, gpus, reserve)


# --- placement and verdicts ------------------------------------------------------------------------------

def make_pools(mem: HostMemory) -> tuple[list[Pool], Pool | None]:
    """(GPU or unified pools, the RAM pool if separate)."""
    if mem.platform == "js":
        return [Pool("unified", mem.unified or 0.0, (mem.unified or 0.0) - mem.reserve)], None
    ram = Pool("RAM", mem.ram or 0.0, None if mem.ram is None else mem.ram - mem.reserve)
    return [Pool(f"GPU {i}", g, g) for i, g in enumerate(mem.gpus)], ram


def place(pools: list[Pool], ram: Pool | None, items: list[Demand]) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Charge each demand to its pool(s); return which pools hold each model and what it was charged."""
    where: dict[str, list[str]] = {}
    charged: dict[str, float] = {}
    targets = pools or ([ram] if ram else [])
    for d in sorted(items, key=lambda d: (d.engine != "vllm", -(d.estimate.gib or 0))):
        if d.estimate.gib is None and d.engine != "vllm":
            continue
        if d.device == "cpu" and ram is not None and pools:
            _charge(ram, d, d.estimate.gib or 0.0)
            where[d.model], charged[d.model] = [ram.name], d.estimate.gib or 0.0
        elif d.engine == "vllm" and pools:
            span = pools[: max(1, d.tensor_parallel)]
            for p in span:
                p.reserved += d.utilization * p.capacity
                p.utilization += d.utilization
                p.members.append(d.model)
            where[d.model], charged[d.model] = [p.name for p in span], sum(d.utilization * p.capacity for p in span)
        else:
            where[d.model], charged[d.model] = _fit(targets, d), d.estimate.gib or 0.0
    return where, charged


def _charge(pool: Pool, d: Demand, gib: float) -> None:
    pool.estimated += gib
    pool.members.append(d.model)


def _fit(pools: list[Pool], d: Demand) -> list[str]:
    """The pool with most room; Ollama splits layers over several GPUs when no single one holds it."""
    need = d.estimate.gib or 0.0
    ordered = sorted(pools, key=lambda p: -(p.headroom if p.headroom is not None else math.inf))
    if len(ordered) > 1 and d.engine == "ollama" and (ordered[0].headroom or 0) < need:
        free = [max(0.0, p.headroom or 0.0) for p in ordered]
        total = sum(free) or float(len(ordered))
        for p, f in zip(ordered, free):
            _charge(p, d, need * (f / total if sum(free) else 1 / len(ordered)))
        return [p.name for p in ordered]
    _charge(ordered[0], d, need)
    return [ordered[0].name]


def plan_host(host: str, config: Config, mem: HostMemory, accept_tight_fit: bool | None = None) -> HostPlan:
    """Estimate, place and judge every model of one host."""
    device_gib = mem.unified if mem.platform == "js" else (sum(mem.gpus) or (mem.ram or 0.0))
    items, remote = demands(config, device_gib)
    pools, ram = make_pools(mem)
    if mem.platform == "dgpu" and not pools:
        items = [Demand(d.model, d.engine, d.estimate, d.pointer, device="cpu") for d in items]
    where, charged = place(pools, ram, items)
    all_pools = pools + ([ram] if ram is not None and (ram.members or ram.budget is not None) else [])
    accept = bool(config.raw.get("host", {}).get("accept-tight-fit", False)) if accept_tight_fit is None else accept_tight_fit
    plan = HostPlan(host, mem, all_pools, [], [], [], remote, accept)
    by_name = {p.name: p for p in all_pools}
    for d in items:
        plan.models.append(_judge(plan, d, where.get(d.model, []), charged.get(d.model), by_name))
    _pool_problems(plan, items)
    return plan


def _judge(plan: HostPlan, d: Demand, names: list[str], charged: float | None, pools: dict[str, Pool]) -> ModelLine:
    est = d.estimate
    reserving = d.engine == "vllm" and bool(plan.memory.gpus or plan.memory.platform == "js")  # else CPU profile
    line = ModelLine(d.model, d.engine, charged if reserving else est.gib, est.gib if reserving else None, names,
                     est.parts())
    if est.gib is None:
        line.verdict = "unknown"
        plan.warnings.append(f"{plan.host}: no memory figure for {d.model} ({est.basis}): declare memory-gb in its "
                             f"model entry ({d.pointer}/memory-gb), in GiB; it is not counted in this plan")
        return line
    verdicts = [pools[n].verdict for n in names if n in pools]
    if reserving:
        verdicts.append(_vllm_inner(plan, d, charged or 0.0))
    if d.engine == "vllm" and d.tensor_parallel > max(1, len(plan.memory.gpus)) and plan.memory.platform == "dgpu":
        verdicts.append("over")
        plan.problems.append(f"{plan.host}: {d.model} sets tensor-parallel-size {d.tensor_parallel} but the host has "
                             f"{len(plan.memory.gpus)} GPU(s): lower it, or move the model to a host with "
                             f"{d.tensor_parallel} GPUs")
    line.verdict = max(verdicts or ["fits"], key=lambda v: _RANK[v])
    return line


def _vllm_inner(plan: HostPlan, d: Demand, reserved: float) -> str:
    """vLLM starts only when weights + overhead + KV for one max-model-len sequence fit in its reservation."""
    est, need = d.estimate, d.estimate.gib or 0.0
    # Weights from a parameter count are good to a few %; KV cache and overhead are the uncertain part.
    margin = TIGHT * (est.kv + est.overhead) + 0.05 * est.weights if est.weights else TIGHT * need
    if need + margin <= reserved:
        return "fits"
    per_gpu = reserved / max(1, d.tensor_parallel)
    cap = per_gpu / d.utilization if d.utilization else per_gpu
    util_needed = math.ceil(need / max(1, d.tensor_parallel) / cap * 100) / 100 if cap else math.inf
    ctx = max_context_for(est, reserved)
    fixes = []
    if util_needed <= 0.95:
        fixes.append(f"raise its gpu-memory-utilization to >= {util_needed:.2f}")
    if est.kv and ctx >= 256:
        fixes.append(f"set max-model-len <= {ctx}")
    per_gpu_need = need / max(1, d.tensor_parallel) / (d.utilization or 1.0)
    fixes.append(f"move it to a host with >= {_size_for(per_gpu_need, 'dgpu')} GB GPUs (at gpu-memory-utilization "
                 f"{d.utilization:g})")
    verdict = "over" if need > reserved else "tight"
    head = (f"{plan.host}: {d.model} needs {need:.1f} GiB ({est.parts()}) but reserves "
            f"{d.utilization:g} x {cap:.1f} GiB = {reserved:.1f} GiB")
    if verdict == "over":
        plan.problems.append(f"{head}; vLLM will not start: " + ", or ".join(fixes))
    else:
        plan.problems.append(f"{head}: less spare than the estimate's error ({margin:.1f} GiB); " + ", or ".join(fixes)
                             + ", or set host.accept-tight-fit: true to accept")
    return verdict


def _pool_problems(plan: HostPlan, items: list[Demand]) -> None:
    by_model = {d.model: d for d in items}
    for pool in plan.pools:
        verdict = pool.verdict
        if verdict == "fits":
            continue
        room = pool.headroom or 0.0
        if pool.utilization > 1 + 1e-9:
            vllm = [m for m in pool.members if by_model.get(m) and by_model[m].engine == "vllm"]
            each = math.floor(0.95 / max(1, len(vllm)) * 100) / 100
            shares = ", ".join(f"{m} {by_model[m].utilization:g}" for m in vllm)
            plan.problems.append(
                f"{plan.host}: the vLLM services on {pool.name} reserve {pool.utilization:.2f} of its "
                f"{pool.capacity:.1f} GiB (gpu-memory-utilization {shares}); they cannot all start: set their "
                f"gpu-memory-utilization to sum <= 1 (e.g. {each:g} each, if each model's need still fits), "
                f"or move one to another host")
            continue
        biggest = max((by_model[m] for m in pool.members if m in by_model), key=lambda d: d.estimate.gib or 0.0)
        listing = ", ".join(f"{m} {by_model[m].estimate.gib or 0:.1f}" for m in pool.members if m in by_model
                            and by_model[m].engine != "vllm")
        head = (f"{plan.host}: {pool.name} holds {pool.reserved + pool.estimated:.1f} GiB of a {pool.budget:.1f} GiB "
                f"budget ({plan.memory.description}); models: {listing or '-'}"
                + (f" + vLLM reservations {pool.reserved:.1f}" if pool.reserved else ""))
        est = biggest.estimate
        size = _size_for(est.gib or 0.0, plan.memory.platform)
        here = plan.memory.unified if plan.memory.platform == "js" else pool.capacity
        where = "another host" if size <= (here or 0) + 0.5 else "a host"
        fixes = [f"move {biggest.model} ({est.gib or 0:.1f} GiB) to {where} with >= {size} GB"]
        if est.kv > max(0.1, -room if verdict == "over" else TIGHT * pool.estimated - room) and biggest.engine == "ollama":
            fixes.append(f"set params.num-ctx lower for {biggest.model} (its KV cache is {est.kv:.1f} GiB at "
                         f"{est.context} tokens)")
        fixes.append(f"declare memory-gb at {biggest.pointer} if you measured it lower")
        if verdict == "over":
            plan.problems.append(f"{head}: {-room:.1f} GiB over; " + ", or ".join(fixes))
        else:
            plan.problems.append(f"{head}: only {room:.1f} GiB headroom (< {int(TIGHT * 100)}% of the estimates); "
                                 + ", or ".join(fixes) + ", or set host.accept-tight-fit: true to accept")


def _size_for(gib: float, platform: str) -> int:
    """The smallest standard board (Jetson, after its OS reserve) or GPU that holds `gib`."""
    if platform == "js":
        sizes = sorted({s for sku in data.JETSON_SKUS for s in sku.sizes})
        return next((s for s in sizes if s - jetson_reserve(s) >= gib), sizes[-1])
    return next((s for s in data.GPU_SIZES_GB if s >= gib), data.GPU_SIZES_GB[-1])


def render_text(plans: list[HostPlan]) -> str:
    """The operator's view: per host, each model with estimate, budget, headroom and verdict, then the fixes."""
    out = []
    for plan in plans:
        mem = plan.memory
        out.append(f"host {plan.host} ({mem.platform}): {mem.description}")
        if plan.layers:
            out.append("  layers: " + " <- ".join(plan.layers))
        out.append(f"  {'model':<40} {'engine':<7} {'estimate':>9} {'pool':<8} {'budget':>7} {'headroom':>9}  verdict")
        pools = {p.name: p for p in plan.pools}
        for line in plan.models:
            pool = pools.get(line.pools[0]) if line.pools else None
            est = "?" if line.estimate is None else f"{line.estimate:.2f}"
            budget = "-" if pool is None or pool.budget is None else f"{pool.budget:.2f}"
            room = "-" if pool is None or pool.headroom is None else f"{pool.headroom:.2f}"
            where = "+".join(n.replace("GPU ", "gpu") for n in line.pools) or "-"
            need = f" (needs {line.need:.2f})" if line.need is not None else ""
            out.append(f"  {line.model[:40]:<40} {line.engine:<7} {est:>9} {where:<8} {budget:>7} {room:>9}  "
                       f"{line.verdict}{need}")
        for name in plan.remote:
            out.append(f"  {name[:40]:<40} {'remote':<7} {'-':>9} {'-':<8} {'-':>7} {'-':>9}  not on this host")
        for pool in plan.pools:
            util = f", vLLM utilisation {pool.utilization:.2f}" if pool.utilization else ""
            budget = "unknown" if pool.budget is None else f"{pool.budget:.2f} GiB"
            room = "-" if pool.headroom is None else f"{pool.headroom:.2f}"
            out.append(f"  pool {pool.name}: budget {budget}, reserved {pool.reserved:.2f}, estimated "
                       f"{pool.estimated:.2f}, headroom {room}{util}: {pool.verdict}")
        accepted = " (tight fit accepted: host.accept-tight-fit)" if plan.verdict == "tight" and plan.ok else ""
        out.append(f"  verdict: {plan.verdict}{accepted} -> {'OK' if plan.ok else 'FAIL'}")
        out += [f"  problem: {p}" for p in plan.problems] + [f"  warning: {w}" for w in plan.warnings]
    return "\n".join(out) + "\n"
