"""Transformers' answers computed in a child process, for a process that has not imported transformers.

Importing transformers and torch costs seconds of CPU and hundreds of MB that a conversion has no other use for.
In a thread of the converting process that import takes turns with the lanes for the interpreter; in its own
process it runs on another core, and its memory is returned as soon as the answers are in.

A cold import also reads thousands of small files (transformers reads its models' sources to build its lazy
import table); beside a conversion's large reads each of them waits its turn in the disk's queue. The child
records the files its import opened, a list kept per Python environment, and the next child reads them, many at
once, before it imports, so that its import finds them in the page cache.

The protocol is one JSON line each way: `[kind, args]` in, the answer (a JSON object) out.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

PREFETCH_THREADS = 32


class ChildGone(Exception):
    """The child ended without answering."""


class Child:
    """One child process running `python -m <module>`, whose `serve` answers questions one at a time."""

    def __init__(self, module: str):
        package_parent = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH"))
                                                         if p))
        self._stderr = tempfile.TemporaryFile()  # kept for the one line that says why a child ended
        self._proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr, env=env)
        self._lock = threading.Lock()
        self.peak_rss_bytes = 0  # said by the child as it ends

    def ask(self, kind: str, args: list) -> dict:
        with self._lock:
            try:
                self._proc.stdin.write(json.dumps([kind, args]).encode() + b"\n")
                self._proc.stdin.flush()
                line = self._proc.stdout.readline()
            except (BrokenPipeError, ValueError):
                line = b""
            if not line:
                raise ChildGone(self._why_gone())
            return json.loads(line)

    def _why_gone(self) -> str:
        self._proc.kill()  # it closed its output: it is ending, or hangs
        code = self._proc.wait()
        self._stderr.seek(0)
        last = next((line for line in reversed(self._stderr.read().decode(errors="replace").splitlines())
                     if line.strip()), "")
        return f"exit {code}" + (f": {last.strip()}" if last else "")

    def close(self) -> None:
        """End the idle child: its input closed, it says its peak resident memory (`peak_rss_bytes`) and exits."""
        with self._lock:
            if self._proc.poll() is None:
                try:
                    self._proc.stdin.close()
                    last = self._proc.stdout.readline()
                    self.peak_rss_bytes = json.loads(last).get("peak_rss_bytes", 0) if last else 0
                except (OSError, ValueError):
                    pass
            self._stop()

    def kill(self) -> None:
        """End the child at once, busy or not (a question being asked then fails with `ChildGone`)."""
        self._proc.kill()
        self._proc.wait()

    def _stop(self) -> None:
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._stderr):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:
                    pass


def serve(answer_of: dict[str, Callable], record: Path | None) -> None:
    """The child's loop: read the recorded files, then answer `[kind, args]` lines with `answer_of[kind](*args)`
    until the input ends; the first answer's import is recorded into `record` (when it has none yet)."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the imported code prints goes to stderr, never into the answers
    opened = _record_opens() if record is not None and not record.is_file() else None
    if record is not None and opened is None:
        prefetch(record)
    for line in sys.stdin:
        kind, args = json.loads(line)
        answers.write(json.dumps(answer_of[kind](*args)) + "\n")
        answers.flush()
        if opened is not None:
            _save_record(record, opened)
            opened = None
    answers.write(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}) + "\n")
    answers.flush()


def _record_opens() -> list[str]:
    """Every path this process opens or lists from now on (audit events), into the returned list."""
    opened: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], str):
            opened.append(args[0])

    sys.addaudithook(hook)
    return opened


def _save_record(record: Path, opened: list[str]) -> None:
    paths = [p for p in dict.fromkeys(os.path.abspath(p) for p in list(opened)) if os.path.exists(p)]
    write_cache_file(record, "\n".join(paths) + "\n")  # without one the next import reads its files one by one


def write_cache_file(path: Path, text: str) -> None:
    """Write a file of the cache whole (a reader sees the old file or the new one, never half of one), or nothing
    where it cannot be written: a cache only saves time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass


def prefetch(record: Path) -> None:
    """Read the recorded files and list the recorded folders, PREFETCH_THREADS at a time."""
    try:
        paths = record.read_text().splitlines()
    except OSError:
        return

    def read(path: str) -> None:
        try:
            if os.path.isdir(path):
                os.listdir(path)
            else:
                with open(path, "rb", buffering=0) as f:
                    while f.read(1 << 20):
                        pass
        except OSError:
            pass

    with ThreadPoolExecutor(PREFETCH_THREADS) as pool:
        list(pool.map(read, paths))


def record_path(cache: Path) -> Path:
    """Where this Python environment's import record is kept under `cache`: one per interpreter and versions of
    transformers and torch."""
    versions = []
    for name in ("transformers", "torch"):
        try:
            versions.append(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            versions.append(None)
    key = hashlib.sha256(json.dumps([sys.executable, sys.version, versions]).encode()).hexdigest()[:32]
    return cache / "imports" / f"{key}.txt"

