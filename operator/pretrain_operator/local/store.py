"""The rendezvous store of a local run (:mod:`pretrain_trainer.rendezvous`) as a child
process on a free port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from types import TracebackType


class StoreError(Exception):
    """The store process could not be started."""


class StoreProcess:
    """Run the store in a child process on a free port; ``with`` waits until it listens."""

    def __init__(self, *, timeout: float = 120.0) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.timeout = timeout
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StoreProcess:
        return self.start()

    def start(self) -> StoreProcess:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pretrain_trainer.rendezvous",
                f"--port={self.port}",
                "--host=127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Workers must find it listening, or their agents give up after a long timeout.
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StoreError(f"the rendezvous store exited with code {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.close()
        raise StoreError(f"the rendezvous store did not listen on port {self.port} in time")

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait()
