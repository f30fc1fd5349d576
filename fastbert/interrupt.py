"""Ctrl-C (SIGINT) and SIGTERM as a request to stop: the training loop asks `requested` at each step
boundary, so it stops between two steps and saves a checkpoint from which a resumed run continues
bit for bit. A second signal stops at once (KeyboardInterrupt), except inside `deferred()` blocks
(saving), which finish first so that no file is left half written."""
import contextlib
import os
import signal
import threading

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
