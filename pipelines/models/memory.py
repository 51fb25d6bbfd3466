"""Device, dtype and memory policy: one object decides where weights live.

Memory modes form a ladder, most to least VRAM (ComfyUI's high / normal / low VRAM idea):

    HIGH        every module on the GPU
    BALANCED    model CPU offload: each model moves to the GPU only while it runs
    LOW         model offload + attention slicing + VAE tiling/slicing
    SEQUENTIAL  sequential CPU offload (layer by layer) + slicing + tiling: slowest, smallest
    CPU         no accelerator: everything on the CPU

A CUDA out-of-memory error is retried once, one rung lower (`MemoryManager.lower`).

Each request is also held to a budget (`RequestBudget`): the largest width × height × batch, in
megapixels, the memory the studio could run it in holds. On the CPU (and MPS, whose memory is the
RAM) that is the free RAM; on CUDA the free VRAM plus the weights already there, on the lowest rung
the requested mode may fall to (`auto`: sequential offload, with sliced attention). A request past
it is refused before anything is allocated, with the limit named, instead of ending in an OOM.
"""

from __future__ import annotations

import enum
import gc
import math
import os
from dataclasses import dataclass

import psutil
import torch

from pipelines.core.checks import check_choice

GIB = 1024 ** 3
# Named safety margins for `auto`: VRAM kept free for activations, the CUDA context and
# other programs, on top of the weights themselves.
ACTIVATION_GIB_PER_MEGAPIXEL = 2.5
CONTEXT_RESERVE_GIB = 0.8
# Attention slicing and VAE tiling (the low and sequential rungs) keep about a quarter of the activations at once.
SLICED_ACTIVATION_SHARE = 0.25
# On the CPU activations are fp32, twice fp16's bytes; RAM kept free for the system and other programs.
CPU_ACTIVATION_GIB_PER_MEGAPIXEL = 2 * ACTIVATION_GIB_PER_MEGAPIXEL
RAM_RESERVE_GIB = 0.5


class MemoryMode(str, enum.Enum):
    HIGH = "high"
    BALANCED = "balanced"
    LOW = "low"
    SEQUENTIAL = "sequential"
    CPU = "cpu"

    def lower(self) -> "MemoryMode | None":
        """The next rung down the ladder, or None at the bottom."""
        ladder = [MemoryMode.HIGH, MemoryMode.BALANCED, MemoryMode.LOW, MemoryMode.SEQUENTIAL]
        if self not in ladder or self is ladder[-1]:
            return None
        return ladder[ladder.index(self) + 1]


DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
MEMORY_CHOICES = ("auto",) + tuple(m.value for m in MemoryMode if m is not MemoryMode.CPU)
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(choice: str = "auto") -> torch.device:
    """cuda > mps > cpu for `auto`; an explicit choice that is not available is an error."""
    check_choice("device", choice, DEVICE_CHOICES)
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("`--device cuda` was asked for but PyTorch sees no CUDA GPU; use `--device auto`.")
    if choice == "mps" and not has_mps:
        raise ValueError("`--device mps` was asked for but this PyTorch has no MPS support; use `--device auto`.")
    return torch.device(choice)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """fp16 on CUDA and MPS by default (the VAE is upcast if it overflows); fp32 on the CPU."""
    check_choice("dtype", choice, DTYPE_CHOICES)
    if choice == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if device.type == "cpu" and choice == "fp16":
        raise ValueError("fp16 is not supported for CPU inference; use `--dtype fp32` or `--dtype bf16`.")
    return _DTYPES[choice]


def choose_mode(*, device: torch.device, requested: str, weights_bytes: int, free_vram_bytes: int | None,
                width: int = 512, height: int = 512, batch_size: int = 1, offload_bytes: int | None = None
                ) -> MemoryMode:
    """`auto` picks the highest rung whose estimated peak fits in free VRAM for this request's size.
    `offload_bytes`: what model offload keeps on the device at once (`offload_resident_bytes`: the largest
    component and the lone models beside it); unknown, 3/4 of the weights (an SD UNet's share)."""
    resident = 0.75 * weights_bytes if offload_bytes is None else offload_bytes
    if device.type != "cuda":
        return MemoryMode.CPU if device.type == "cpu" else MemoryMode.HIGH
    if requested != "auto":
        return MemoryMode(requested)
    if free_vram_bytes is None:
        return MemoryMode.BALANCED
    megapixels = width * height * batch_size / 1e6
    activations = ACTIVATION_GIB_PER_MEGAPIXEL * megapixels * GIB
    budget = free_vram_bytes - CONTEXT_RESERVE_GIB * GIB
    if weights_bytes + activations <= budget:
        return MemoryMode.HIGH
    # With model offload only the largest model (an SD UNet: about 3/4 of the weights; SD 3's T5) is resident.
    if resident + activations <= budget:
        return MemoryMode.BALANCED
    if resident + activations * SLICED_ACTIVATION_SHARE <= budget:
        return MemoryMode.LOW
    return MemoryMode.SEQUENTIAL


def largest_megapixels(*, mode: MemoryMode, weights_bytes: int, free_bytes: int,
                       offload_bytes: int | None = None) -> float:
    """The most width × height × batch, in megapixels, whose estimated peak fits in `free_bytes` in `mode` (the
    same estimate `choose_mode` climbs the ladder with). On the CPU the weights are already in the RAM that was
    measured, so all of it is for activations."""
    if mode is MemoryMode.CPU:
        return max(0.0, (free_bytes - RAM_RESERVE_GIB * GIB) / (CPU_ACTIVATION_GIB_PER_MEGAPIXEL * GIB))
    budget = free_bytes - CONTEXT_RESERVE_GIB * GIB
    offloaded = 0.75 * weights_bytes if offload_bytes is None else offload_bytes
    resident = {MemoryMode.HIGH: weights_bytes, MemoryMode.BALANCED: offloaded, MemoryMode.LOW: offloaded,
                MemoryMode.SEQUENTIAL: 0.0}[mode]
    sliced = mode in (MemoryMode.LOW, MemoryMode.SEQUENTIAL)
    per_megapixel = ACTIVATION_GIB_PER_MEGAPIXEL * GIB * (SLICED_ACTIVATION_SHARE if sliced else 1.0)
    return max(0.0, (budget - resident) / per_megapixel)


@dataclass(frozen=True)
class RequestBudget:
    """The largest request the free memory allows: width × height × batch, in megapixels."""
    megapixels: float
    free_gib: float
    memory: str          # "RAM" or "VRAM"
    mode: MemoryMode     # the rung the limit is computed for

    def check(self, *, width: int, height: int, batch_size: int, rows_per_image: int = 1) -> None:
        """Refuse (ValueError) a request past the budget, naming the limit and what would fit. `rows_per_image`:
        the model rows each image takes at once (speculative sampling verifies L drafted states per image)."""
        asked = width * height * batch_size * rows_per_image / 1e6
        if asked <= self.megapixels:
            return
        fitting_batch = int(self.megapixels * 1e6 // (width * height * rows_per_image))
        instead = f"at {width}×{height} a batch of at most {fitting_batch}" if fitting_batch >= 1 else \
            f"one image of at most {self.largest_side()}×{self.largest_side()}"
        rows = f" × {rows_per_image} drafted states per image" if rows_per_image > 1 else ""
        raise ValueError(f"{width}×{height} × batch {batch_size}{rows} is {asked:.2f} megapixels at once, but with "
                         f"{self.free_gib:.1f} GiB of free {self.memory} at most {self.megapixels:.2f} megapixels × "
                         f"batch fit ({instead}). Lower the size or the batch, or free memory.")

    def largest_side(self) -> int:
        """The side of the largest square single image, in multiples of 8 px."""
        return int(math.sqrt(self.megapixels * 1e6)) // 8 * 8

    def summary(self) -> str:
        return (f"largest request {self.megapixels:.2f} MP × batch ({self.largest_side()}² px) with "
                f"{self.free_gib:.1f} GiB {self.memory} free")


def weights_bytes(pipelines, *, on: str | None = None) -> int:
    """Bytes of parameters in the modules of `pipelines` (pipelines or single modules), each counted once;
    with `on` (a device type), only those that are there now."""
    seen, total = set(), 0
    for item in pipelines:
        modules = [m for m in item.components.values() if isinstance(m, torch.nn.Module)] \
            if hasattr(item, "components") else [item]
        for module in modules:
            for parameter in module.parameters():
                if id(parameter) not in seen and (on is None or parameter.device.type == on):
                    seen.add(id(parameter))
                    total += parameter.numel() * parameter.element_size()
    return total


def offload_resident_bytes(pipelines) -> int:
    """What model offload keeps on the device at once: the largest component of the pipelines (one runs at a time),
    and the lone models (ControlNets, a draft) that run beside it."""
    largest, lone = 0, 0
    for item in pipelines:
        if hasattr(item, "components"):
            modules = [m for m in item.components.values() if isinstance(m, torch.nn.Module)]
            largest = max([largest, *(weights_bytes([module]) for module in modules)])
        else:
            lone += weights_bytes([item])
    return largest + lone


@dataclass
class MemoryStats:
    device: str
    dtype: str
    mode: str
    ram_used_gib: float
    vram_used_gib: float | None
    vram_total_gib: float | None

    def summary(self) -> str:
        vram = "" if self.vram_used_gib is None else \
            f" · VRAM {self.vram_used_gib:.2f} / {self.vram_total_gib:.1f} GiB"
        mode = "no GPU memory modes on the CPU" if self.mode == MemoryMode.CPU.value else f"memory mode {self.mode}"
        return f"{self.device} · {self.dtype} · {mode} · the studio uses {self.ram_used_gib:.2f} GiB of RAM{vram}"


class MemoryManager:
    """Owns device, dtype and memory mode, and applies the mode to a pipeline."""

    def __init__(self, *, device: str = "auto", dtype: str = "auto", memory: str = "auto"):
        check_choice("memory", memory, MEMORY_CHOICES)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.requested_mode = memory
        self.mode = MemoryMode.CPU if self.device.type == "cpu" else MemoryMode.HIGH

    def free_vram(self) -> int | None:
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        # blocks PyTorch's caching allocator holds but no tensor uses are free to this process
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def free_ram(self) -> int:
        """RAM the system can give without swapping (psutil's `available`): the CPU's budget."""
        return psutil.virtual_memory().available

    def budget(self, pipelines) -> RequestBudget:
        """The largest request (megapixels × batch) that running `pipelines` leaves room for: from free RAM on the
        CPU and MPS; on CUDA from free VRAM plus what their weights already take there, on the lowest rung the
        requested mode may fall to (`auto`: sequential; a set mode: one below it, where an OOM is retried)."""
        if self.device.type != "cuda":
            free = self.free_ram()
            return RequestBudget(largest_megapixels(mode=MemoryMode.CPU, weights_bytes=0, free_bytes=free),
                                 free / GIB, "RAM", MemoryMode.CPU)
        free = (self.free_vram() or 0) + weights_bytes(pipelines, on=self.device.type)
        mode = MemoryMode.SEQUENTIAL if self.requested_mode == "auto" else \
            MemoryMode(self.requested_mode).lower() or MemoryMode(self.requested_mode)
        return RequestBudget(largest_megapixels(mode=mode, weights_bytes=weights_bytes(pipelines), free_bytes=free,
                                                offload_bytes=offload_resident_bytes(pipelines)),
                             free / GIB, "VRAM", mode)

    def mode_for(self, pipelines, *, width: int, height: int, batch_size: int = 1) -> MemoryMode:
        """The mode the requested setting (or `auto`) gives for running `pipelines` at this size. The budget
        is the free VRAM plus what their weights already take there (they are counted once, as weights)."""
        if self.device.type != "cuda":   # one mode there, whatever the weights: not walked at every request
            return choose_mode(device=self.device, requested=self.requested_mode, weights_bytes=0, free_vram_bytes=None)
        free = self.free_vram()
        if free is not None:
            free += weights_bytes(pipelines, on=self.device.type)
        return choose_mode(device=self.device, requested=self.requested_mode, weights_bytes=weights_bytes(pipelines),
                           free_vram_bytes=free, width=width, height=height, batch_size=batch_size,
                           offload_bytes=offload_resident_bytes(pipelines))

    def place(self, pipeline, *, mode: MemoryMode) -> MemoryMode:
        """Put `pipeline` on the device in `mode`. A lone model (a ControlNet in its slot) goes to the device
        in high mode and otherwise waits on the CPU, to be offloaded with the task pipeline that uses it."""
        if not hasattr(pipeline, "components"):
            pipeline.to(self.device if mode in (MemoryMode.HIGH, MemoryMode.CPU) else "cpu")
            return mode
        if hasattr(pipeline, "remove_all_hooks"):
            pipeline.remove_all_hooks()
        if mode in (MemoryMode.HIGH, MemoryMode.CPU):
            pipeline.to(self.device)
        elif mode is MemoryMode.BALANCED or mode is MemoryMode.LOW:
            pipeline.enable_model_cpu_offload(device=self.device)
        else:
            pipeline.enable_sequential_cpu_offload(device=self.device)
        slicing = mode in (MemoryMode.LOW, MemoryMode.SEQUENTIAL)
        if slicing:
            pipeline.enable_attention_slicing()
        elif hasattr(pipeline, "disable_attention_slicing"):
            pipeline.disable_attention_slicing()
        vae = getattr(pipeline, "vae", None)
        if vae is not None and hasattr(vae, "enable_tiling"):
            (vae.enable_tiling if slicing else vae.disable_tiling)()
            (vae.enable_slicing if slicing else vae.disable_slicing)()
        self.mode = mode
        return mode

    def park(self, *pipelines) -> None:
        """Move `pipelines` (or lone models) off the accelerator into RAM, whole, with their offload hooks removed
        (they would move them back), and give the memory back: room for another model, and `place` puts them
        back. On the CPU there is nothing to move, and so nothing to collect (a full garbage collection costs a
        process that has served a while about half a second)."""
        for pipeline in pipelines:
            if hasattr(pipeline, "remove_all_hooks"):
                pipeline.remove_all_hooks()
            if self.device.type != "cpu":
                pipeline.to("cpu")
        if self.device.type != "cpu":
            self.release()

    def release(self) -> None:
        """Give freed tensors back: Python's garbage, then the CUDA caching allocator."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()
        elif self.device.type == "mps":
            torch.mps.empty_cache()

    def stats(self) -> MemoryStats:
        ram = psutil.Process(os.getpid()).memory_info().rss / GIB
        vram = total = None
        if self.device.type == "cuda":
            vram = torch.cuda.memory_allocated(self.device) / GIB
            total = torch.cuda.get_device_properties(self.device).total_memory / GIB
        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[self.dtype]
        return MemoryStats(device=str(self.device), dtype=dtype, mode=self.mode.value,
                           ram_used_gib=ram, vram_used_gib=vram, vram_total_gib=total)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
