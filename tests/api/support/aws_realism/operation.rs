//! Which AWS operation a request is, and the names it refers to: IAM is a form POST (or query)
//! with `Action=CreateUser&UserName=...`; S3 is REST (method, path-style `/bucket/key`, query
//! subresources). The signer's access key id comes from the SigV4 `Authorization` header (or a
//! presigned URL's `X-Amz-Credential`).

use hyper::{HeaderMap, Method, Uri};

/// One identified request.
#[derive(Debug, Clone)]
pub struct Operation {
    /// `iam`, `s3`, or the service named in the signature's credential scope.
    pub service: String,
    /// The operation, e.g. `CreateUser`, `PutObject`.
    pub name: String,
    /// Form and query parameters (IAM), query parameters (S3).
    pub params: Vec<(String, String)>,
    /// The bucket of an S3 request (path-style).
    pub bucket: Option<String>,
    /// The object key of an S3 object request (path-style, as sent).
    pub object: Option<String>,
    /// The access key id that signed the request.
    pub access_key_id: Option<String>,
    pub method: Method,
}

/// IAM operations that create the entity named by their own parameter (exempt from "that
/// entity is not visible yet").
const CREATING_PARAM: &[(&str, &str)] = &[("CreateUser", "UserName"), ("CreateGroup", "GroupName")];

impl Operation {
    /// `service:Name`, the key of every count (same as `CallCounter`).
    pub fn key(&self) -> String {
        format!("{}:{}", self.service, self.name)
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_iam(&self) -> bool {
        self.service == "iam"
    }

    pub fn is_s3(&self) -> bool {
        self.service == "s3"
    }

    /// A call whose success may be lost on the way back: IAM Create*, S3 CreateBucket.
    pub fn is_create(&self) -> bool {
        (self.is_iam() && self.name.starts_with("Create"))
            || (self.is_s3() && self.name == "CreateBucket")
    }

    /// A read (Get/List/Head/Describe) of IAM, whose answer may show entities not visible yet.
    pub fn is_iam_read(&self) -> bool {
        self.is_iam()
            && ["Get", "List"]
                .iter()
                .any(|prefix| self.name.starts_with(prefix))
    }

    /// The name the random draws of this request are keyed by: the entity it is about.
    pub fn subject(&self) -> String {
        const NAMES: [&str; 5] = [
            "UserName",
            "GroupName",
            "PolicyName",
            "PolicyArn",
            "AccessKeyId",
        ];
        if self.is_iam() {
            NAMES
                .iter()
                .find_map(|n| self.param(n))
                .unwrap_or_default()
                .to_owned()
        } else {
            self.bucket.clone().unwrap_or_default()
        }
    }

    /// The entities this IAM request refers to (without the one it creates), as visibility keys
    /// (see [`entity_key`]), with the parameter that names them.
    pub fn referenced_entities(&self) -> Vec<(String, &str, &str)> {
        if !self.is_iam() {
            return Vec::new();
        }
        const REFERENCES: [(&str, &str); 4] = [
            ("UserName", "user"),
            ("GroupName", "group"),
            ("PolicyArn", "arn"),
            ("AccessKeyId", "key"),
        ];
        REFERENCES
            .iter()
            .filter(|(param, _)| !CREATING_PARAM.contains(&(self.name.as_str(), param)))
            .filter_map(|(param, kind)| {
                self.param(param)
                    .map(|value| (entity_key(kind, value), *param, value))
            })
            .collect()
    }
}

/// The key under which an entity's creation time is kept: `user:NAME`, `group:NAME`,
/// `policy:NAME`, `arn:ARN`, `key:AKID`.
pub fn entity_key(kind: &str, value: &str) -> String {
    format!("{kind}:{value}")
}

/// Identifies a request from its head and (whole) body.
pub fn identify(method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Operation {
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let (access_key_id, scope_service) = signer(headers, &query);
    let is_form = headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let mut params = query;
    if is_form {
        params.extend(url::form_urlencoded::parse(body).into_owned());
    }
    let action = params
        .iter()
        .find(|(k, _)| k == "Action")
        .map(|(_, v)| v.clone());
    let service = match (scope_service, &action) {
        (Some(service), _) => service,
        (None, Some(_)) => "iam".to_owned(),
        (None, None) => "s3".to_owned(),
    };
    let (name, bucket) = match (&action, service.as_str()) {
        (_, "s3") => {
            let (name, bucket) = s3_operation(method, uri.path(), &params, headers);
            (name, bucket)
        }
        (Some(action), _) => (action.clone(), None),
        (None, _) => (format!("Unknown{}", method.as_str()), None),
    };
    let object = (service == "s3").then(|| object_key(uri.path())).flatten();
    Operation {
        service,
        name,
        params,
        bucket,
        object,
        access_key_id,
        method: method.clone(),
    }
}

/// The object key of a path-style S3 request (`/bucket/key`), if it names one.
fn object_key(path: &str) -> Option<String> {
    let (_, object) = path.trim_start_matches('/').split_once('/')?;
    (!object.is_empty()).then(|| object.to_owned())
}

/// The signer's access key id and the service of the credential scope
/// (`Credential=AKID/20260101/us-east-1/iam/aws4_request`).
fn signer(headers: &HeaderMap, query: &[(String, String)]) -> (Option<String>, Option<String>) {
    let credential = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|auth| auth.split("Credential=").nth(1))
        .map(|rest| rest.split([',', ' ']).next().unwrap_or_default().to_owned())
        .or_else(|| {
            query
                .iter()
                .find(|(k, _)| k == "X-Amz-Credential")
                .map(|(_, v)| v.clone())
        });
    let Some(credential) = credential else {
        return (None, None);
    };
    let parts: Vec<&str> = credential.split('/').collect();
    let key = parts.first().map(|s| (*s).to_owned());
    let service = parts.get(3).map(|s| (*s).to_owned());
    (key, service)
}

/// Bucket and object subresources: query key, operation noun (bucket level, object level).
const SUBRESOURCES: &[(&str, &str, &str)] = &[
    ("encryption", "BucketEncryption", ""),
    ("tagging", "BucketTagging", "ObjectTagging"),
    ("ownershipControls", "BucketOwnershipControls", ""),
    ("publicAccessBlock", "PublicAccessBlock", ""),
    ("versioning", "BucketVersioning", ""),
    ("object-lock", "ObjectLockConfiguration", ""),
    ("policy", "BucketPolicy", ""),
    ("acl", "BucketAcl", "ObjectAcl"),
    ("lifecycle", "BucketLifecycleConfiguration", ""),
    ("cors", "BucketCors", ""),
    ("logging", "BucketLogging", ""),
    ("website", "BucketWebsite", ""),
    ("notification", "BucketNotificationConfiguration", ""),
    ("replication", "BucketReplication", ""),
    ("retention", "", "ObjectRetention"),
    ("legal-hold", "", "ObjectLegalHold"),
];

/// The S3 operation of a path-style request, and its bucket.
fn s3_operation(
    method: &Method,
    path: &str,
    query: &[(String, String)],
    headers: &HeaderMap,
) -> (String, Option<String>) {
    let has = |key: &str| query.iter().any(|(k, _)| k == key);
    let path = path.trim_start_matches('/');
    let (bucket, object) = match path.split_once('/') {
        Some((bucket, object)) => (bucket, object),
        None => (path, ""),
    };
    let bucket_name = (!bucket.is_empty()).then(|| bucket.to_owned());
    if let Some((_, id)) = query.iter().find(|(k, _)| k == "x-id") {
        return (id.clone(), bucket_name);
    }
    if bucket.is_empty() {
        let name = if method == Method::GET {
            "ListBuckets"
        } else {
            "UnknownService"
        };
        return (name.to_owned(), None);
    }
    let verb = match *method {
        Method::GET => "Get",
        Method::PUT => "Put",
        Method::DELETE => "Delete",
        Method::HEAD => "Head",
        Method::POST => "Post",
        _ => "Unknown",
    };
    let on_object = !object.is_empty();
    for (key, bucket_noun, object_noun) in SUBRESOURCES {
        if has(key) {
            let noun = if on_object { object_noun } else { bucket_noun };
            return (format!("{verb}{noun}"), bucket_name);
        }
    }
    let name = match (method.as_str(), on_object) {
        ("GET", false) if has("location") => "GetBucketLocation",
        ("GET", false) if has("uploads") => "ListMultipartUploads",
        ("GET", false) if has("versions") => "ListObjectVersions",
        ("GET", false) if query.iter().any(|(k, v)| k == "list-type" && v == "2") => {
            "ListObjectsV2"
        }
        ("GET", false) => "ListObjects",
        ("PUT", false) => "CreateBucket",
        ("HEAD", false) => "HeadBucket",
        ("DELETE", false) => "DeleteBucket",
        ("POST", false) if has("delete") => "DeleteObjects",
        ("PUT", true) if headers.contains_key("x-amz-copy-source") => "CopyObject",
        ("PUT", true) => "PutObject",
        ("GET", true) => "GetObject",
        ("HEAD", true) => "HeadObject",
        ("DELETE", true) => "DeleteObject",
        ("POST", true) if has("uploads") => "CreateMultipartUpload",
        ("POST", true) if has("uploadId") => "CompleteMultipartUpload",
        _ => return (format!("{verb}Unknown"), bucket_name),
    };
    (name.to_owned(), bucket_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(method: Method, uri: &str) -> Operation {
        let mut headers = HeaderMap::new();
        headers.insert(
            hyper::header::AUTHORIZATION,
            "AWS4-HMAC-SHA256 Credential=AKIAX/20260101/us-east-1/s3/aws4_request, \
             SignedHeaders=host, Signature=00"
                .parse()
                .unwrap(),
        );
        identify(&method, &uri.parse().unwrap(), &headers, b"")
    }

    #[test]
    fn s3_operations_from_method_path_and_query() {
        let cases = [
            (Method::GET, "/", "ListBuckets"),
            (Method::PUT, "/b", "CreateBucket"),
            (Method::HEAD, "/b", "HeadBucket"),
            (Method::PUT, "/b?encryption", "PutBucketEncryption"),
            (Method::GET, "/b?tagging", "GetBucketTagging"),
            (Method::GET, "/b?location", "GetBucketLocation"),
            (Method::GET, "/b?list-type=2&max-keys=1", "ListObjectsV2"),
            (Method::PUT, "/b/k/x?x-id=PutObject", "PutObject"),
            (Method::GET, "/b/k", "GetObject"),
            (Method::GET, "/b?object-lock", "GetObjectLockConfiguration"),
        ];
        for (method, uri, name) in cases {
            let op = s3(method, uri);
            assert_eq!(op.key(), format!("s3:{name}"), "{uri}");
            assert_eq!(op.access_key_id.as_deref(), Some("AKIAX"));
        }
        assert_eq!(s3(Method::PUT, "/b/k").bucket.as_deref(), Some("b"));
        let object = |uri: &str| s3(Method::PUT, uri).object;
        assert_eq!(object("/b/k/x?x-id=PutObject").as_deref(), Some("k/x"));
        assert_eq!(object("/b?encryption"), None);
        assert_eq!(object("/b/"), None);
    }

    #[test]
    fn iam_operations_from_the_form_body() {
        let mut headers = HeaderMap::new();
        headers.insert(
            hyper::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        let body = b"Action=AddUserToGroup&Version=2010-05-08&GroupName=g&UserName=u";
        let op = identify(&Method::POST, &"/".parse().unwrap(), &headers, body);
        assert_eq!(op.key(), "iam:AddUserToGroup");
        assert_eq!(op.subject(), "u");
        let refs: Vec<String> = op.referenced_entities().into_iter().map(|r| r.0).collect();
        assert_eq!(refs, ["user:u", "group:g"]);
        let body = b"Action=CreateUser&UserName=u";
        let op = identify(&Method::POST, &"/".parse().unwrap(), &headers, body);
        assert!(op.referenced_entities().is_empty());
        assert!(op.is_create());
    }
}
