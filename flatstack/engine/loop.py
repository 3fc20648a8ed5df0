"""The engine's thread: it owns the `LLM` and steps it; an asyncio event loop (the server's) talks to it
only through `submit` and `abort`, its thread-safe entry points (a command queue in, one asyncio queue of
outputs per request out).

Every sequence that `submit` accepts ends exactly once, whatever happens: its final output, an error,
or its abort; its slot in the queue limit is returned then. If a step fails as a whole (a bug, not bad
input: a request's own failure ends only that request, inside `LLM.step`), every sequence accepted so
far gets the error, not only those the engine was running."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from flatstack.engine.llm import LLM
from flatstack.engine.output import RequestOutput
from flatstack.engine.sampling import RequestError, SamplingParams


class EngineBusy(Exception):
    """The queue limit is reached: retry later."""


@dataclass
class Request:
    """A submitted request's handle: its id, and the queue its outputs arrive on (ending with a finished
    output or an exception)."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    read_at: float = field(default_factory=time.monotonic)  # when its reader last took an output


class EngineLoop:
    def __init__(self, llm: LLM, max_queue: int, slow_reader_timeout: float = 30.0):
        self.llm, self.max_queue, self.slow_reader_timeout = llm, max_queue, slow_reader_timeout
        self.commands: queue.Queue = queue.Queue()
        self.listeners: dict[str, Request] = {}
        self.lock = threading.Lock()  # guards `listeners`: added on the event loop, removed on this thread
        self.stats = llm.stats
        self.running = False

    # -- the event loop's side ------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Sequences accepted and not yet ended."""
        return len(self.listeners)

    def submit(self, requests: list[tuple[list[int], SamplingParams]]) -> list[Request]:
        """Queue requests (prompt token ids, as `LLM.check_request` returned them, and their parameters),
        all or none; called on the event loop that will read their outputs."""
        loop = asyncio.get_running_loop()
        seqs = [self.llm.sequence(ids, params, uuid.uuid4().hex) for ids, params in requests]  # checked already
        with self.lock:
            if len(self.listeners) + len(seqs) > self.max_queue:
                raise EngineBusy(f"the server is at its limit of {self.max_queue} queued sequences; retry later")
            handles = [Request(seq.request_id, loop) for seq in seqs]
            self.listeners.update((h.request_id, h) for h in handles)
        self.commands.put(("add", seqs))
        return handles

    def abort(self, request_ids: list[str]) -> None:
        self.commands.put(("abort", request_ids))

    def stop(self) -> None:
        self.commands.put(("stop", None))

    # -- the engine thread's side ---------------------------------------------------------------

    def deliver(self, request_id: str, out: RequestOutput | Exception) -> None:
        listener = self.listeners.get(request_id)
        if listener is None:
            return
        final = isinstance(out, Exception) or out.finished
        if not final and not listener.outputs.empty() and \
                time.monotonic() - listener.read_at > self.slow_reader_timeout:
            self.llm.abort(request_id)  # its reader took nothing for too long: stop generating for it
            out, final = RuntimeError(f"the client read nothing for {self.slow_reader_timeout:g} s"), True
        if final:
            self.forget(request_id)
        try:
            listener.loop.call_soon_threadsafe(listener.outputs.put_nowait, out)
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            pass

    def forget(self, request_id: str) -> None:
        with self.lock:
            self.listeners.pop(request_id, None)

    def handle(self, kind: str, payload) -> bool:
        if kind == "stop":
            return False
        if kind == "add":
            for seq in payload:
                if seq.request_id not in self.listeners:
                    continue  # aborted before it got here
                try:
                    self.llm.add_sequence(seq)
                except RequestError as e:
                    self.deliver(seq.request_id, e)
        elif kind == "abort":
            for request_id in payload:
                self.llm.abort(request_id)
                self.forget(request_id)
        return True

    def run(self) -> None:
        try:
            self.llm.warm_up()  # the decode graphs compile on a thread of their own; requests are served meanwhile
            self.running = True  # /health answers 200 from here
            self.loop()
        finally:
            self.running = False

    def loop(self) -> None:
        while True:
            # wait for work only when the engine is idle (waking now and then, for signals)
            timeout = 0.5 if not self.llm.has_unfinished() else None
            if not self.drain_commands(timeout):
                return
            if not self.llm.has_unfinished():
                self.stats = self.llm.stats
                continue
            try:
                outputs = self.llm.step()
            except Exception as e:  # a bug, not bad input: fail every accepted sequence, keep serving
                self.fail_all(f"{type(e).__name__}: {e}")
                continue
            self.stats = self.llm.stats
            for out in outputs:
                self.deliver(out.request_id, RuntimeError(out.error) if out.error else out)

    def drain_commands(self, timeout: float | None) -> bool:
        """Handle every queued command, waiting up to `timeout` for the first; False on stop."""
        try:
            item = self.commands.get(timeout=timeout) if timeout else self.commands.get_nowait()
        except queue.Empty:
            return True
        while item is not None:
            if not self.handle(*item):
                return False
            try:
                item = self.commands.get_nowait()
            except queue.Empty:
                item = None
        return True

    def fail_all(self, error: str) -> None:
        for request_id in list(self.listeners):
            self.llm.abort(request_id)
            self.deliver(request_id, RuntimeError(error))
        self.stats = self.llm.stats
