//! Error classification: retryable or permanent, with a remedy and the request id.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ConnectorError, ErrorMetadata, SdkError};
use backup_provisioner::cloud::aws;

use super::{EU, Env, response, unique};

fn iam_error(
    code: &str,
    status: u16,
) -> SdkError<aws_sdk_iam::operation::create_user::CreateUserError, HttpResponse> {
    SdkError::service_error(
        aws_sdk_iam::operation::create_user::CreateUserError::generic(
            ErrorMetadata::builder()
                .code(code)
                .message("upstream says no")
                .custom("aws_request_id", "req-42")
                .build(),
        ),
        response(status),
    )
}

#[test]
fn classify_throttling_and_server_errors_as_retryable() {
    for code in [
        "Throttling",
        "ThrottlingException",
        "SlowDown",
        "RequestLimitExceeded",
        "TooManyRequests",
    ] {
        let err = aws::classify("iam", "CreateUser", iam_error(code, 400));
        assert!(err.is_retryable(), "{code}: {err:?}");
        assert_eq!(err.request_id(), Some("req-42"));
    }
    for status in [500, 502, 503] {
        let err = aws::classify("iam", "CreateUser", iam_error("SomethingOdd", status));
        assert!(err.is_retryable(), "{status}");
    }
    let timeout: SdkError<aws_sdk_iam::operation::create_user::CreateUserError, HttpResponse> =
        SdkError::timeout_error("operation timed out");
    assert!(aws::classify("iam", "CreateUser", timeout).is_retryable());
    let refused: SdkError<aws_sdk_iam::operation::create_user::CreateUserError, HttpResponse> =
        SdkError::dispatch_failure(ConnectorError::io("connection refused".into()));
    assert!(aws::classify("iam", "CreateUser", refused).is_retryable());
}

#[test]
fn classify_client_errors_as_permanent_with_remedy() {
    let cases = [
        ("AccessDenied", 403, "grant the provisioner"),
        ("InvalidBucketName", 400, "lowercase letters"),
        ("BucketAlreadyExists", 409, "choose another bucket name"),
        ("ValidationError", 400, "check the names"),
        (
            "LimitExceeded",
            409,
            "delete unused keys or policy versions",
        ),
        ("MalformedPolicyDocument", 400, "fix the policy template"),
        ("InvalidAccessKeyId", 403, "credentials"),
    ];
    for (code, status, remedy) in cases {
        let err = aws::classify("iam", "CreateUser", iam_error(code, status));
        assert!(!err.is_retryable(), "{code}");
        assert_eq!(err.request_id(), Some("req-42"), "{code}");
        let text = err.to_string();
        assert!(text.starts_with("iam CreateUser: "), "{text}");
        assert!(
            text.contains(remedy) && text.contains(code),
            "{code}: {text}"
        );
    }
}

#[tokio::test]
async fn classify_real_moto_responses() {
    let env = Env::new(EU).await;
    // NoSuchEntity from moto keeps its request id and is retryable (IAM eventual consistency).
    let missing = env
        .iam()
        .get_group()
        .group_name(unique("missing"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(aws::error_code(&missing), Some("NoSuchEntity"));
    let err = aws::classify("iam", "GetGroup", missing);
    assert!(err.is_retryable(), "{err:?}");

    // Nothing listens on port 9: a connection failure is retryable.
    let dead = aws::clients_with_credentials(
        &aws::AwsSettings {
            endpoint_url: Some("http://127.0.0.1:9".to_owned()),
            region: Some(EU.to_owned()),
        },
        None,
        aws_sdk_s3::config::Credentials::new("test", "test", None, None, "test"),
    )
    .await;
    let err = dead.s3.list_buckets().send().await.unwrap_err();
    let err = aws::classify("s3", "ListBuckets", err);
    assert!(err.is_retryable(), "{err:?}");
}
