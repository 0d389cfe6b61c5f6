"""Start a real `coserve serve` process on a loopback port for tests, and stop it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EngineProcess:
    def __init__(self, model_dir: Path, data_root: Path, token: str | None, *extra: str, host: str = "127.0.0.1",
                 port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.log = data_root / f"engine-{self.port}.log"
        args = [sys.executable, "-m", "coserve.engine.cli", "serve", "--model", str(model_dir),
                "--data-root", str(data_root), "--host", host, "--port", str(self.port), "--device", "cpu",
                "--served-model-name", "tiny", "--log-level", "warning", *extra]
        if token:
            token_file = data_root / "admin-token"
            token_file.write_text(token + "\n")
            args += ["--admin-token-file", str(token_file)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(args, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("engine did not become ready in 120 s")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
