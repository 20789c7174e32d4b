"""moto_server with AWS's own action names and resources in its IAM authorization.

moto (5.2.5) enforces identity policies when started with INITIAL_NO_AUTH_ACTION_COUNT, but
it checks every IAM request against the resource "*" (so a policy scoped to
`arn:aws:iam::*:user/holos-*-backups` denies everything) and names many S3 requests after the
wrong IAM action (GetBucketEncryption is checked as s3:ListBucket, PutBucketEncryption as
s3:CreateBucket, HeadBucket as s3:HeadBucket, DeleteObjects against the bucket instead of each
object). To prove a least-privilege policy, this launcher patches those two points to follow
the Service Authorization Reference (S3 and IAM), then runs moto_server unchanged:

- S3: each request is checked as the action AWS evaluates for it, against the bucket ARN or
  the object ARN; DeleteObjects is checked once per object as the S3 API reference says
  (s3:DeleteObject always, and s3:DeleteObjectVersion for an entry with a VersionId).
- IAM: each request is checked against the ARN of the user, group or policy it names
  (ListPolicies and other list-everything calls against "*").

Everything else (signature checks, policy collection, Allow/Deny evaluation) is moto's.
Used by tests/api/iam_policy.rs through `Moto::with_aws_authorization` (tests/api/support/moto.rs).
"""

import sys
from urllib.parse import parse_qs, urlparse

import xmltodict
from moto import settings
from moto.core.authorization import ActionAuthenticatorMixin
from moto.iam.access_control import S3IAMRequest
from moto.iam.responses import IamResponse
from moto.server import main

# (method, sub-resource in the query string) -> IAM action, for bucket requests. The first
# sub-resource found in the query string wins; "" is a request without one.
BUCKET_ACTIONS = {
    "HEAD": {"": "s3:ListBucket"},
    "GET": {
        "location": "s3:GetBucketLocation",
        "versioning": "s3:GetBucketVersioning",
        "tagging": "s3:GetBucketTagging",
        "publicAccessBlock": "s3:GetBucketPublicAccessBlock",
        "encryption": "s3:GetEncryptionConfiguration",
        "ownershipControls": "s3:GetBucketOwnershipControls",
        "object-lock": "s3:GetBucketObjectLockConfiguration",
        "versions": "s3:ListBucketVersions",
        "policy": "s3:GetBucketPolicy",
        "acl": "s3:GetBucketAcl",
        "lifecycle": "s3:GetLifecycleConfiguration",
        "uploads": "s3:ListBucketMultipartUploads",
        "": "s3:ListBucket",
    },
    "PUT": {
        "versioning": "s3:PutBucketVersioning",
        "tagging": "s3:PutBucketTagging",
        "publicAccessBlock": "s3:PutBucketPublicAccessBlock",
        "encryption": "s3:PutEncryptionConfiguration",
        "ownershipControls": "s3:PutBucketOwnershipControls",
        "object-lock": "s3:PutBucketObjectLockConfiguration",
        "policy": "s3:PutBucketPolicy",
        "acl": "s3:PutBucketAcl",
        "lifecycle": "s3:PutLifecycleConfiguration",
        "": "s3:CreateBucket",
    },
    "DELETE": {
        "tagging": "s3:PutBucketTagging",
        "publicAccessBlock": "s3:PutBucketPublicAccessBlock",
        "encryption": "s3:PutEncryptionConfiguration",
        "ownershipControls": "s3:PutBucketOwnershipControls",
        "policy": "s3:DeleteBucketPolicy",
        "lifecycle": "s3:PutLifecycleConfiguration",
        "": "s3:DeleteBucket",
    },
}

# Object requests: (method, "versionId" in the query string) -> IAM action.
KEY_ACTIONS = {
    ("GET", False): "s3:GetObject",
    ("GET", True): "s3:GetObjectVersion",
    ("HEAD", False): "s3:GetObject",
    ("HEAD", True): "s3:GetObjectVersion",
    ("PUT", False): "s3:PutObject",
    ("POST", False): "s3:PutObject",
    ("DELETE", False): "s3:DeleteObject",
    ("DELETE", True): "s3:DeleteObjectVersion",
}


def query_of(response):
    return parse_qs(urlparse(response.uri).query, keep_blank_values=True)


# Query parameters of the plain bucket requests (ListObjects(V2), ListObjectVersions' markers,
# the SDK's x-id): any other parameter is a sub-resource this table does not know.
LIST_PARAMETERS = {
    "list-type", "prefix", "delimiter", "max-keys", "continuation-token", "start-after",
    "encoding-type", "fetch-owner", "marker", "key-marker", "version-id-marker", "x-id",
}


def bucket_action(method, query):
    """The action AWS evaluates; an unknown sub-resource maps to an action no policy grants, so
    a call the service starts making is denied here until this table (and the policy) know it."""
    table = BUCKET_ACTIONS.get(method, {})
    for sub_resource, action in table.items():
        if sub_resource and sub_resource in query:
            return action
    if set(query) - LIST_PARAMETERS:
        return f"s3:Unknown{method}"
    return table.get("", f"s3:Unknown{method}")


def delete_objects_checks(response, bucket):
    """DeleteObjects: s3:DeleteObject for every entry ("you must always have the
    s3:DeleteObject permission"), and s3:DeleteObjectVersion for an entry naming a version."""
    body = xmltodict.parse(response.body or b"<Delete/>", strip_whitespace=False)
    objects = (body.get("Delete") or {}).get("Object") or []
    if not isinstance(objects, list):
        objects = [objects]
    checks = []
    for obj in objects:
        resource = f"arn:aws:s3:::{bucket}/{obj.get('Key', '')}"
        checks.append(("s3:DeleteObject", resource))
        if obj.get("VersionId"):
            checks.append(("s3:DeleteObjectVersion", resource))
    return checks


def s3_checks(response, bucket, key):
    """(action, resource) pairs AWS evaluates for the request in flight."""
    method = response.method
    query = query_of(response)
    if not bucket:
        return [("s3:ListAllMyBuckets", "*")]
    if key:
        action = KEY_ACTIONS.get((method, "versionId" in query), f"s3:Unknown{method}")
        return [(action, f"arn:aws:s3:::{bucket}/{key}")]
    if method == "POST" and "delete" in query:
        return delete_objects_checks(response, bucket)
    return [(bucket_action(method, query), f"arn:aws:s3:::{bucket}")]


def authorize_s3(self, bucket_name=None, key_name=None):
    # Below the unauthenticated allowance, moto's own path counts the request.
    if ActionAuthenticatorMixin.request_count < settings.INITIAL_NO_AUTH_ACTION_COUNT:
        ActionAuthenticatorMixin.request_count += 1
        return
    original = self._get_action
    try:
        for action, resource in s3_checks(self, bucket_name, key_name):
            name = action.split(":", 1)[1]
            self._get_action = lambda name=name: name
            self._authenticate_and_authorize_action(S3IAMRequest, resource)
    finally:
        self._get_action = original


USER_ACTIONS = {
    "CreateUser", "GetUser", "DeleteUser", "TagUser", "UntagUser", "ListUserTags",
    "CreateAccessKey", "DeleteAccessKey", "UpdateAccessKey", "ListAccessKeys",
    "GetLoginProfile", "DeleteLoginProfile", "CreateLoginProfile", "ListGroupsForUser",
    "ListUserPolicies", "PutUserPolicy", "DeleteUserPolicy", "ListAttachedUserPolicies",
    "AttachUserPolicy", "DetachUserPolicy",
}
GROUP_ACTIONS = {
    "CreateGroup", "GetGroup", "DeleteGroup", "AddUserToGroup", "RemoveUserFromGroup",
    "AttachGroupPolicy", "DetachGroupPolicy", "ListAttachedGroupPolicies",
    "ListGroupPolicies", "PutGroupPolicy", "DeleteGroupPolicy",
}
POLICY_ACTIONS = {
    "GetPolicy", "DeletePolicy", "GetPolicyVersion", "CreatePolicyVersion",
    "DeletePolicyVersion", "ListPolicyVersions", "SetDefaultPolicyVersion",
}


def iam_resource(self):
    """The ARN AWS authorizes an IAM request against (Service Authorization Reference)."""
    action = self._get_action()
    account = self.current_account
    param = self._get_param
    if action in USER_ACTIONS and param("UserName"):
        path = param("Path") or "/" if action == "CreateUser" else entity_path(
            self.backend.users, param("UserName"))
        return f"arn:aws:iam::{account}:user{path}{param('UserName')}"
    if action == "GetAccessKeyLastUsed":
        return key_owner_arn(self, param("AccessKeyId"))
    if action in GROUP_ACTIONS and param("GroupName"):
        path = param("Path") or "/" if action == "CreateGroup" else entity_path(
            self.backend.groups, param("GroupName"))
        return f"arn:aws:iam::{account}:group{path}{param('GroupName')}"
    if action == "CreatePolicy":
        return f"arn:aws:iam::{account}:policy{param('Path') or '/'}{param('PolicyName')}"
    if action in POLICY_ACTIONS and param("PolicyArn"):
        return param("PolicyArn")
    return ORIGINAL_IAM_RESOURCE(self)


def entity_path(entities, name):
    """The IAM path of an existing user or group (its ARN has it); "/" for one not made yet."""
    entity = entities.get(name)
    return getattr(entity, "path", None) or "/"


def key_owner_arn(self, access_key_id):
    for user in self.backend.list_users("/", None, None):
        if any(k.access_key_id == access_key_id for k in user.access_keys):
            return user.arn
    return "*"


ORIGINAL_IAM_RESOURCE = IamResponse._determine_resource
IamResponse._determine_resource = iam_resource
ActionAuthenticatorMixin._authenticate_and_authorize_s3_action = authorize_s3

if __name__ == "__main__":
    sys.argv[0] = "moto_server"
    sys.exit(main())
