"""Every per-machine choice in one object: decided once per process, printed, pinnable, the same on every rank.

A choice is decided the first time something needs it, by the measurement its owner passes in (the GEMM
timings live beside the layers they time), and then never changes for the life of the process. A measured
choice is kept in .cache/machine/ for this CPU, thread count and torch version, so later processes take the
same one without timing again (delete the file to measure afresh). Pin any of them, for tests or for a machine
you know, with an environment variable or a script's --machine flag:

  SLM_MACHINE="bf16_gemms_in_fp32=0,dense_min_rows=8" python inference.py ...
  python train.py --machine quant_kernel=plain ...

DDP ranks call share() after the process group starts: rank 0's choices become every rank's, so a busy
moment on one rank cannot send the ranks down different paths.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

# name: (type, what it decides)
CHOICES: dict[str, tuple[type, str]] = {
    "bf16_gemms_in_fp32": (bool, "bf16 GEMMs run on the fp32 kernel, where this CPU's bf16 unit is the slower"),
    "dense_min_rows": (int, "rows from which a quantized layer runs a GEMM on its dequantized weights"),
    "quant_kernel": (str, "the exact int8/int4 kernels' instruction set (the best this CPU has, or plain)"),
    "int16_kernel": (str, "the int16 kernels for passes of a few tokens (the best this CPU has, or none)"),
    "int16_rows": (int, "passes of up to this many tokens (drafts aside) take the int16 kernels: they win there"),
    "bf16_kernel": (str, "the fused step's kernel for bf16 weights (avx512-bf16 where this CPU has it; plain-bf16, "
                         "the slow reference), or none: bf16 models take the eager step"),
    "train_step": (str, "a training step's precision and compilation (fp32, bf16, fp32+compile, bf16+compile), "
                        "timed on the run's own shape; a pin decides only what --dtype and --compile leave auto"),
}
ENV = "SLM_MACHINE"
CACHE = Path(__file__).resolve().parent / ".cache"


class Machine:
    """The decided choices, and how each was decided: measured, pinned or shared (from rank 0)."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        self.how: dict[str, str] = {}
        self.pins_read = False

    def decide(self, name: str, measure: Callable[[], object], key: str = "") -> object:
        """The choice `name`: pinned, already decided, measured by an earlier process on this machine, or
        measured now (once). `key` names what the measurement depends on beyond the machine (a training run's
        shape): it is kept apart per key."""
        self.read_environment()
        if name not in self.values:
            path = measured_path()
            kept = json.loads(path.read_text()) if path.is_file() else {}
            stored = f"{name}@{key}" if key else name
            if stored in kept:
                self.values[name], self.how[name] = kept[stored], "measured earlier"
            else:
                self.values[name], self.how[name] = CHOICES[name][0](measure()), "measured"
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(kept | {stored: self.values[name]}))
                os.replace(tmp, path)
        return self.values[name]

    def read_environment(self) -> None:
        """The pins in SLM_MACHINE, once (before a script's --machine pins, which win)."""
        if not self.pins_read:
            self.pins_read = True
            self.pin(os.environ.get(ENV, ""))

    def pin(self, text: str, how: str = "pinned") -> None:
        """Fix choices from "name=value,name=value" (bools as 0/1); an unknown name or value is a ValueError."""
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            if name not in CHOICES or not value:
                raise ValueError(f"--machine/{ENV}: {item!r} is not name=value with a name among "
                                 f"{', '.join(CHOICES)}")
            kind = CHOICES[name][0]
            try:
                self.values[name] = bool(int(value)) if kind is bool else kind(value)
            except ValueError:
                raise ValueError(f"--machine/{ENV}: {name} takes a {kind.__name__}, not {value!r}") from None
            self.how[name] = how

    @contextlib.contextmanager
    def pinned(self, text: str) -> Iterator[None]:
        """Choices pinned for the length of a block, then as they were (bench's contenders side by side)."""
        before = dict(self.values), dict(self.how)
        self.pin(text)
        try:
            yield
        finally:
            self.values, self.how = before

    def share(self) -> None:
        """DDP: every rank takes rank 0's choices (call on every rank, after rank 0 has decided what it needs)."""
        import torch.distributed as dist

        box = [self.summary()["choices"] if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        if dist.get_rank() != 0:
            self.pin(",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in box[0].items()), "shared")

    def summary(self) -> dict:
        return {"choices": dict(self.values), "how": dict(self.how)}

    def describe(self) -> str:
        return ", ".join(f"{k}={v} ({self.how[k]})" for k, v in self.values.items()) or "nothing decided yet"


MACHINE = Machine()


def measured_path() -> Path:
    """Where this machine's measured choices are kept: one file per CPU, thread count, torch version and version
    of the kernels (what the measurements timed)."""
    cpu = next((line for line in open("/proc/cpuinfo") if line.startswith("model name")), "") \
        if os.path.exists("/proc/cpuinfo") else ""
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "") if cpu else ""
    kernels = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(CACHE.parent.glob("*.cpp")))).hexdigest()
    key = f"{cpu}|{flags}|{torch.get_num_threads()}|{torch.__version__}|{os.environ.get('ATEN_CPU_CAPABILITY')}|" \
          f"{kernels}"
    return CACHE / "machine" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def best_time(fn: Callable[[], object], repeats: int = 5) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n x n matmul in `dtype`, the best of several timings: what this machine can do at best."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def matmul():
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * n ** 3 / best_time(matmul, repeats)


def prepare_process(pins: str = "") -> None:
    """Process-wide settings that every entry point applies first (never an import): its --machine pins, and
    - compiled artifacts persist in .cache/inductor-<ATEN_CPU_CAPABILITY> (gitignored), so a second run of the
      same shape skips most of the compile. One folder per capability, because Inductor's cache key ignores it:
      code compiled for AVX-512 and reused under an AVX2 cap gave NaN losses;
    - glibc keeps freed blocks up to 32 MB for reuse instead of returning them to the OS, so the next activation
      of that size does not page-fault its memory in again (prefill and training 10-15% faster on an Intel VM
      here, for transformers too). Only where glibc is the libc."""
    MACHINE.read_environment()
    MACHINE.pin(pins)
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").lower() or "native"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE / f"inductor-{capability}"))
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
