"""Loading untrusted pickles (RECON's `traj_data.pkl`) without running code or allocating without bound.

Contract: `safe_load(path)` returns plain Python containers, numbers, strings, bytes and numpy arrays of non-object
dtypes, or raises `UnsafePickle` (an `pickle.UnpicklingError`) with a one-line reason; nothing outside the
allow-list below is ever imported or called.

Three defences, in this order:
1. Size: the file is read whole (at most `max_file_bytes`); every length field is then checked against the bytes
   that are really there.
2. Opcode scan (`pickletools.genops`, which parses without building anything): a memo index may not exceed the
   number of memo writes so far, and a frame may not claim more bytes than remain. Without it, CPython 3.11's
   unpickler allocates before it validates: measured with tracemalloc, a 9-byte LONG_BINPUT allocates 4.3 GB
   (the memo table is grown to the index) and a 15-byte BINBYTES8 allocates the 300 MB it declares.
   Every opcode is charged OBJECT_COST bytes against the budget (one-byte opcodes such as EMPTY_DICT would
   otherwise build 64 bytes per byte of file).
3. Guarded globals: the only callables are numpy array/scalar/dtype reconstruction and the few builtins that
   protocols 2–5 use for sets, bytes, bytearrays and complex numbers, each wrapped to check its arguments and
   charge what it will build against the budget before building it. `numpy.ndarray` itself is never handed out
   (calling it allocates any shape): pickles get a token that only `_reconstruct` accepts. Object arrays are
   refused (their state is a list of arbitrary objects).
The budget is `16 × file size + 1 MiB` for everything together: an honest pickle of arrays uses about 1×, one of
Python float lists about 7× (9 bytes per float in the file, 64 charged).
"""
from __future__ import annotations

import codecs
import io
import math
import pickle
import pickletools
from pathlib import Path
from typing import Any

import numpy as np

MAX_FILE_BYTES = 8 << 20  # traj_data.pkl holds (T, 2) + (T,) floats: tens of kB; 8 MiB is 3 * 10^5 steps
OBJECT_COST = 64  # bytes per opcode: an empty dict, the largest object a one-byte opcode makes (getsizeof, 3.11)
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


class UnsafePickle(pickle.UnpicklingError):
    """The pickle asks for something the loader refuses; nothing was called or allocated for it."""


class RefusedGlobal(UnsafePickle):
    """The pickle names a global outside the allow-list (it would run code); nothing was called."""


class _ArrayToken:
    """Stands in for `numpy.ndarray` inside a pickle: accepted by `_reconstruct`, not callable."""

    def __repr__(self) -> str:
        return "<ndarray token>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickle("refused numpy.ndarray(...): arrays are only rebuilt through _reconstruct")


_NDARRAY = _ArrayToken()


class _GuardedArray(np.ndarray):
    """What `_reconstruct` builds, so that the BUILD opcode's `__setstate__` is checked before numpy allocates."""

    _budget: "_Budget"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickle(f"refused ndarray state of type {type(state).__name__}")
        shape, dtype, _fortran, raw = state[-4:]
        dtype = _check_dtype(dtype)
        nbytes = _nbytes(shape, dtype)
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != nbytes:
            raise UnsafePickle(f"refused ndarray state: {nbytes} bytes for shape {shape}, "
                               f"data of {len(raw) if isinstance(raw, (bytes, bytearray)) else type(raw).__name__}")
        self._budget.charge(nbytes, "ndarray")
        super().__setstate__(state)


class _Budget:
    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def charge(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or self.used + nbytes > self.limit:
            raise UnsafePickle(f"refused {what} of {nbytes} bytes: the pickle may build at most {self.limit} "
                               f"bytes ({self.used} used)")
        self.used += nbytes


def _check_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype):
        raise UnsafePickle(f"refused array dtype of type {type(dtype).__name__}")
    if dtype.hasobject:
        raise UnsafePickle("refused object array (only numeric arrays are read)")
    return dtype


def _nbytes(shape: Any, dtype: np.dtype) -> int:
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise UnsafePickle(f"refused array shape {shape!r}")
    return math.prod(shape) * dtype.itemsize


def _guarded_globals(budget: _Budget) -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray, numeric

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not _NDARRAY:
            raise UnsafePickle(f"refused _reconstruct of {subtype!r}")
        if not isinstance(dtype, (bytes, str)) or len(dtype) > 8:  # numpy writes b"b": the real dtype comes later
            raise UnsafePickle(f"refused _reconstruct dtype {dtype!r}")
        dt = _check_dtype(np.dtype(dtype))
        budget.charge(_nbytes(shape, dt), "ndarray")
        arr = np.ndarray.__new__(_GuardedArray, shape, dt)
        arr._budget = budget
        return arr

    def scalar(dtype: Any, data: Any = None) -> Any:
        dtype = _check_dtype(dtype)
        if not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise UnsafePickle(f"refused numpy scalar of {dtype} from {type(data).__name__}")
        return multiarray.scalar(dtype, data)

    def frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        dtype = _check_dtype(dtype)
        if not isinstance(buf, (bytes, bytearray)) or len(buf) != _nbytes(shape, dtype) or order not in "CF":
            raise UnsafePickle(f"refused _frombuffer of shape {shape!r}")
        budget.charge(len(buf), "ndarray")
        return numeric._frombuffer(buf, dtype, shape, order)

    def make_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
        if not isinstance(spec, str) or len(spec) > 16:  # "f8", "V16", "U4"...: structured dtypes are not read
            raise UnsafePickle(f"refused dtype {spec!r}")
        # always a copy: BUILD then runs the pickle's __setstate__ on it, which must never reach numpy's shared
        # singleton for "f8" (that would change float64 for the whole process)
        return _check_dtype(np.dtype(spec, align=bool(align), copy=True))

    def counted(kind: type) -> Any:
        def build(items: Any = (), encoding: Any = None) -> Any:
            if encoding is not None:  # protocol 2 writes bytearray(latin-1 text, "latin-1")
                items = encode(items, encoding)
            if not isinstance(items, (list, tuple, bytes, bytearray)):  # never an int: bytes(10**9) is a bomb
                raise UnsafePickle(f"refused {kind.__name__}({type(items).__name__})")
            per_item = 1 if kind in (bytes, bytearray) else 64  # 64: a generous cost of one set entry
            budget.charge(per_item * len(items), kind.__name__)
            return kind(items)
        return build

    def make_complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
        if not all(isinstance(v, (int, float)) for v in (real, imag)):
            raise UnsafePickle("refused complex() of non-numbers")
        return complex(real, imag)

    def encode(text: Any, encoding: Any = "utf-8") -> bytes:  # protocol 2 stores bytes as latin-1 text
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise UnsafePickle(f"refused _codecs.encode(..., {encoding!r})")
        budget.charge(len(text), "bytes")
        return codecs.encode(text, "latin1")

    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): make_dtype,
                                           ("_codecs", "encode"): encode}
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 1.x pickles name numpy.core
        allowed[(mod, "_reconstruct")] = reconstruct
        allowed[(mod, "scalar")] = scalar
    for mod in ("numpy._core.numeric", "numpy.core.numeric"):
        allowed[(mod, "_frombuffer")] = frombuffer
    for mod in ("builtins", "__builtin__"):
        for kind in (set, frozenset, bytes, bytearray):
            allowed[(mod, kind.__name__)] = counted(kind)
        allowed[(mod, "complex")] = make_complex
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """Refuses every global except guarded numpy reconstruction and builtin sets/bytes/complex.

    Use `safe_load`: this class alone does not do the opcode scan (see the module docstring)."""

    def __init__(self, file: Any, budget: "_Budget | None" = None):
        super().__init__(file)
        self._allowed = _guarded_globals(budget or _Budget(1 << 20))

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise RefusedGlobal(f"refused global {module}.{name}: only numpy arrays and builtin "
                                "containers may be unpickled")
        return found


def scan(data: bytes) -> int:
    """Parse every opcode without building anything; refuse lengths and memo indices that would allocate.
    Returns the number of opcodes."""
    memo_writes = ops = 0
    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            ops += 1
            if op.name == "MEMOIZE":
                memo_writes += 1
            elif op.name in _MEMO_PUT:
                if not isinstance(arg, int) or arg > memo_writes:
                    raise UnsafePickle(f"refused memo index {arg} at byte {pos} (only {memo_writes} entries so far)")
                memo_writes += 1
            elif op.name in _MEMO_GET and (not isinstance(arg, int) or arg >= memo_writes):
                raise UnsafePickle(f"refused memo read {arg} at byte {pos} ({memo_writes} entries)")
            elif op.name == "FRAME" and arg > len(data) - pos:
                raise UnsafePickle(f"refused frame of {arg} bytes at byte {pos}: only {len(data) - pos} remain")
    except UnsafePickle:
        raise
    except Exception as err:  # genops: a length field longer than the data, an unknown opcode, no STOP
        raise UnsafePickle(f"not a readable pickle ({err})") from None
    return ops


def _plain(obj: Any) -> Any:
    """Turn the guarded arrays back into plain ndarrays inside the containers a pickle can build."""
    if isinstance(obj, _GuardedArray):
        return obj.view(np.ndarray)
    if obj is _NDARRAY:
        raise UnsafePickle("refused numpy.ndarray as a value (only arrays are read, not the class)")
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


def loads(data: bytes) -> Any:
    ops = scan(data)
    budget = _Budget(16 * len(data) + (1 << 20))
    budget.charge(OBJECT_COST * ops, f"{ops} objects")
    return _plain(SafeUnpickler(io.BytesIO(data), budget=budget).load())


def safe_load(path: str | Path, max_file_bytes: int = MAX_FILE_BYTES) -> Any:
    path = Path(path)
    size = path.stat().st_size
    if size > max_file_bytes:
        raise UnsafePickle(f"refused pickle of {size} bytes (limit {max_file_bytes})")
    with open(path, "rb") as fh:
        data = fh.read(size + 1)  # read(n) allocates n bytes up front: never ask for the limit itself
    if len(data) > size:  # grew since stat
        raise UnsafePickle(f"refused pickle that grows while read: {path}")
    return loads(data)
