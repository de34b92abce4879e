"""Run and time ONNX Runtime sessions in a child process, so a runtime that crashes is a verdict, not a death.

A model being debugged may well crash the runtime (a segmentation fault inside an optimizer or a
kernel). In-process that kills aligner with no message; here the child dies, the parent reports a
:class:`~aligner.errors.TargetRunError` naming the runtime, the signal and what was being run
(exit 3), and the next request starts a fresh child. One child serves every runner of a process
(it caches the last session), so the cost is one process start plus copying the captured arrays.
Timing (``aligner bench``) runs its loop in the child too: the clock is read there, around
``session.run`` alone, so the latencies carry no pipe cost.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aligner.errors import AlignerError, TargetRunError

log = logging.getLogger(__name__)


_KINDS = "biufcU"  # dtypes that cross the pipe as raw bytes (no objects: nothing is unpickled)


def _send(stream, header: dict, arrays: Sequence[np.ndarray] = ()) -> None:
    """One message: a length-prefixed JSON header naming each array's dtype and shape, then the
    arrays' raw bytes — no archive, no checksum, no extra copy (the tensors of a capture run are
    hundreds of MB)."""
    arrays = [_plain(a) for a in arrays]
    head = json.dumps(header | {"arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}).encode()
    stream.write(struct.pack("<Q", len(head)))
    stream.write(head)
    for a in arrays:
        if a.size:
            stream.write(a.reshape(-1).view(np.uint8).data)
    stream.flush()


def _plain(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind == "O":  # ONNX Runtime hands string tensors back as objects
        a = a.astype(str)
    if a.dtype.kind not in _KINDS:
        raise TypeError(f"cannot send a {a.dtype} array")
    return a if a.flags.c_contiguous else a.copy(order="C")  # ascontiguousarray would make a 0-d array 1-d


def _recv(stream) -> tuple[dict, list[np.ndarray]]:
    head = _read_exact(stream, 8)
    header = json.loads(_read_exact(stream, struct.unpack("<Q", head)[0]))
    arrays = []
    for dtype, shape in header.pop("arrays"):
        dtype = np.dtype(dtype)
        if dtype.kind not in _KINDS:
            raise EOFError  # not a message this module wrote
        a = np.empty(shape, dtype)
        if a.size:
            view = memoryview(a.reshape(-1).view(np.uint8))
            got = 0
            while got < len(view):
                n = stream.readinto(view[got:])
                if not n:
                    raise EOFError
                got += n
        arrays.append(a)
    return header, arrays


def _read_exact(stream, size: int) -> bytes:
    block = stream.read(size)
    if len(block) < size:
        raise EOFError
    return block


def _serve(read_fd: int, write_fd: int) -> None:  # pragma: no cover - runs in the child
    from aligner.backends.ort.runner import make_session, time_session
    from aligner.backends.target import Target

    requests, replies = os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb")
    key, session = None, None
    while True:
        try:
            req, feeds = _recv(requests)
        except EOFError:
            return
        try:
            if req.get("optimized"):  # write ONNX Runtime's optimized graph, run nothing
                make_session(req["path"], Target.parse(req["target"]), True, optimized_model_path=req["optimized"], label=req["label"])
                _send(replies, {"status": "ok"})
                continue
            stamp = (req["path"], os.stat(req["path"]).st_mtime_ns, req["target"], req["optimize"], req["arena"])
            if stamp != key:
                session, key = None, None
                session = make_session(req["path"], Target.parse(req["target"]), req["optimize"], memory_arena=req["arena"], label=req["label"])
                key = stamp
            if req.get("time"):  # [runs, warmup]: the latencies, measured here
                times = time_session(session, Target.parse(req["target"]), dict(zip(req["feeds"], feeds)), *req["time"], label=req["label"])
                _send(replies, {"status": "ok", "times": times})
                continue
            values = session.run(req["fetch"], dict(zip(req["feeds"], feeds)))
            _send(replies, {"status": "ok"}, values)
            del values, feeds
            _release_freed_memory()
        except AlignerError as exc:
            _send(replies, {"status": "aligner", "kind": type(exc).__name__, "message": str(exc)})
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types
            _send(replies, {"status": "error", "message": str(exc).strip().replace("\n", " ")[:600]})


def _release_freed_memory() -> None:
    """Hand freed memory back to the OS: glibc keeps freed blocks of up to 32 MB in the heap, so a
    process that handles many differently sized tensors in turn (capture runs) grows its peak with
    each one unless told."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Sandbox:
    """One child process running ONNX Runtime sessions on request (a fresh interpreter: no fork of
    the caller's state, and no re-import of the caller's script as multiprocessing's spawn does)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self._proc = subprocess.Popen([sys.executable, "-c", f"from aligner.backends.ort.sandbox import _serve; _serve({to_child_r}, {from_child_w})"],
                                      pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        try:  # 1 MiB pipes: captured tensors cross in fewer, larger writes (Linux)
            import fcntl

            for fd in (to_child_w, from_child_r):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        except (ImportError, AttributeError, OSError):
            pass
        self._requests, self._replies = os.fdopen(to_child_w, "wb"), os.fdopen(from_child_r, "rb")

    def warm(self) -> None:
        """Start the child now (it imports ONNX Runtime while the caller loads the model)."""
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> None:  # with the lock held
        if self._proc is None or self._proc.poll() is not None:
            self._start()

    def run(self, path: Path, target, optimize: bool, arena: bool, fetch: Sequence[str], feeds: dict, label: str,
            optimized: Path | None = None) -> list[np.ndarray]:
        """Run ``path`` on ``target`` fetching ``fetch``; with ``optimized``, only have ONNX Runtime
        write the graph it optimized there."""
        header = {"path": str(path), "target": str(target), "optimize": optimize, "arena": arena, "fetch": list(fetch),
                  "feeds": list(feeds), "label": label, "optimized": str(optimized) if optimized else None}
        return self._request(header, feeds, label, f"while building or running the model {_fetched(fetch)}. ", _CAPTURE_ADVICE)[1]

    def time(self, path: Path, target, feeds: dict, runs: int, warmup: int, label: str) -> list[float]:
        """Milliseconds of each of ``runs`` runs of ``path`` (uncaptured, optimized as deployed) after
        ``warmup`` untimed ones, timed in the child; a crash is a :class:`TargetRunError`."""
        header = {"path": str(path), "target": str(target), "optimize": True, "arena": True, "fetch": [], "feeds": list(feeds),
                  "label": label, "optimized": None, "time": [runs, warmup]}
        return self._request(header, feeds, label, "while building or timing the model. ", _TIMING_ADVICE)[0]["times"]

    def _request(self, header: dict, feeds: dict, label: str, doing: str, advice: str) -> tuple[dict, list[np.ndarray]]:
        """Send one request and read its reply; a child that dies is a :class:`TargetRunError` naming the signal."""
        with self._lock:
            self._ensure_started()
            try:
                _send(self._requests, header, list(feeds.values()))
                reply, values = _recv(self._replies)
            except (EOFError, BrokenPipeError, ConnectionResetError):
                code = self._proc.wait(10)
                self._proc = None
                raise TargetRunError(f"{label}: ONNX Runtime crashed ({describe_exit(code)}) {doing}The runtime died, not aligner: "
                                     f"nothing was judged on this run. {advice}") from None
        if reply["status"] == "ok":
            return reply, values
        if reply["status"] == "aligner":
            from aligner import errors

            raise getattr(errors, reply["kind"], TargetRunError)(reply["message"])
        raise TargetRunError(f"{label}: ONNX Runtime failed while running: {reply['message']}")

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._requests.close()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                self._replies.close()
            self._proc = None


_CAPTURE_ADVICE = ("Which tensors are graph outputs changes what ONNX Runtime optimizes, so another capture set may run (try "
                   "another --strategy); or a lower optimization level (--target-option graph_optimization_level=basic), or "
                   "report it to ONNX Runtime with the model.")
_TIMING_ADVICE = ("Try a lower optimization level (@graph_optimization_level=basic), another precision of this runtime, or "
                  "report it to ONNX Runtime with the model.")


def _fetched(fetch: Sequence[str]) -> str:
    if not fetch:
        return "fetching its graph outputs"
    return f"with {len(fetch)} output(s) ({', '.join(list(fetch)[:3])}{', ...' if len(fetch) > 3 else ''})"


def describe_exit(code: int | None) -> str:
    """How a child process ended, in words (``signal SIGSEGV``, ``exit code 3``)."""
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


_SANDBOX: Sandbox | None = None


def sandboxed(target) -> bool:
    """Whether ``target``'s optimized ONNX Runtime sessions run in the child (``sandbox=1``, the default)."""
    return target.option_dict.get("sandbox", "1") != "0"


def sandbox() -> Sandbox:
    """The process's sandbox (started on first use, restarted after a crash)."""
    global _SANDBOX
    if _SANDBOX is None:
        _SANDBOX = Sandbox()
        import atexit

        atexit.register(_SANDBOX.close)
    return _SANDBOX


__all__ = ["Sandbox", "sandbox", "sandboxed"]
