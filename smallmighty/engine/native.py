"""Build and call `decode.c`: the whole decode step of a Llama model as one native call.

Why: at batch 1 a decode step is bound by reading the weights, and run as torch operators it also
pays ~55 operator calls per layer plus torch's int8 kernel reading weights at about half of memory
speed (see the C file). The C step is compiled on first use with the machine's C compiler
(`$CC`, which may carry arguments such as `ccache gcc`, else `cc`) for this CPU (`-march=native`), cached in the `kernels` folder of smallmighty's cache (`smallmighty.cache`)
keyed on the source, flags and CPU, and loaded with ctypes, so the package stays pure Python.
Without a compiler, or with `SLM_NATIVE=0`, the engine runs the same step with torch operators.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from smallmighty.cache import cache_dir as cache_dir_for
from smallmighty.engine.quantize import NATIVE_BLOCK, NATIVE_ROWS
from smallmighty.errors import SlmError
from smallmighty.io import atomic_path

SOURCE = Path(__file__).with_name("decode.c")
FLAGS = ["-O3", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]

#: Weight kinds (what a layer's `native_weights()` names) as the C code numbers them.
KINDS = {"f32": 0, "int8": 1, "int4": 2}


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("out", ctypes.c_int32), ("inp", ctypes.c_int32),
                ("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int32), ("inter", ctypes.c_int32), ("heads", ctypes.c_int32),
                ("kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("layers", ctypes.c_int32),
                ("vocab", ctypes.c_int32), ("eps", ctypes.c_float), ("layer", ctypes.POINTER(_Layer)),
                ("norm", ctypes.c_void_p), ("lm_head", _Linear)]


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux) or its name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compiler_command(compiler: str | None = None) -> list[str]:
    """The C compiler as a command line: `compiler`, else `$CC` (split like a shell: `ccache gcc`), else cc."""
    return shlex.split(compiler or os.environ.get("CC") or "cc") or ["cc"]


def build(cache_dir: Path | None = None, compiler: str | None = None, arch: str = "native") -> Path:
    """Compile the C step (once per source, flags, compiler and CPU) and return the library path.

    `arch` is the compiler's -march target: this CPU by default (tests also build older x86 levels
    to check the AVX2 and plain vector code). Raises OSError or subprocess.CalledProcessError when
    no working compiler is found.
    """
    command = compiler_command(compiler)
    if shutil.which(command[0]) is None:
        raise OSError(f"no C compiler '{command[0]}' on PATH")
    flags = [*FLAGS, f"-march={arch}"]
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), shlex.join(command).encode(),
                                     _cpu_key().encode()])).hexdigest()[:16]
    target = (cache_dir or cache_dir_for("kernels")) / f"decode-{key}.so"
    if not target.is_file():
        print("Compiling the native decode step for this CPU (once, about 5 s).", file=sys.stderr)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            subprocess.run([*command, *flags, str(SOURCE), "-o", str(tmp), "-lm"], check=True,
                           capture_output=True, timeout=300)
    return target


def load(path: Path) -> Any:
    """The compiled step at `path`, its entry point typed for ctypes."""
    lib = ctypes.CDLL(str(path))
    lib.slm_decode.restype = ctypes.c_int
    lib.slm_decode.argtypes = [ctypes.POINTER(_Model), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


_LIBRARY: Any = None
#: Models load their layers from a thread pool, and servers load models from threads: the first
#: caller builds the library while the others wait for it (not a second compile, nor a
#: half-set global).
_LIBRARY_LOCK = threading.Lock()


def library() -> Any:
    """The loaded C library, or None when it is switched off (`SLM_NATIVE=0`) or cannot be built."""
    global _LIBRARY
    with _LIBRARY_LOCK:
        if _LIBRARY is None:
            found = False
            if os.environ.get("SLM_NATIVE", "1") != "0":
                try:
                    found = load(build())
                except (OSError, subprocess.SubprocessError) as err:
                    detail = getattr(err, "stderr", b"") or b""
                    print(f"Native decode step unavailable ({err}{': ' if detail else ''}"
                          f"{detail.decode(errors='replace')[:500]}); using torch operators.",
                          file=sys.stderr)
            _LIBRARY = found
    return _LIBRARY or None


#: Size of a transparent huge page on x86-64 and most arm64 kernels.
HUGE_PAGE = 2 << 20


def move_weights_to_huge_pages(model: Any) -> None:
    """Re-home the weight matrices of `model` in one mapping advised to use 2 MiB pages.

    Why: a decode step streams every weight once. With 4 KiB pages SmolLM2-135M's 118-470 MB of
    weights span 30-115 thousand pages, far more than the TLB holds, and the hardware prefetchers
    stop at every page edge; on huge pages the same float32 step ran 10-17% faster (2-core Zen 4).
    Each weight is copied and its old tensor rebound at once (in the module and, for tied float32
    embeddings, the model), so memory grows by at most one matrix on the way. Where the kernel
    offers no huge pages (or no `madvise`), the copies live on ordinary pages and cost nothing.
    """
    import mmap

    linears = model.linears()
    weights = [m.native_weights()[1][0] for m in linears]
    sizes = [-(-w.nbytes // 64) * 64 for w in weights]
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    # Private anonymous memory: a shared mapping would be shmem, which ignores the advice.
    region = mmap.mmap(-1, sum(sizes) + HUGE_PAGE, flags=flags)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    base = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive
    offset = (-base.data_ptr()) % HUGE_PAGE
    del weights
    release = _file_page_release()
    for module, size in zip(linears, sizes):
        old = module.native_weights()[1][0]
        new = base[offset: offset + old.nbytes].view(old.dtype).view(old.shape).copy_(old)
        offset += size
        for name, buffer in list(module.named_buffers(recurse=False, remove_duplicate=False)):
            if buffer.data_ptr() == old.data_ptr() and buffer.shape == old.shape:
                setattr(module, name, new)
        if model.embed is not None and model.embed.data_ptr() == old.data_ptr():
            model.embed = new
        release(old.data_ptr(), old.nbytes)


def _file_page_release() -> Callable[[int, int], None]:
    """A function that drops this process's copies of file pages in [address, address + size).

    Weights read from a safetensors file (the quantized cache) live in its memory map, which
    stays mapped while any tensor of the file (a scale, a norm) is alive: the pages just copied
    would stay resident, counting twice against memory. Dropping them is safe for file-backed
    pages (they would be read from the file again); anonymous memory is left to its allocator.
    """
    import ctypes.util
    import mmap

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        with open("/proc/self/maps", encoding="ascii") as maps:
            files = []
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    low, high = (int(x, 16) for x in fields[0].split("-"))
                    files.append((low, high))
    except (OSError, AttributeError):
        return lambda address, size: None
    page = mmap.PAGESIZE

    def release(address: int, size: int) -> None:
        start, end = -(-address // page) * page, (address + size) // page * page
        if end > start and any(low <= start and end <= high for low, high in files):
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED

    return release


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class NativeDecoder:
    """A `LlamaModel`'s weights described to the C step, and the call that runs it.

    It first moves the model's weight matrices onto huge pages (`move_weights_to_huge_pages`),
    then reads the model's own tensors (no copies, except int4's scale/zero pairs in bfloat16);
    it keeps references to everything it points at.
    """

    def __init__(self, model: Any, lib: Any) -> None:
        move_weights_to_huge_pages(model)
        self.lib = lib
        self._keep: list[torch.Tensor] = []
        c = model.config
        layers = (_Layer * c.num_hidden_layers)()
        for spec, layer in zip(layers, model.layers):
            spec.qkv, spec.o = self._linear(layer.qkv), self._linear(layer.o)
            spec.gate_up, spec.down = self._linear(layer.gate_up), self._linear(layer.down)
            spec.attn_norm, spec.mlp_norm = self._tensor(layer.attn_norm), self._tensor(layer.mlp_norm)
        self._layers = layers
        self.spec = _Model(hidden=c.hidden_size, inter=c.intermediate_size, heads=c.num_attention_heads,
                           kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                           layers=c.num_hidden_layers, vocab=c.vocab_size, eps=c.rms_norm_eps,
                           layer=layers, norm=self._tensor(model.norm),
                           lm_head=self._linear(model.lm_head))
        self.vocab = c.vocab_size

    def _tensor(self, t: torch.Tensor) -> int:
        t = t.float().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _linear(self, module: Any) -> _Linear:
        bias = None if module.bias is None else self._tensor(module.bias)
        kind, tensors = module.native_weights()
        weight, scale = tensors + (None,) * (2 - len(tensors))
        # The model's loader checked every shape against the config; these are what C relies on.
        if kind == "int4":
            records = (-(-module.out_features // NATIVE_ROWS), module.in_features // NATIVE_BLOCK, 320)
            if module.in_features % NATIVE_BLOCK or tuple(weight.shape) != records:
                raise SlmError(f"int4 records of shape {list(weight.shape)} for a "
                               f"{module.out_features}x{module.in_features} layer, expected {list(records)}")
        elif weight.numel() != module.out_features * module.in_features:
            raise SlmError(f"a {kind} layer of {module.out_features}x{module.in_features} holds "
                           f"{weight.numel()} weights")
        if not weight.is_contiguous():
            raise SlmError(f"a {kind} layer's weights are not contiguous")
        self._keep.extend(t for t in tensors if t is not None)
        return _Linear(kind=KINDS[kind], out=module.out_features, inp=module.in_features,
                       weight=_ptr(weight), scale=_ptr(scale), bias=bias)

    def __call__(self, h: torch.Tensor, cache: list[torch.Tensor], slots: torch.Tensor,
                 first: torch.Tensor, rope: torch.Tensor, rows: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Logits [B, V] for one new token per row; see `LlamaModel.decode` for the arguments.

        `h` [B, hidden] float32 (overwritten), `rope` [B, head_dim / 2] complex64.
        """
        batch = h.shape[0]
        if rows is None:
            rows = torch.arange(batch)
        # Local names keep any contiguous copies alive until the call returns.
        h = h.float().contiguous()
        rows, slots, first = (t.to(torch.int64).contiguous() for t in (rows, slots, first))
        rope = rope.contiguous()
        logits = torch.empty(batch, self.vocab)
        pointers = (ctypes.c_void_p * len(cache))(*[kv.data_ptr() for kv in cache])
        status = self.lib.slm_decode(ctypes.byref(self.spec), batch, h.data_ptr(), pointers,
                                     cache[0].shape[2], rows.data_ptr(), slots.data_ptr(),
                                     first.data_ptr(), rope.data_ptr(), logits.data_ptr(),
                                     torch.get_num_threads())
        if status != 0:
            raise MemoryError("native decode step: out of memory for its scratch buffers")
        return logits


def supports(model: Any) -> bool:
    """Whether the C step reads every layer of `model` (see each layer's `native_weights`).

    int4 gate/up layers need an intermediate size that is a multiple of 16: the step finds a
    gate row's up row one record row of 16 further on."""
    if any(layer.gate_up.native_weights()[0] == "int4" and model.config.intermediate_size % NATIVE_ROWS
           for layer in model.layers if layer.gate_up.native_weights() is not None):
        return False
    return all(m.native_weights() is not None for m in model.linears())
