"""A private ``redis-server`` on a loopback port, for ``vcemri demo --scale-out`` and the tests.

Durable as the README's deployment asks (append-only file, fsync on every write), so a broker
restarted mid-run keeps the tasks it had. Not for production: run Redis as a service there
(README: Scale-out).
"""

from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import config

from .demo import free_port


class RedisServer:
    """``redis-server`` in ``folder`` on ``127.0.0.1:port``; :meth:`start`, :meth:`stop`,
    :meth:`restart` (the same port and data)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = Path(folder)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.executable = shutil.which("redis-server")
        #: the password clients give (other users of the machine reach loopback ports too)
        self.password = secrets.token_hex(16)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def shown_url(self) -> str:
        """The URL for a message (password masked)."""
        return f"redis://:**@127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        if self.executable is None:
            raise config.ConfigError("environment", [
                "redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)"])
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "redis.log", "ab")
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--protected-mode", "yes", "--daemonize", "no",
             "--requirepass", self.password],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise config.VcemriError(
                    f"redis-server exited with status {self.process.returncode}; see "
                    f"{self.folder / 'redis.log'}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise config.VcemriError(f"redis-server did not answer on port {self.port} within "
                                 f"{timeout_s:.0f} s; see {self.folder / 'redis.log'}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                connection.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                answer = b""
                while answer.count(b"\r\n") < 2:
                    chunk = connection.recv(64)
                    if not chunk:
                        return False
                    answer += chunk
                return answer == b"+OK\r\n+PONG\r\n"
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        """Stop it (SIGTERM: it writes its data; ``kill``: SIGKILL, as a crash)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(10.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5.0)
        self.process = None

    def restart(self, kill: bool = True, down_s: float = 0.0) -> None:
        """Stop (``kill``: as a crash) and start again on the same port with the same data,
        after ``down_s`` seconds."""
        self.stop(kill=kill)
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
