"""The memory plan of a probe, made and checked before any forward: per device, the model's share, the float64
covariance state of the watched FFNs (and routed experts) kept there, and the transient peak of the
eigendecomposition that turns that state into spectra.

* Model share: the bytes of every parameter and buffer placed on a device (``disk``: offloaded by the
  device map; a quantized tensor counts its packed data and scales).
* State: the tracker's own ``state_bytes`` of the sites whose activations arrive on a device (each site's
  execution device under a device map, or ``state_device``). Widths unknown before a forward (modules that
  are not Linear-like) count 0 and are named in the plan.
* Eigendecomposition peak (:mod:`nerve_hf.spectra.exact`): on the CPU each of ``w = min(threads, matrices)``
  workers holds one covariance and LAPACK's copy of it, ``w x 2 x Dmax^2 x 8`` bytes; on an accelerator the
  covariances go in batches of at most ``EIGEN_BATCH_BYTES`` (or one matrix), about 4 x a batch.
  ``spectra="estimate"`` builds FFNs at least ``ESTIMATE_MIN_DIM`` wide without decomposing them.

:meth:`MemoryPlan.check` refuses (:class:`MemoryPlanError`, a ``ValueError``) a plan whose state and peak do not
fit in what a device has free now, and says what to do.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from nerve_hf.probe.placement import device_of, input_device

__all__ = ["MemoryPlanError", "DevicePlan", "MemoryPlan", "plan_memory", "tensor_bytes", "available_bytes"]


class MemoryPlanError(ValueError):
    """The probe's state and eigendecomposition would not fit in a device's free memory."""


@dataclass
class DevicePlan:
    """One device's share of a probe, in bytes."""

    device: str
    model_bytes: int = 0  # weights and buffers placed here
    state_bytes: int = 0  # float64 covariance state of the FFNs (and experts) whose statistics live here
    eigen_peak_bytes: int = 0  # transient peak of their eigendecomposition
    sites: int = 0  # FFN sites whose statistics live here
    available_bytes: Optional[int] = None  # free now (None: not known, or disk)

    @property
    def needed_bytes(self) -> int:
        """What the probe adds here beyond the loaded model."""
        return self.state_bytes + self.eigen_peak_bytes

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.needed_bytes <= self.available_bytes


@dataclass
class MemoryPlan:
    """Per device, what a probe needs (in the order devices are first met: model, then statistics)."""

    devices: list[DevicePlan]
    unknown_widths: list[str] = field(default_factory=list)  # sites whose width is known only after a forward
    state_device: Optional[str] = None

    def device(self, name: str) -> DevicePlan:
        """The plan of device ``name`` (``"cpu"``, ``"cuda:0"``, ``"disk"``); KeyError if none."""
        for plan in self.devices:
            if plan.device == name:
                return plan
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "devices": [asdict(plan) for plan in self.devices],
            "unknown_widths": list(self.unknown_widths),
            "state_device": self.state_device,
        }

    def format(self) -> str:
        """A table: device, model share, state, eigendecomposition peak, free (MiB)."""
        head = f"{'device':<10} {'model':>12} {'FFN state':>12} {'eigh peak':>12} {'free':>12}  sites"
        lines = ["memory plan (MiB):", head]
        for plan in self.devices:
            free = "-" if plan.available_bytes is None else _mib(plan.available_bytes)
            mark = "" if plan.fits else "  DOES NOT FIT"
            lines.append(
                f"{plan.device:<10} {_mib(plan.model_bytes):>12} {_mib(plan.state_bytes):>12} "
                f"{_mib(plan.eigen_peak_bytes):>12} {free:>12}  {plan.sites}{mark}"
            )
        if self.unknown_widths:
            lines.append(f"widths known after the first forward (state not counted): {', '.join(self.unknown_widths)}")
        return "\n".join(lines)

    def check(self, subject: str = "the probe", cli: bool = True) -> None:
        """MemoryPlanError naming each device that cannot hold its state and peak, and what to do: the
        options are named as ``nerve probe``'s flags (``cli``) or as the Python keywords."""

        def option(name: str, value: str = "") -> str:
            if cli:
                return f"--{name.replace('_', '-')}" + (f" {value}" if value else "")
            return f"{name}={value!r}" if value else name

        short = [plan for plan in self.devices if not plan.fits]
        if not short:
            return
        parts = [
            f"{plan.device} needs {_mib(plan.state_bytes)} MiB of covariance state for {plan.sites} FFNs and "
            f"{_mib(plan.eigen_peak_bytes)} MiB for their eigendecomposition, {_mib(plan.available_bytes)} MiB free"
            for plan in short
        ]
        host = next((p for p in self.devices if p.device == "cpu"), None)
        hints = [
            f"measure fewer layers per pass ({option('layers')} a subset; several passes over subsets rotate "
            "through all, as layers_per_step does in training)",
            f"keep the state in host memory ({option('state_device', 'cpu')}"
            + (f": {_mib(host.available_bytes)} MiB free)" if host and host.available_bytes is not None else ")"),
            f"decompose less at once ({option('spectra', 'estimate')}: FFNs 4096 or more wide are never decomposed)",
        ]
        if any(p.device != "cpu" for p in short):
            hints.append(f"leave room on the accelerators ({option('max_memory')} lower for the weights)")
        raise MemoryPlanError(
            f"{subject} does not fit: {'; '.join(parts)}. The state is D x D per FFN whatever the number of "
            f"tokens ({option('max_tokens')} shortens the run, not the state). To fit: " + "; ".join(hints) + "."
        )


def _mib(n_bytes: Optional[int]) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 2**20:,.3f}"


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: a quantized tensor subclass (torchao) counts its inner tensors (packed data,
    scales); a tensor on ``meta`` counts what it will hold when loaded."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names if torch.is_tensor(getattr(tensor, name)))
    return tensor.numel() * tensor.element_size()


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory of ``device`` now: CUDA's free bytes, the host's available memory; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _placed(model) -> dict[str, str]:
    """Parameter/buffer name -> where it is placed: its device-map entry (``disk`` included), else its device."""
    device_map = getattr(model, "hf_device_map", None) or {}
    prefixes = sorted(device_map, key=len, reverse=True)
    out = {}
    tensors = list(model.named_parameters(remove_duplicate=True)) + list(model.named_buffers(remove_duplicate=True))
    for name, tensor in tensors:
        where = next((device_map[p] for p in prefixes if p == "" or name.startswith(p + ".")), None)
        if where is None:
            where = str(tensor.device)
        elif isinstance(where, int):
            where = f"cuda:{where}"
        out[name] = where if where == "disk" else str(torch.device(where))
    return out


def _eigen_peak(device: torch.device, widths: list[int], state: int, spectra: str) -> int:
    """Transient bytes of turning covariances of these widths into spectra on ``device`` (see the module doc);
    ``spectra="estimate"``: matrices at least ``ESTIMATE_MIN_DIM`` wide are only built, never decomposed."""
    from nerve_hf.spectra.estimate import ESTIMATE_MIN_DIM
    from nerve_hf.spectra.exact import EIGEN_BATCH_BYTES

    if not widths:
        return 0
    # per matrix: its covariance, and LAPACK's copy when it is decomposed
    costs = [(1 if spectra == "estimate" and w >= ESTIMATE_MIN_DIM else 2) * w * w * 8 for w in widths]
    if device.type == "cpu":
        return min(torch.get_num_threads(), len(widths)) * max(costs)
    return 4 * max(min(state, EIGEN_BATCH_BYTES), max(widths) ** 2 * 8)


def plan_memory(model, tracker, spectra: str = "exact") -> MemoryPlan:
    """The plan of measuring ``tracker``'s sites (built, not run) on ``model``."""
    plans: dict[str, DevicePlan] = {}

    def plan_of(name: str) -> DevicePlan:
        return plans.setdefault(name, DevicePlan(name))

    tensors = dict(model.named_parameters(remove_duplicate=True)) | dict(model.named_buffers(remove_duplicate=True))
    for name, where in _placed(model).items():
        plan_of(where).model_bytes += tensor_bytes(tensors[name])

    table = tracker._table  # the sites and widths the tracker sized its state by
    names = {id(module): name for name, module in model.named_modules()}
    fallback = input_device(model)
    measurements = tracker.window().measurements
    flow = any(m.name == "flow" for m in measurements.measurements)
    by_device: dict[torch.device, list[int]] = {}
    for index, site in enumerate(table.sites):
        if table.device is not None:
            device = torch.device(table.device)
        else:
            device = torch.device(device_of(model, names.get(id(site.pre), ""), fallback))
        by_device.setdefault(device, []).append(index)
    counted = 0
    for device, indices in by_device.items():
        plan = plan_of(str(device))
        plan.state_bytes += measurements.state_bytes(indices)
        plan.sites += len(indices)
        counted += measurements.state_bytes(indices)
        stages = [table.stage_dims[i].values() if flow else () for i in indices]  # flow: input/output too
        widths = [w for i, more in zip(indices, stages) for w in (table.dims[i], table.dims[i], *more) if w]
        plan.eigen_peak_bytes = _eigen_peak(device, widths, plan.state_bytes, spectra)
    if by_device:  # state between sites of different devices (cross-layer pairs): on the last site's device
        plan_of(str(list(by_device)[-1])).state_bytes += measurements.state_bytes(range(len(table.sites))) - counted
    for plan in plans.values():
        if plan.device != "disk":
            plan.available_bytes = available_bytes(torch.device(plan.device))
    unknown = [site.site for site, dim in zip(table.sites, table.dims) if dim is None]
    return MemoryPlan(list(plans.values()), unknown, None if table.device is None else str(table.device))
