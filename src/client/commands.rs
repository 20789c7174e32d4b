//! One function per operation: the request it makes and how its answer is printed.

use reqwest::Method;
use serde_json::{Map, Value, json};

use super::api::{Answer, Api, ClientError};
use super::args::{
    AuditArgs, ClientArgs, CreateArgs, DeleteArgs, JobListArgs, JobsOperation, ListArgs, NamedArgs,
    Operation, Output, PageArgs, VerifyArgs, WaitArgs,
};
use super::table::print;
use super::{views, wait};

const REPOSITORIES: &str = "/v1/backup-repositories";

pub async fn run(api: &Api, args: &ClientArgs) -> Result<(), ClientError> {
    let out = args.output;
    match &args.operation {
        Operation::Create(create) => self::create(api, out, create).await,
        Operation::Get { name } => {
            let answer = api.get(&repository_path(name, ""), &[]).await?;
            print(out, &answer.body, views::repository);
            Ok(())
        }
        Operation::List(list) => self::list(api, out, list).await,
        Operation::Reconcile(named) => {
            mutate(api, out, Method::POST, "/reconcile", named, None).await
        }
        Operation::Verify(verify) => self::verify(api, out, verify).await,
        Operation::RotateKey(named) => {
            mutate(api, out, Method::POST, "/rotate-key", named, None).await
        }
        Operation::RotateCipherPass { name } => {
            let path = repository_path(name, "/rotate-cipher-pass");
            let answer = api.send(Method::POST, &path, &[], None, &[]).await?;
            print(out, &answer.body, |b| format!("{b}\n"));
            Ok(())
        }
        Operation::Delete(delete) => self::delete(api, out, delete).await,
        Operation::Jobs(jobs) => self::jobs(api, out, jobs).await,
        Operation::Audit(audit) => self::audit(api, out, audit).await,
    }
}

fn repository_path(name: &str, action: &str) -> String {
    format!("{REPOSITORIES}/{}{action}", encode(name))
}

/// A path segment as typed, percent-encoded so it stays one segment.
fn encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

fn dry_run_query(dry_run: bool) -> Vec<(&'static str, String)> {
    if dry_run {
        vec![("dry_run", "true".to_owned())]
    } else {
        Vec::new()
    }
}

async fn create(api: &Api, out: Output, args: &CreateArgs) -> Result<(), ClientError> {
    let body = create_body(args)?;
    let key = args
        .idempotency_key
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let query = dry_run_query(args.dry_run);
    let answer = api
        .send(
            Method::POST,
            REPOSITORIES,
            &query,
            Some(&body),
            &[("Idempotency-Key", key)],
        )
        .await?;
    finish(api, out, answer, &args.wait).await
}

fn create_body(args: &CreateArgs) -> Result<Value, ClientError> {
    let mut labels = Map::new();
    for label in &args.labels {
        let (key, value) = label.split_once('=').ok_or_else(|| {
            ClientError::Usage(format!("--label must be KEY=VALUE (got '{label}')"))
        })?;
        labels.insert(key.to_owned(), Value::String(value.to_owned()));
    }
    let mut body = json!({"name": args.name, "namespace": args.namespace});
    let optional = [
        ("bucket", args.bucket.clone().map(Value::String)),
        ("region", args.region.clone().map(Value::String)),
        ("secret_name", args.secret_name.clone().map(Value::String)),
        (
            "labels",
            (!labels.is_empty()).then_some(Value::Object(labels)),
        ),
        ("adopt", args.adopt.then_some(Value::Bool(true))),
        ("repair", args.repair.then_some(Value::Bool(true))),
        (
            "allow_new_cipher_pass",
            args.allow_new_cipher_pass.then_some(Value::Bool(true)),
        ),
        (
            "adopt_existing_secret",
            args.adopt_existing_secret.then_some(Value::Bool(true)),
        ),
    ];
    for (field, value) in optional {
        if let Some(value) = value {
            body[field] = value;
        }
    }
    Ok(body)
}

/// The answer of a mutating call: a dry run's plan, or the queued job (followed with --wait).
async fn finish(
    api: &Api,
    out: Output,
    answer: Answer,
    wait: &WaitArgs,
) -> Result<(), ClientError> {
    if answer.body["dry_run"] == Value::Bool(true) {
        print(out, &answer.body, views::plan);
        return Ok(());
    }
    let job_id = answer.body["job"]["id"].as_str().map(str::to_owned);
    match (wait.wait, job_id) {
        (true, Some(id)) => {
            let view = wait::follow(api, &id, wait.wait_timeout).await?;
            print(out, &view, views::job);
        }
        _ => print(out, &answer.body, views::queued),
    }
    Ok(())
}

async fn mutate(
    api: &Api,
    out: Output,
    method: Method,
    action: &str,
    named: &NamedArgs,
    body: Option<Value>,
) -> Result<(), ClientError> {
    let path = repository_path(&named.name, action);
    let query = dry_run_query(named.dry_run);
    let answer = api.send(method, &path, &query, body.as_ref(), &[]).await?;
    finish(api, out, answer, &named.wait).await
}

async fn verify(api: &Api, out: Output, args: &VerifyArgs) -> Result<(), ClientError> {
    let body = args.repair.then(|| json!({"repair": true}));
    mutate(api, out, Method::POST, "/verify", &args.named, body).await
}

async fn delete(api: &Api, out: Output, args: &DeleteArgs) -> Result<(), ClientError> {
    let path = repository_path(&args.named.name, "");
    let mut query = dry_run_query(args.named.dry_run);
    if args.delete_bucket {
        query.push(("delete_bucket", "true".to_owned()));
    }
    let body = args
        .confirm
        .as_ref()
        .map(|bucket| json!({"confirm": bucket, "force": args.force}));
    let answer = api
        .send(Method::DELETE, &path, &query, body.as_ref(), &[])
        .await?;
    finish(api, out, answer, &args.named.wait).await
}

/// `(name, value)` query pairs of the options that are set, then the page's.
fn query(
    pairs: &[(&'static str, &Option<String>)],
    page: &PageArgs,
) -> Vec<(&'static str, String)> {
    let mut query: Vec<(&'static str, String)> = pairs
        .iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| (*name, v.clone())))
        .collect();
    if let Some(limit) = page.limit {
        query.push(("limit", limit.to_string()));
    }
    if let Some(cursor) = &page.cursor {
        query.push(("cursor", cursor.clone()));
    }
    query
}

async fn list(api: &Api, out: Output, args: &ListArgs) -> Result<(), ClientError> {
    let query = query(
        &[("state", &args.state), ("namespace", &args.namespace)],
        &args.page,
    );
    let answer = api.get(REPOSITORIES, &query).await?;
    print(out, &answer.body, views::repository_page);
    Ok(())
}

async fn audit(api: &Api, out: Output, args: &AuditArgs) -> Result<(), ClientError> {
    let pairs = [
        ("repository", &args.repository),
        ("actor", &args.actor),
        ("since", &args.since),
    ];
    let answer = api.get("/v1/audit", &query(&pairs, &args.page)).await?;
    print(out, &answer.body, views::audit_page);
    Ok(())
}

async fn jobs(api: &Api, out: Output, operation: &JobsOperation) -> Result<(), ClientError> {
    match operation {
        JobsOperation::Get { id, wait } => {
            let path = format!("/v1/jobs/{}", encode(id));
            let body = match wait.wait {
                true => wait::follow(api, id, wait.wait_timeout).await?,
                false => api.get(&path, &[]).await?.body,
            };
            print(out, &body, views::job);
            Ok(())
        }
        JobsOperation::List(list) => job_list(api, out, list).await,
        JobsOperation::Cancel { id, wait } => job_control(api, out, id, "cancel", wait).await,
        JobsOperation::Retry { id, wait } => job_control(api, out, id, "retry", wait).await,
        JobsOperation::Events { id, page } => {
            let path = format!("/v1/jobs/{}/events", encode(id));
            let answer = api.get(&path, &query(&[], page)).await?;
            print(out, &answer.body, views::audit_page);
            Ok(())
        }
    }
}

async fn job_list(api: &Api, out: Output, args: &JobListArgs) -> Result<(), ClientError> {
    let pairs = [
        ("state", &args.state),
        ("kind", &args.kind),
        ("repository", &args.repository),
    ];
    let answer = api.get("/v1/jobs", &query(&pairs, &args.page)).await?;
    print(out, &answer.body, views::job_page);
    Ok(())
}

/// Cancel or retry: the answer is the job's view; --wait follows it to its end.
async fn job_control(
    api: &Api,
    out: Output,
    id: &str,
    action: &str,
    wait: &WaitArgs,
) -> Result<(), ClientError> {
    let path = format!("/v1/jobs/{}/{action}", encode(id));
    let answer = api.send(Method::POST, &path, &[], None, &[]).await?;
    let body = match wait.wait {
        true => wait::follow(api, id, wait.wait_timeout).await?,
        false => answer.body,
    };
    print(out, &body, views::job);
    Ok(())
}
