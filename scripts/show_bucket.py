"""Prints what S3 reports for each bucket: the runbook's settings, read back through the API.

Exits 1 when a bucket is missing or cannot be read, so `make demo` fails instead of reporting
settings of a bucket that is not there.
"""
import sys

import boto3
from botocore.exceptions import ClientError


def setting(call, pick, missing="not set"):
    try:
        return pick(call())
    except ClientError as e:
        return f"{missing} ({e.response['Error']['Code']})"


def problem(s3, bucket):
    """None when the bucket exists and is ours to read; else what is wrong."""
    try:
        s3.head_bucket(Bucket=bucket)
        return None
    except ClientError as e:
        code = e.response["Error"]["Code"]
        missing = code in ("404", "NoSuchBucket", "NotFound")
        return f"{'MISSING' if missing else 'UNREADABLE'} ({code})"


def main(buckets):
    s3 = boto3.client("s3")
    failed = 0
    for b in buckets:
        wrong = problem(s3, b)
        if wrong:
            print(f"{b}: {wrong}")
            failed = 1
            continue
        print(f"{b}:")
        rows = {
            "region": setting(lambda: s3.get_bucket_location(Bucket=b),
                              lambda r: r.get("LocationConstraint") or "us-east-1"),
            "object ownership": setting(lambda: s3.get_bucket_ownership_controls(Bucket=b),
                                        lambda r: r["OwnershipControls"]["Rules"][0]["ObjectOwnership"]),
            "block public access": setting(lambda: s3.get_public_access_block(Bucket=b),
                                           lambda r: r["PublicAccessBlockConfiguration"]),
            "default encryption": setting(
                lambda: s3.get_bucket_encryption(Bucket=b),
                lambda r: [(x["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"],
                            f"BucketKeyEnabled={x.get('BucketKeyEnabled')}")
                           for x in r["ServerSideEncryptionConfiguration"]["Rules"]]),
            "versioning": setting(lambda: s3.get_bucket_versioning(Bucket=b),
                                  lambda r: r.get("Status", "Disabled (never enabled)")),
            "object lock": setting(lambda: s3.get_object_lock_configuration(Bucket=b),
                                   lambda r: r["ObjectLockConfiguration"].get("ObjectLockEnabled"),
                                   missing="Disabled"),
            "tags": setting(lambda: s3.get_bucket_tagging(Bucket=b),
                            lambda r: {t["Key"]: t["Value"] for t in r["TagSet"]}),
        }
        for k, v in rows.items():
            print(f"  {k:20} {v}")
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
