"""A throwaway PostgreSQL for the tests and benchmarks of the shared store: Debian's server binaries
(/usr/lib/postgresql/*/bin), a cluster in a temporary folder on a free 127.0.0.1 port, stopped and
removed at the end. PostgreSQL refuses to run as root (PostgreSQL docs: server setup), so under
root the cluster belongs to `nobody`, in a folder of its own that nobody else can enter."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any, List, Optional

SUPERUSER, PASSWORD = "postgres", "pg-test-secret"


def server_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL's server is not installed: run `apt-get install postgresql` as root "
                           "(make test does it)")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """`template`: the data folder of a cluster made before and never started, copied instead of
    running initdb again (a second of CPU for each test worker)."""

    def __init__(self, template: Optional[Path] = None) -> None:
        self._folder("agi-bitrix-pg-")
        self.port = _free_port()
        if template is not None:  # cp -a keeps the owner (nobody under root) and modes PostgreSQL checks
            subprocess.run(["cp", "-a", str(template), str(self.data)], check=True, timeout=120)
        else:
            self._initdb()
        self.start()

    def _folder(self, prefix: str) -> None:
        self.bin = server_bin()
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.root / "data"
        self.prefix: List[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("nobody")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]

    def _initdb(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.prefix:
            os.chown(pwfile, pwd.getpwnam("nobody").pw_uid, -1)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}", "-E", "UTF8",
                  "--auth-host=scram-sha-256", "--auth-local=trust", "--no-sync", "--no-instructions")

    @classmethod
    def template(cls) -> Path:
        """A fresh cluster's data folder, never started, for `Cluster(template=...)`; the caller
        removes its parent folder when done."""
        made = cls.__new__(cls)
        made._folder("agi-bitrix-pg-template-")
        made._initdb()
        return made.data

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.prefix, str(self.bin / tool), *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd=str(self.root), timeout=120)

    def start(self) -> None:
        # Durability off: a test cluster is thrown away (PostgreSQL docs: non-durable settings).
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
                " -c synchronous_commit=off -c max_connections=300 -c shared_buffers=32MB")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres", user: str = SUPERUSER, password: Optional[str] = PASSWORD) -> str:
        auth = f"{user}:{password}" if password is not None else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> List[Any]:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else []

    def database(self, template: Optional[str] = None) -> str:
        """A new empty database (or a copy of `template`); its name."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.sql(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        return name

    def close(self) -> None:
        try:
            self.stop("immediate")
        except Exception:
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
