//! The answers the proxy makes up (IAM and S3 error documents as AWS writes them) and the
//! edits it makes to moto's answers (members of a list that are not visible yet).

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

use super::operation::Operation;

pub type Body = Full<Bytes>;

/// A made-up AWS error: the same document shape as the real service's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canned {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl Canned {
    pub fn new(status: u16, code: &str, message: &str) -> Canned {
        Canned {
            status,
            code: code.to_owned(),
            message: message.to_owned(),
        }
    }

    /// S3's answer to CreateBucket for a name another account owns.
    pub fn bucket_already_exists() -> Canned {
        Canned::new(
            409,
            "BucketAlreadyExists",
            "The requested bucket name is not available. The bucket namespace is shared by all \
             users of the system. Please select a different name and try again.",
        )
    }

    /// IAM's and S3's answer to a caller without permission.
    pub fn access_denied() -> Canned {
        Canned::new(
            403,
            "AccessDenied",
            "User is not authorized to perform this action",
        )
    }

    /// The response to `op` in the service's error format.
    pub fn respond(&self, op: &Operation) -> Response<Body> {
        if op.is_s3() {
            s3_error(op, self.status, &self.code, &self.message)
        } else {
            iam_error(self.status, &self.code, &self.message)
        }
    }
}

fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// IAM (awsQuery) error: `<ErrorResponse><Error><Type/><Code/><Message/></Error><RequestId/>`.
pub fn iam_error(status: u16, code: &str, message: &str) -> Response<Body> {
    let id = request_id();
    let kind = if status >= 500 { "Receiver" } else { "Sender" };
    let body = format!(
        "<ErrorResponse xmlns=\"https://iam.amazonaws.com/doc/2010-05-08/\"><Error><Type>{kind}\
         </Type><Code>{code}</Code><Message>{}</Message></Error><RequestId>{id}</RequestId>\
         </ErrorResponse>",
        xml_escape(message)
    );
    Response::builder()
        .status(StatusCode::from_u16(status).expect("status"))
        .header("content-type", "text/xml")
        .header("x-amzn-requestid", id)
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

/// S3 (restXml) error: `<Error><Code/><Message/><RequestId/><HostId/></Error>`; no body for HEAD
/// (S3 sends none: the SDK then judges by the status).
pub fn s3_error(op: &Operation, status: u16, code: &str, message: &str) -> Response<Body> {
    let id = request_id();
    let extra = match (code, &op.access_key_id, &op.bucket) {
        ("InvalidAccessKeyId", Some(key), _) => format!("<AWSAccessKeyId>{key}</AWSAccessKeyId>"),
        (_, _, Some(bucket)) => format!("<BucketName>{bucket}</BucketName>"),
        _ => String::new(),
    };
    let body = if op.method == hyper::Method::HEAD {
        String::new()
    } else {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{}\
             </Message>{extra}<RequestId>{id}</RequestId><HostId>realism-proxy</HostId></Error>",
            xml_escape(message)
        )
    };
    Response::builder()
        .status(StatusCode::from_u16(status).expect("status"))
        .header("content-type", "application/xml")
        .header("x-amz-request-id", id)
        .header("x-amz-id-2", "realism-proxy")
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

/// IAM's `NoSuchEntity` for a parameter naming an entity that is not visible yet.
pub fn no_such_entity(param: &str, value: &str) -> Response<Body> {
    let message = match param {
        "UserName" => format!("The user with name {value} cannot be found."),
        "GroupName" => format!("The group with name {value} cannot be found."),
        "PolicyArn" => format!("Policy {value} does not exist or is not attachable."),
        "AccessKeyId" => format!("The Access Key with id {value} cannot be found."),
        _ => format!("{value} cannot be found."),
    };
    iam_error(404, "NoSuchEntity", &message)
}

/// The first `<tag>value</tag>` in an XML text.
pub fn tag_value<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    tag_values(xml, tag).next()
}

/// Every `<tag>value</tag>` in an XML text.
pub fn tag_values<'a>(xml: &'a str, tag: &str) -> impl Iterator<Item = &'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut rest = xml;
    std::iter::from_fn(move || {
        let start = rest.find(&open)? + open.len();
        let len = rest[start..].find(&close)?;
        let value = &rest[start..start + len];
        rest = &rest[start + len + close.len()..];
        Some(value.trim())
    })
}

/// Fields of a list member that name an entity, with the kind of visibility key they make.
const MEMBER_FIELDS: [(&str, &str); 6] = [
    ("UserName", "user"),
    ("GroupName", "group"),
    ("PolicyName", "policy"),
    ("Arn", "arn"),
    ("PolicyArn", "arn"),
    ("AccessKeyId", "key"),
];

/// Removes every outermost `<member>…</member>` of an IAM answer that names an entity for which
/// `hidden(visibility key)` is true. Returns the new text and how many members went.
pub fn strip_hidden_members(xml: &str, hidden: impl Fn(&str) -> bool) -> (String, usize) {
    const OPEN: &str = "<member>";
    const CLOSE: &str = "</member>";
    let mut out = String::with_capacity(xml.len());
    let mut removed = 0;
    let mut rest = xml;
    while let Some(start) = rest.find(OPEN) {
        out.push_str(&rest[..start]);
        // Find the matching close, counting nested members.
        let mut depth = 0usize;
        let mut at = start;
        let end = loop {
            let next_open = rest[at..].find(OPEN).map(|i| at + i);
            let next_close = rest[at..].find(CLOSE).map(|i| at + i);
            match (next_open, next_close) {
                (Some(o), Some(c)) if o < c => {
                    depth += 1;
                    at = o + OPEN.len();
                }
                (_, Some(c)) => {
                    depth -= 1;
                    at = c + CLOSE.len();
                    if depth == 0 {
                        break Some(at);
                    }
                }
                _ => break None,
            }
        };
        let Some(end) = end else {
            // Unbalanced: leave the rest as it is.
            out.push_str(&rest[start..]);
            return (out, removed);
        };
        let member = &rest[start..end];
        let names_hidden = MEMBER_FIELDS.iter().any(|(tag, kind)| {
            tag_values(member, tag).any(|value| hidden(&super::operation::entity_key(kind, value)))
        });
        if names_hidden {
            removed += 1;
        } else {
            out.push_str(member);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    (out, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_members_naming_hidden_entities() {
        let xml = "<R><Policies><member><PolicyName>a</PolicyName><Arn>arn:a</Arn>\
                   <Tags><member><Key>k</Key></member></Tags></member>\
                   <member><PolicyName>b</PolicyName><Arn>arn:b</Arn></member></Policies></R>";
        let (out, removed) = strip_hidden_members(xml, |key| key == "arn:arn:b");
        assert_eq!(removed, 1);
        assert!(out.contains("<PolicyName>a</PolicyName>"));
        assert!(out.contains("<Key>k</Key>"));
        assert!(!out.contains("arn:b"));
        assert!(out.ends_with("</Policies></R>"));
        let (same, removed) = strip_hidden_members(xml, |_| false);
        assert_eq!((same.as_str(), removed), (xml, 0));
    }

    #[test]
    fn tag_values_in_order() {
        let xml = "<A><Arn>x</Arn><B><Arn> y </Arn></B></A>";
        assert_eq!(tag_values(xml, "Arn").collect::<Vec<_>>(), ["x", "y"]);
        assert_eq!(tag_value(xml, "Missing"), None);
    }
}
