"""Sharing over a real server: a DVC SSH remote against an OpenSSH server started on 127.0.0.1.

The test makes its own host and client keys, starts Debian's `sshd` (installed by `make test`)
with a minimal config on a free loopback port, and points DVC at it with key authentication.
DVC runs with a private HOME, so nothing of the user's ~/.ssh is involved. Checked: push, pull
in a fresh clone, identical digests; and a push killed part-way completes on retry.

Measured here: DVC's SSH remote (dvc-ssh 4.3 on sshfs) does not check host keys at all (sshfs
passes ``known_hosts=None`` to asyncssh, and dvc-ssh has no option for it); a push to a server
whose key differs from the one in known_hosts succeeds. The README says so.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from workflow_helpers import BIN, ENV, SPLITS, clone, commit_all, copy_worktree, snakemake

from datumdb.verify import content_digest

pytestmark = pytest.mark.network

SSHD = Path("/usr/sbin/sshd")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SshServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.home = root / "home"  # the client's HOME: nothing of the user's ~/.ssh
        self.client_key = root / "client_key"
        self.storage = root / "storage"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / name)], check=True)
        (self.root / "authorized_keys").write_text((self.root / "client_key.pub").read_text())
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.root / 'host_key'}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\nPidFile {self.root / 'sshd.pid'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\n"
        )
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        self.process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL)
        self.home.mkdir()
        self.storage.mkdir()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("sshd did not start listening")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}{self.storage}"

    def dvc(self, repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**ENV, "HOME": str(self.home)}
        result = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def configure(self, repo: Path) -> None:
        """Point the repo's default remote at this server, with the client key (this clone only)."""
        self.dvc(repo, "remote", "add", "--force", "--default", "server", self.url)
        self.dvc(repo, "remote", "modify", "--local", "server", "keyfile", str(self.client_key))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SshServer]:
    assert SSHD.exists(), "openssh-server is missing; `make test` installs it (needs root and apt)"
    running = SshServer(tmp_path / "ssh")
    running.root.mkdir()
    running.start()
    yield running
    running.stop()


def _digests(repo: Path) -> dict[str, str]:
    return {split: content_digest(repo / "data" / "lmdb" / split) for split in SPLITS}


def _built_repo(path: Path, server: SshServer, *, count: int | None = None) -> Path:
    path.mkdir()
    copy_worktree(path)
    shutil.copy(path / ".test" / "params.yaml", path / "params.yaml")
    if count is not None:  # a bigger dataset, so that a push takes long enough to be interrupted
        text = (path / "params.yaml").read_text().replace("count: 240", f"count: {count}")
        (path / "params.yaml").write_text(text.replace("encoding: png", "encoding: none"))
    snakemake("--cores", "2", cwd=path)
    server.configure(path)
    server.dvc(path, "commit", "--force", "--quiet")
    commit_all(path)
    return path


def test_push_to_an_ssh_remote_then_pull_in_a_fresh_clone(server: SshServer, tmp_path: Path) -> None:
    repo = _built_repo(tmp_path / "origin", server)
    server.dvc(repo, "push")
    assert any(server.storage.rglob("*")), "nothing arrived on the SSH server"

    fresh = clone(repo, tmp_path / "fresh")
    server.configure(fresh)  # keyfile lives in .dvc/config.local, which git does not carry
    server.dvc(fresh, "pull")  # the shard sets
    server.dvc(fresh, "repro")  # each split's database, assembled from them
    assert _digests(fresh) == _digests(repo)
    assert "up to date" in server.dvc(fresh, "status").stdout
    status = server.dvc(fresh, "status", "--cloud").stdout
    assert "in sync" in status


def test_an_interrupted_push_completes_on_retry(server: SshServer, tmp_path: Path) -> None:
    repo = _built_repo(tmp_path / "origin", server, count=40000)
    env = {**ENV, "HOME": str(server.home)}
    push = subprocess.Popen([str(BIN / "dvc"), "push"], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and push.poll() is None and not any(server.storage.rglob("*/*")):
        time.sleep(0.01)
    interrupted = push.poll() is None
    push.send_signal(signal.SIGKILL)
    push.wait()
    assert interrupted, "the push finished before it could be interrupted"
    stored_before_retry = sum(1 for p in server.storage.rglob("*") if p.is_file())

    server.dvc(repo, "push")  # the retry uploads what is missing
    stored = sum(1 for p in server.storage.rglob("*") if p.is_file())
    assert stored > stored_before_retry

    fresh = clone(repo, tmp_path / "fresh")
    server.configure(fresh)
    server.dvc(fresh, "pull")  # the shard sets
    server.dvc(fresh, "repro")  # each split's database, assembled from them
    assert _digests(fresh) == _digests(repo)
    assert not os.path.exists(fresh / "data" / "lmdb" / "train" / "lock.mdb")
