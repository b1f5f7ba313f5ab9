"""Shared by the benchmarks that run on moto S3: a bucket with a briefly pretrained digits task."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path


def publish_digits_task(endpoint: str, prefix: str, ddpm_steps: int, classifier_epochs: int) -> str:
    """Create a bucket on the S3 server at `endpoint`, pretrain the digits task (DDPM and
    classifier, no flow) briefly and publish it there; returns the bucket's name."""
    import boto3

    from pgraft.storage import open_storage
    from pgraft.tasks.digits import pretrain_digits

    bucket = f"{prefix}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    with tempfile.TemporaryDirectory(prefix="pgraft-task-") as tmp:
        pretrain_digits(Path(tmp) / "task", seed=0, ddpm_steps=ddpm_steps, flow_steps=0,
                        classifier_epochs=classifier_epochs, eval_samples_per_digit=0, progress=False)
        open_storage(f"s3://{bucket}/task").upload_folder(Path(tmp) / "task", "")
    return bucket
