"""A real Prometheus for tests and docs: started on a free port with a generated config that
scrapes given localhost ports every second and evaluates the project's alert rules."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.conftest import ROOT

RULES = ROOT / "alerts" / "pretrainjob-rules.yaml"


def free_ports(count: int) -> list[int]:
    """``count`` consecutive free ports (a run serves on P, its trainers on P+1...)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        try:
            for port in range(base, base + count):
                with socket.socket() as taken:
                    taken.bind(("127.0.0.1", port))
            return list(range(base, base + count))
        except OSError:
            continue


class Prometheus:
    def __init__(self, workdir: Path, *, targets: list[int]) -> None:
        self.workdir, self.targets = workdir, targets
        (self.port,) = free_ports(1)
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "pretrain",
                    "honor_labels": True,  # our `job` label is the PretrainJob's name
                    "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in self.targets]}],
                }
            ],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = self.workdir / "prometheus.log"
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.api("status/buildinfo")
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    tail = log.read_text()[-2000:]
                    raise RuntimeError(f"prometheus did not start: {tail}") from None
                time.sleep(0.2)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def api(self, path: str, **query: Any) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.load(response)
        if body["status"] != "success":
            raise RuntimeError(f"{path}: {body}")
        return body["data"]

    def series(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        """A range query at 1 s resolution: [{"metric": labels, "values": [[t, "v"], ...]}]."""
        data = self.api("query_range", query=expr, start=start, end=end, step="1s")
        return list(data["result"])

    def values(self, expr: str, start: float, end: float) -> list[float]:
        return [float(v) for s in self.series(expr, start, end) for _, v in s["values"]]
