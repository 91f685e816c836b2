"""Sharing over S3 for real: a DVC S3 remote (dvc-s3) against moto's S3 server on 127.0.0.1.

The test starts `moto_server` (from moto[server], installed by `make test`) on a free loopback
port, creates a bucket through boto3, and points the repository's default remote at it with
`dvc remote add` and `dvc remote modify endpointurl`, committed to git as a team would. The
credentials are moto's dummy ones, in the environment only; HOME and the AWS config files are
temporary, so nothing of the user's ~/.aws is involved. Checked: the push stores objects in the
bucket, a fresh clone pulls the shard sets and assembles databases with the same digests, `dvc
status --cloud` is in sync.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from workflow_helpers import BIN, ENV, SPLITS, clone, commit_all, copy_worktree

from datumdb.verify import content_digest

pytestmark = pytest.mark.network

BUCKET = "datumdb-test"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        home = root / "home"
        home.mkdir()
        self.env = {
            **ENV,
            "HOME": str(home),
            "AWS_CONFIG_FILE": str(home / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.log = (root / "moto.log").open("wb")
        self.process = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto_server did not start listening; see {root / 'moto.log'}")
            time.sleep(0.05)
        self.client = boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=10)
        self.log.close()

    def objects(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def dvc(self, repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=self.env, capture_output=True, text=True)
        if result.returncode != 0:
            raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    server = S3Server(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def _digests(repo: Path) -> dict[str, str]:
    return {split: content_digest(repo / "data" / "lmdb" / split) for split in SPLITS}


def test_push_to_an_s3_remote_then_pull_in_a_fresh_clone(s3: S3Server, tmp_path: Path) -> None:
    s3.client.create_bucket(Bucket=BUCKET)
    repo = tmp_path / "origin"
    repo.mkdir()
    copy_worktree(repo)
    shutil.copy(repo / ".test" / "params.yaml", repo / "params.yaml")
    s3.dvc(repo, "repro")
    s3.dvc(repo, "remote", "add", "--default", "s3", f"s3://{BUCKET}/datumdb")
    s3.dvc(repo, "remote", "modify", "s3", "endpointurl", s3.endpoint)
    commit_all(repo)  # the remote is part of the repository, as for a team

    assert s3.objects() == []
    s3.dvc(repo, "push")
    stored = s3.objects()
    assert stored and all(key.startswith("datumdb/files/md5/") for key in stored), stored[:5]

    fresh = clone(repo, tmp_path / "fresh")
    assert not (fresh / "data").exists()
    s3.dvc(fresh, "pull")  # the shard sets (the remote holds no assembled database)
    s3.dvc(fresh, "repro")  # assembles each split's database from them
    assert _digests(fresh) == _digests(repo)
    for split in SPLITS:
        name = Path("data", "lmdb", split, "data.mdb")
        assert (fresh / name).read_bytes() == (repo / name).read_bytes()
    assert "Data and pipelines are up to date" in s3.dvc(fresh, "status").stdout
    assert "in sync" in s3.dvc(fresh, "status", "--cloud").stdout
