"""The runbook (../shared/runbook-postgrescluster-backups.md) as a user would script it with boto3:
its calls one after another, then one Kubernetes Secret write. The reference that
`benches/provisioning.rs` times the service against (issue 12); it is run by the bench, once per
sample, through the same AWS latency proxy and against the same kube-apiserver.

The time it reports starts before the AWS clients are built and ends after the Secret is
written: interpreter start and imports are not in it, client construction is.

Arguments (all given by the bench):
  --endpoint URL      AWS endpoint (the realism proxy in front of moto)
  --region REGION     AWS region (us-east-1: CreateBucket without a location constraint)
  --name NAME         unique part of this run's names: bucket, policy, group, user and Secret
                      are all `holos-NAME-backups`, as the runbook names them
  --kube-url URL      kube-apiserver (or the bench's recording proxy in front of it)
  --kube-ca FILE      the CA certificate (PEM) the server's certificate is signed by
  --namespace NS      the Secret's namespace
The bearer token for Kubernetes comes from the environment variable KUBE_TOKEN, the AWS
credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.

Prints one JSON object: the seconds of the whole run and of the client construction in it.
"""

import argparse
import base64
import json
import os
import secrets
import ssl
import string
import time
import urllib.request

import boto3
from botocore.config import Config

KEY_DESCRIPTION = (
    "Used by pgbackrest associated with the PostgresCluster resource.  Refer to the "
    "PostgresCluster resource pgbackrest.cofiguration.secret.name for the stored location of "
    "the access key.  Synced from the Management Cluster using an ExternalSecret."
)
POLICY_DESCRIPTION = (
    "Read and write access to a specific bucket for pgrest operating within a pgo "
    "PostgresCluster."
)


def policy_document(bucket):
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetBucketLocation", "s3:ListAllMyBuckets"],
                "Resource": "arn:aws:s3:::*",
            },
            {
                "Effect": "Allow",
                "Action": "s3:*",
                "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
            },
        ],
    }


def create_bucket(s3, bucket):
    """The bucket with the runbook's settings. Versioning and Object Lock stay disabled, the
    default of a new bucket, so they need no call."""
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_ownership_controls(
        Bucket=bucket,
        OwnershipControls={"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]},
    )
    s3.put_public_access_block(
        Bucket=bucket,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": True,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": True,
        },
    )
    s3.put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [
                {
                    "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"},
                    "BucketKeyEnabled": True,
                }
            ]
        },
    )


def create_identity(iam, name):
    """Policy, group with the policy attached, user in the group, and its access key with the
    runbook's description (the console stores it as a user tag named after the key id)."""
    policy = iam.create_policy(
        PolicyName=name,
        Description=POLICY_DESCRIPTION,
        PolicyDocument=json.dumps(policy_document(name)),
    )
    iam.create_group(GroupName=name)
    iam.attach_group_policy(GroupName=name, PolicyArn=policy["Policy"]["Arn"])
    iam.create_user(UserName=name)
    iam.add_user_to_group(GroupName=name, UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    iam.tag_user(
        UserName=name, Tags=[{"Key": key["AccessKeyId"], "Value": KEY_DESCRIPTION}]
    )
    return key


def s3_conf(key):
    """The Secret's single key, `s3.conf`, as the runbook lays it out (repo2 = repo3)."""
    alphabet = string.ascii_letters + string.digits
    cipher_pass = "".join(secrets.choice(alphabet) for _ in range(64))
    lines = ["[global]"]
    for repo in ("repo2", "repo3"):
        lines += [
            f"{repo}-cipher-pass={cipher_pass}",
            f"{repo}-s3-key={key['AccessKeyId']}",
            f"{repo}-s3-key-secret={key['SecretAccessKey']}",
        ]
    return "\n".join(lines) + "\n"


def write_secret(args, name, conf):
    """One POST, what `holos create secret` (kubectl create) does."""
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": args.namespace},
        "data": {"s3.conf": base64.b64encode(conf.encode()).decode()},
    }
    request = urllib.request.Request(
        f"{args.kube_url}/api/v1/namespaces/{args.namespace}/secrets",
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Authorization": f"Bearer {os.environ['KUBE_TOKEN']}",
            "Content-Type": "application/json",
        },
    )
    context = ssl.create_default_context(cafile=args.kube_ca)
    with urllib.request.urlopen(request, context=context) as response:
        if response.status != 201:
            raise SystemExit(f"Secret not created: HTTP {response.status}")


def main():
    parser = argparse.ArgumentParser()
    for flag in ("--endpoint", "--region", "--name", "--kube-url", "--kube-ca", "--namespace"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    name = f"holos-{args.name}-backups"
    # No retries: a failed call is a failed run, as for anyone running it by hand.
    config = Config(retries={"max_attempts": 1, "mode": "standard"})
    # Path-style, as every client of a local endpoint (and the service's) addresses buckets.
    s3_config = config.merge(Config(s3={"addressing_style": "path"}))

    started = time.perf_counter()
    s3 = boto3.client(
        "s3", endpoint_url=args.endpoint, region_name=args.region, config=s3_config
    )
    iam = boto3.client("iam", endpoint_url=args.endpoint, region_name=args.region, config=config)
    built = time.perf_counter()
    create_bucket(s3, name)
    key = create_identity(iam, name)
    write_secret(args, name, s3_conf(key))
    finished = time.perf_counter()

    print(
        json.dumps(
            {
                "seconds": finished - started,
                "client_construction_seconds": built - started,
            }
        )
    )


if __name__ == "__main__":
    main()
