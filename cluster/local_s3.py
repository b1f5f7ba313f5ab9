"""An S3 server on loopback (moto's standalone server) for `make demo-s3`, the loopback rig and
the tests: the same HTTP API as S3, in one local process, its data in memory.

    python -m cluster.local_s3 --bucket pgraft-demo -- pgraft demo --set run.uri=s3://pgraft-demo/runs/demo

starts the server, creates the bucket, runs the command with AWS_ENDPOINT_URL and test
credentials in its environment, and stops the server when the command ends (its exit code is
this one's).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

# Credentials moto accepts; nothing else ever sees them.
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
                    "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(extra_env: dict | None = None, timeout_s: float = 30.0) -> tuple[subprocess.Popen, str]:
    """A moto S3 server process on 127.0.0.1 and its endpoint URL, once it accepts connections."""
    port = free_port()
    env = dict(os.environ, **(extra_env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto server exited at start (is moto[server] installed?)") from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"moto server did not start within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local_s3", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create first (repeatable)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run against the server")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    proc, endpoint = start_moto()
    env = dict(os.environ, **TEST_CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
        for bucket in args.bucket:
            client.create_bucket(Bucket=bucket)
        print(f"local S3 (moto) at {endpoint}; buckets: {', '.join(args.bucket) or 'none'}", flush=True)
        return subprocess.run(command, env=env).returncode
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
