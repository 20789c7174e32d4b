"""Prints what S3 reports for each bucket: the runbook's settings, read back through the API."""
import sys

import boto3
from botocore.exceptions import ClientError


def setting(call, pick, missing="not set"):
    try:
        return pick(call())
    except ClientError as e:
        return f"{missing} ({e.response['Error']['Code']})"


def main(buckets):
    s3 = boto3.client("s3")
    for b in buckets:
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


if __name__ == "__main__":
    main(sys.argv[1:])
