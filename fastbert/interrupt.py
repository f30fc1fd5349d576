"""Ctrl-C (SIGINT) and SIGTERM as a request to stop: the training loop asks `requested` at each step
boundary, so it stops between two steps and saves a checkpoint from which a resumed run continues
bit for bit. A second signal stops at once (KeyboardInterrupt), except inside `deferred()` blocks
(saving), which finish first so that no file is left half written. With several processes,
`StopVote` makes them agree on the step boundary to stop at without a host wait inside a step."""
import contextlib
import os
import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    SIGNALS = SIGNALS

    def __init__(self, message=None):
        """`message`: written to stderr when the first signal arrives (None: nothing)."""
        self.message = message
        self.signum = None
        self._previous = {}
        self._deferring = 0
        self._pending = False  # a second signal arrived inside deferred()

    @property
    def requested(self):
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            if self.message:
                # os.write, not print: a handler may run while the main code is inside a print
                os.write(2, self.message.encode())
            return
        if self._deferring:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        """A block a second signal does not cut short; it stops the run right after the block."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if not self._deferring and self._pending:
            self._pending = False
            raise KeyboardInterrupt

    def install(self):
        # signal handlers can only be set from the main thread; elsewhere signals keep their handlers
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    def uninstall(self):
        """Give the signals back their previous handlers."""
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        self.uninstall()
        return False


class StopVote:
    """The processes of a torch.distributed group agree on the step boundary to stop at, one boundary
    late, so that no boundary waits for the others: `vote` launches this boundary's all_reduce (MAX)
    of the local request asynchronously and returns the previous boundary's result, whose reduce ran
    during the step in between. Every process calls `vote` at the same boundaries, so all of them
    read the same results and stop at the same boundary: the one after the first any of them asked.

    With NCCL the flag lives on the GPU and its all_reduce, and a copy of the result to pinned host
    memory, run on a side stream: the training stream never waits for the vote, and reading the
    result waits only for that copy (recorded before the next step was queued), not for the step."""

    def __init__(self, device, group=None):
        self.group = group
        cuda = dist.get_backend(group) == "nccl"
        device = torch.device(device)
        self._flag = torch.empty(1, device=device if cuda else "cpu")
        self._stream = torch.cuda.Stream(device) if cuda else None
        if cuda:
            self._flag.record_stream(self._stream)  # used there only: freed after that stream's last use
        self._host = torch.empty(1, pin_memory=True) if cuda else self._flag
        self._pending = None  # (work, event or None) of the last boundary's vote

    def vote(self, requested: bool) -> bool:
        """Cast this boundary's vote; whether the previous boundary's votes asked to stop (False at
        the first). Once True, nothing more is launched: every process stops there."""
        agreed = self._result()
        if not agreed:
            self._launch(bool(requested))
        return agreed

    def finish(self):
        """Wait for the vote still in flight (the loop ended without stopping): every process launched
        it, so every process can wait for it, and the group's next collective is matched."""
        self._result()

    def _launch(self, requested):
        if self._stream is None:  # gloo: a CPU tensor; the reduce runs on gloo's threads
            self._flag.fill_(float(requested))
            self._pending = (dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), None)
            return
        with torch.cuda.stream(self._stream):  # off the training stream: fill_ queues a kernel, no copy from host
            self._flag.fill_(float(requested))
            work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
            work.wait()  # the side stream (not the host) waits for the reduce
            self._host.copy_(self._flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._pending = (work, event)

    def _result(self):
        if self._pending is None:
            return False
        work, event = self._pending
        self._pending = None
        if event is None:
            work.wait()
        else:
            event.synchronize()
        return bool(self._host.item())  # a host tensor: no device sync
