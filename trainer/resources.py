"""Wall time and peak resident memory of a stretch of work (the evaluation report's per-method figures)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.resources
import os
import platform
import resource
import threading
import time
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

_STATUS = Path("/proc/self/status")
_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MB = 1024.0 * 1024.0


def current_rss_mb() -> float | None:
    """Resident memory now (None where /proc is missing)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE / MB
    except (OSError, IndexError, ValueError):
        return None


def _child_pids(pid: str = "self") -> list[str]:
    pids = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            pids.extend(children.read_text().split())
        except OSError:
            continue
    return pids


def children_private_by_pid() -> dict[str, float]:
    """Memory each of the process's descendants (a forked worker) holds of its own, MB by pid: pages
    it wrote or no longer shares with this process (Private_Clean + Private_Dirty of
    /proc/PID/smaps_rollup). With this process's RSS their sum is what the work holds in all, each
    shared page counted once."""
    held: dict[str, float] = {}
    todo = _child_pids()
    while todo:
        pid = todo.pop()
        if pid in held:
            continue
        total_kb = 0
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total_kb += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
        held[pid] = total_kb / 1024.0
        todo.extend(_child_pids(pid))
    return held


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once; None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim, every arena); False
    where there is no such call. Worker threads that allocated large numpy temporaries leave them
    free in their own malloc arenas, still counted in the process's resident memory until reused."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux VmHWM; elsewhere getrusage's maxrss)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, IndexError, ValueError):
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return maxrss / MB if os.uname().sysname == "Darwin" else maxrss / 1024.0


class ResourceMeter:
    """Wall time, CPU time and peak RSS of a `with` block.

    The CPU time is the user and system time of every thread of this process and of the child
    processes it waited for during the block (a forked worker is counted once joined); over the
    wall time it tells how many cores the block kept busy (2 on two cores saturated, 1 for
    Python on one).

    The peak is exact when the block raises the process's own peak (VmHWM moves). Otherwise
    the block stayed below an earlier peak, and its own is the largest RSS a thread samples
    every `interval` seconds (a spike shorter than that can be missed). tracemalloc would see
    every allocation but slows numpy-heavy code several times; resetting VmHWM
    (/proc/self/clear_refs) would make `time -v` and the process's own maxrss lie afterwards.
    While the block has child processes (the ranker's forked feature logging) the peak is the
    largest sampled sum of this process's RSS and their own pages (children_private_by_pid, read
    every `children_interval` seconds; a child that has exited leaves the sum at the next sample,
    as what it handed back is in this process's RSS by then), and not exact. Reading a process's
    page map costs milliseconds of kernel time per GB mapped (~3 ms for a 2 GB child here), and
    contends with the child's own page faults: read every 0.2 s, a profile of an ml-latest-small
    evaluation found the sampler ~10 s in those reads.
    """

    def __init__(self, interval: float = 0.02, children_interval: float = 1.0):
        self.interval = interval
        self.children_every = max(1, round(children_interval / interval))
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.rss_before_mb: float | None = None
        self.peak_mb: float | None = None
        self.peak_exact = False
        self._sampled = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "ResourceMeter":
        self.rss_before_mb = current_rss_mb()
        self._peak_before = peak_rss_mb()
        self._sampled = self.rss_before_mb or 0.0
        self._children_seen = False
        if self.rss_before_mb is not None:
            self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
            self._thread.start()
        self._started = time.perf_counter()
        self._cpu_before = cpu_seconds()
        return self

    def _sample(self) -> None:
        ticks, held = 0, {}
        while not self._stop.wait(self.interval):
            ticks += 1
            if ticks % self.children_every == 0:
                held = children_private_by_pid()
                self._children_seen = self._children_seen or any(held.values())
            elif held:
                # A worker that has gone holds nothing any more, and what it handed back is in this
                # process's RSS now: its last reading, up to `children_interval` old, would count
                # those pages twice (the tuning replay's half came to ~0.4 GB on a 10k-item set).
                held = {pid: mb for pid, mb in held.items() if os.path.exists(f"/proc/{pid}")}
            children = sum(held.values())
            rss = current_rss_mb()
            if rss is not None and rss + children > self._sampled:
                self._sampled = rss + children

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._started
        self.cpu_seconds = cpu_seconds() - self._cpu_before
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        peak_after = peak_rss_mb()
        if peak_after > self._peak_before and not self._children_seen:
            self.peak_mb, self.peak_exact = peak_after, True
        else:
            own = peak_after if peak_after > self._peak_before else current_rss_mb() or 0.0
            self.peak_mb = max(self._sampled, own) or None

    @property
    def cores_busy(self) -> float | None:
        """CPU seconds per wall second over the block (None for a block too short to tell)."""
        return cores_busy(self.cpu_seconds, self.seconds)

    def report(self) -> dict:
        """{"seconds", "cpu_seconds", "cores_busy", "rss_before_mb", "peak_rss_mb", "peak_increase_mb",
        "peak_exact"} (MB = 2^20 bytes)."""
        increase = None if self.peak_mb is None or self.rss_before_mb is None else self.peak_mb - self.rss_before_mb
        cores = self.cores_busy
        return {"seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2),
                "cores_busy": None if cores is None else round(cores, 2),
                "rss_before_mb": _round(self.rss_before_mb), "peak_rss_mb": _round(self.peak_mb),
                "peak_increase_mb": _round(increase), "peak_exact": self.peak_exact}


def cores_busy(cpu: float, seconds: float) -> float | None:
    """CPU seconds per wall second: how many cores a stretch kept busy (None below 0.05 s, too
    short to tell)."""
    return cpu / seconds if seconds >= 0.05 else None


def cpu_seconds() -> float:
    """User and system time so far of this process's threads and of the children it has waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def machine_load() -> dict:
    """Load averages (1, 5, 15 min) and CPU count, to read timings against."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"load_average": load, "cpus": os.cpu_count()}


def cpu_description() -> dict:
    """The processor and the kernels the numerical libraries chose on it.

    {"model": /proc/cpuinfo's model name, "simd": the SIMD targets NumPy dispatches to here (beyond
    its build's baseline), "blas": [{"library", "version", "architecture"}] as threadpoolctl reads
    the loaded BLAS libraries (OpenBLAS picks its kernels, e.g. SkylakeX or Haswell, by the CPU)}.
    The same libraries give other last digits on a CPU with other kernels, so the report names
    them. Each part is left out where it cannot be read."""
    out: dict = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                out["model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if "model" not in out and platform.processor():
        out["model"] = platform.processor()
    try:  # what numpy.show_runtime() prints, read where it reads it
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
        out["simd"] = [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_info
        out["blas"] = [{"library": info.get("internal_api"), "version": info.get("version"),
                        "architecture": info.get("architecture")}
                       for info in threadpool_info() if info.get("user_api") == "blas"]
    except ImportError:
        pass
    return out


# The libraries whose versions move the evaluation's figures: the encoder's vectors (ONNX Runtime,
# the tokenizers library that splits every text it reads, and PyTorch and transformers for
# fine-tuning and export), the learned ranker's trees (LightGBM), the index and every array sum
# (hnswlib, NumPy, SciPy). setup.sh installs the versions server/constraints.txt pins (all but
# onnxruntime-gpu, whose figures move with the GPU's kernels anyway), so two setups a month apart
# give the same figures on the same CPU.
FIGURE_LIBRARIES = ("numpy", "scipy", "onnxruntime", "onnxruntime-gpu", "tokenizers", "lightgbm", "hnswlib",
                    "torch", "transformers")
CONSTRAINTS_FILE = "constraints.txt"  # in the chronorec.server package (server/)


def parse_pins(text: str) -> dict[str, str]:
    """NAME==VERSION lines of a pip constraints file (comments and blank lines skipped), by normalised name."""
    pins = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{CONSTRAINTS_FILE}: {raw.strip()!r} is not NAME==VERSION")
        pins[canonicalize_name(name.strip())] = version.strip()
    return pins


def pinned_versions() -> dict[str, str]:
    """The versions server/constraints.txt pins ({} where the file is not installed)."""
    try:
        text = importlib.resources.files("chronorec.server").joinpath(CONSTRAINTS_FILE).read_text()
    except (ModuleNotFoundError, OSError):
        return {}
    return parse_pins(text)


def off_pin(installed: dict[str, str], pins: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Each installed library whose version is not its pin: name -> (installed, pinned). A local
    build tag is no difference (PyTorch's 2.13.0+cpu is the pinned 2.13.0)."""
    out = {}
    for name, version in installed.items():
        pin = pins.get(canonicalize_name(name))
        if pin is not None and Version(version).public != Version(pin).public:
            out[name] = (version, pin)
    return out


def library_versions(names: tuple[str, ...] = FIGURE_LIBRARIES) -> dict[str, str]:
    """Python's and each installed library's version (those not installed left out)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


__all__ = ["CONSTRAINTS_FILE", "FIGURE_LIBRARIES", "ResourceMeter", "cores_busy", "cpu_description", "cpu_seconds",
           "current_rss_mb", "library_versions", "machine_load", "off_pin", "parse_pins", "peak_rss_mb",
           "pinned_versions"]
