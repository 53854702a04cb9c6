"""weightd's allocator inside a PyTorch process.

libweightd-torch.so is a CUDA pluggable allocator: PyTorch's rules (pools,
streams, the configuration in PyTorch's syntax), with weightd's load policy
and memory that sleeps and wakes at the same addresses::

    from weightd import torch_allocator as wta
    wta.install()                      # before the first CUDA allocation
    with wta.load_policy(), wta.tag("weights"):
        model = load_and_rewrite()     # no fragmentation left behind
    wta.sleep("weights")               # every byte back to the device
    ...                                # other work uses the memory
    wta.wake("weights")                # same addresses: tensors and graphs work

The library is $WEIGHTD_TORCH_LIB, else where make install put it, else the
system's search path. The environment it reads (WEIGHTD_ALLOC_CONF,
WEIGHTD_TORCH_CAPACITY, ...) is in pytorch/weightd-torch.h.
"""

import contextlib
import ctypes
import json
import os
import sys

_lib = None
_path = None
_tags = []  # the tags of the enclosing `with tag(...)` blocks


def library():
    """The loaded libweightd-torch.so (ctypes), with its prototypes."""
    global _lib, _path
    if _lib is not None:
        return _lib
    tried = []
    candidates = [os.environ.get("WEIGHTD_TORCH_LIB")]
    try:
        from . import _install  # written by make install
        candidates.append(os.path.join(_install.LIBDIR, "weightd", "libweightd-torch.so"))
    except ImportError:
        pass
    candidates.append("libweightd-torch.so")
    for path in filter(None, candidates):
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError as e:
            tried.append(str(e))
    else:
        raise OSError("libweightd-torch.so was not found (set WEIGHTD_TORCH_LIB to its path): " + "; ".join(tried))
    c_int, c_char_p, c_void_p = ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p
    protos = {
        "weightd_torch_alloc": (c_void_p, [ctypes.c_ssize_t, c_int, c_void_p]),
        "weightd_torch_free": (None, [c_void_p, ctypes.c_ssize_t, c_int, c_void_p]),
        "weightd_torch_configure": (c_int, [c_char_p]),
        "weightd_torch_policy_push": (c_int, [c_char_p]),
        "weightd_torch_policy_pop": (c_int, []),
        "weightd_torch_policy": (c_int, [c_char_p, ctypes.c_size_t]),
        "weightd_torch_load_policy": (c_char_p, []),
        "weightd_torch_set_tag": (c_int, [c_char_p]),
        "weightd_torch_sleep": (c_int, [c_char_p, c_int]),
        "weightd_torch_wake": (c_int, [c_char_p]),
        "weightd_torch_empty_cache": (c_int, []),
        "weightd_torch_reset_peaks": (c_int, []),
        "weightd_torch_stats": (c_int, [c_int, ctypes.POINTER(c_void_p)]),  # c_void_p: freed by string_free
        "weightd_torch_snapshot": (c_int, [c_int, ctypes.POINTER(c_void_p)]),
        "weightd_torch_string_free": (None, [c_void_p]),
        "weightd_torch_error": (c_char_p, []),
    }
    for name, (res, args) in protos.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    _lib, _path = lib, getattr(lib, "_name", path)
    return lib


def _check(rc):
    if rc < 0:
        raise OSError(-rc, library().weightd_torch_error().decode(errors="replace"))
    return rc


def _text(name):
    return name.encode() if name is not None else None


def _json(f, device):
    p = ctypes.c_void_p()
    _check(f(device, ctypes.byref(p)))
    try:
        return json.loads(ctypes.string_at(p.value))
    finally:
        library().weightd_torch_string_free(p)


def _synchronize():
    """Kernels queued on memory finish before it changes hands."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def install(conf=None):
    """Makes weightd's allocator PyTorch's, before the first CUDA
    allocation. conf: the configuration in PyTorch's syntax, weightd's keys
    included (else $WEIGHTD_ALLOC_CONF, else PyTorch's defaults). A request
    that cannot be met ends the process, saying why on stderr: PyTorch
    would take the pluggable allocator's NULL for memory, and no exception
    gets through it ($WEIGHTD_TORCH_OOM=null returns the NULL instead)."""
    import torch
    lib = library()
    if conf is not None:
        _check(lib.weightd_torch_configure(conf.encode()))
    alloc = torch.cuda.memory.CUDAPluggableAllocator(_path, "weightd_torch_alloc", "weightd_torch_free")
    torch.cuda.memory.change_current_allocator(alloc)
    return alloc


def policy():
    """The configuration in force, as canonical text."""
    buf = ctypes.create_string_buffer(1024)
    _check(library().weightd_torch_policy(buf, len(buf)))
    return buf.value.decode()


@contextlib.contextmanager
def load_policy(conf=None):
    """Pushes conf (default: weightd's load policy) over the configuration
    in force, and pops it on the way out, every key restored exactly."""
    lib = library()
    if conf is None:
        conf = lib.weightd_torch_load_policy().decode()
    _check(lib.weightd_torch_policy_push(conf.encode()))
    try:
        yield
    finally:
        _check(lib.weightd_torch_policy_pop())


@contextlib.contextmanager
def tag(name):
    """Memory allocated inside goes under tag name: it can sleep."""
    lib = library()
    _check(lib.weightd_torch_set_tag(_text(name)))
    _tags.append(name)
    try:
        yield
    finally:
        _tags.pop()
        _check(lib.weightd_torch_set_tag(_text(_tags[-1] if _tags else None)))


def sleep(name, offload=True):
    """Every byte under tag name goes back to the devices; tensors keep
    their addresses, which must not be touched until wake (a GPU faults).
    offload: keep the contents in host memory, else wake gives memory of
    undefined contents (buffers to be refilled, a KV cache)."""
    _synchronize()
    _check(library().weightd_torch_sleep(_text(name), 1 if offload else 0))


def wake(name):
    """Memory again under tag name, at the same addresses."""
    _check(library().weightd_torch_wake(_text(name)))


def empty_cache():
    """Every wholly free segment and page goes back to the devices."""
    _synchronize()
    _check(library().weightd_torch_empty_cache())


def reset_peak_memory_stats():
    _check(library().weightd_torch_reset_peaks())


def stats(device=0):
    """Statistics in torch.cuda.memory_stats()'s names
    ("reserved_bytes.all.current", "num_alloc_retries", ...)."""
    return _json(library().weightd_torch_stats, device)


def snapshot(device=0):
    """The device's segments in address order, each with its blocks."""
    return _json(library().weightd_torch_snapshot, device)
