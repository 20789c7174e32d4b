//! Runbook section "Create the IAM User":
//!
//! > Create an IAM User entity for each PostgresCluster.  Do not provide user access to the AWS
//! > Management Console.
//! > Name: `holos-zitadel-backups` for `zitadel`
//! > Group: `holos-zitadel-backups`
//!
//! A user named after the bucket, tagged as ours (`ensure_observed`, `ensure_tags`), member of
//! the bucket's group (`ensure_membership`), without console access: no login profile
//! (`ensure_no_console_access`).

use aws_sdk_iam::Client;
use aws_sdk_iam::error::ProvideErrorMetadata;
use aws_sdk_iam::types::Tag;
use serde_json::{Map, Value, json};

use super::report::{Action, Mode, Report};
use crate::cloud::aws::{ENTITY_ALREADY_EXISTS, classify, output_request_id};
use crate::cloud::{CloudError, StepReport};
use crate::provision::bucket::{MANAGED_BY_KEY, MANAGED_BY_VALUE, REPOSITORY_TAG_KEY};

const IAM: &str = "iam";
/// The resource kind in the step's report.
const KIND: &str = "iam-user";

/// Tags as (key, value) pairs.
type Tags<'a> = [(&'a str, &'a str)];

/// Ensures user `bucket` exists with our tags, is in group `bucket`, and has no console
/// password. Group membership requires the group step to have run.
pub async fn ensure(
    iam: &Client,
    bucket: &str,
    repository: &str,
) -> Result<StepReport, CloudError> {
    ensure_with(iam, bucket, repository, Mode::Apply).await
}

/// [`ensure`] in `mode`; a missing user that is not made is planned as `create` with its
/// tags, its group and no login profile.
pub async fn ensure_with(
    iam: &Client,
    bucket: &str,
    repository: &str,
    mode: Mode,
) -> Result<StepReport, CloudError> {
    let observed = observe(iam, bucket).await?;
    let group_exists = async { Ok::<_, CloudError>(()) };
    ensure_observed(
        iam,
        bucket,
        repository,
        mode,
        observed,
        |_| {},
        group_exists,
    )
    .await
}

/// What one wave of reads found about the user: `None` when there is no such user.
#[derive(Debug, Clone)]
pub struct Observed {
    found: Option<Found>,
}

#[derive(Debug, Clone)]
struct Found {
    tags: Vec<(String, String)>,
    groups: Vec<String>,
    login_profile: bool,
}

impl Observed {
    /// The user's membership of `group`, as the group's members list shows it (the only group
    /// the user steps ask about).
    pub fn in_group(mut self, group: &str, member: bool) -> Self {
        if let Some(found) = &mut self.found {
            found.groups = if member {
                vec![group.to_owned()]
            } else {
                Vec::new()
            };
        }
        self
    }

    /// The user's tags; `None` when there is no such user.
    pub fn tags(&self) -> Option<&[(String, String)]> {
        self.found.as_ref().map(|f| f.tags.as_slice())
    }
}

/// GetUser (which answers the user's tags too), ListGroupsForUser and GetLoginProfile,
/// concurrently.
pub async fn observe(iam: &Client, user: &str) -> Result<Observed, CloudError> {
    observe_with_groups(iam, user, groups_for_user(iam, user)).await
}

/// [`observe`] without ListGroupsForUser, for a wave that reads the group's members anyway:
/// [`Observed::in_group`] completes it (one call fewer).
pub async fn observe_without_groups(iam: &Client, user: &str) -> Result<Observed, CloudError> {
    observe_with_groups(iam, user, async { Ok(Vec::new()) }).await
}

/// [`observe_without_groups`] for a user not expected to exist (a repository that never
/// recorded it): GetUser alone first, so that a missing user costs one read instead of two.
pub async fn observe_unexpected(iam: &Client, user: &str) -> Result<Observed, CloudError> {
    let Some(tags) = get(iam, user).await? else {
        return Ok(Observed { found: None });
    };
    Ok(Observed {
        found: Some(Found {
            tags,
            groups: Vec::new(),
            login_profile: has_login_profile(iam, user).await?,
        }),
    })
}

/// GetUser: the user's tags, or None when there is no such user.
async fn get(iam: &Client, user: &str) -> Result<Option<Vec<(String, String)>>, CloudError> {
    match iam.get_user().user_name(user).send().await {
        Ok(out) => Ok(Some(user_tags(out.user()))),
        Err(err) if err.code() == Some("NoSuchEntity") => Ok(None),
        Err(err) => Err(classify(IAM, "GetUser", err)),
    }
}

async fn has_login_profile(iam: &Client, user: &str) -> Result<bool, CloudError> {
    match iam.get_login_profile().user_name(user).send().await {
        Ok(_) => Ok(true),
        Err(err) if err.code() == Some("NoSuchEntity") => Ok(false),
        Err(err) => Err(classify(IAM, "GetLoginProfile", err)),
    }
}

async fn observe_with_groups(
    iam: &Client,
    user: &str,
    groups: impl Future<Output = Result<Vec<String>, CloudError>>,
) -> Result<Observed, CloudError> {
    let (tags, groups, login_profile) = tokio::join!(
        Box::pin(get(iam, user)),
        Box::pin(groups),
        Box::pin(has_login_profile(iam, user))
    );
    let Some(tags) = tags? else {
        return Ok(Observed { found: None });
    };
    Ok(Observed {
        found: Some(Found {
            tags,
            groups: groups?,
            login_profile: login_profile?,
        }),
    })
}

/// GetUser answers every tag of the user (IAM allows 50; ListUserTags pages the same list).
fn user_tags(user: Option<&aws_sdk_iam::types::User>) -> Vec<(String, String)> {
    user.map(|u| u.tags())
        .unwrap_or_default()
        .iter()
        .map(|t| (t.key().to_owned(), t.value().to_owned()))
        .collect()
}

/// [`ensure_with`] on what [`observe`] read. The user is made (apply mode) before the group is
/// awaited, so both can be made at once; `on_exists` is called once the user exists, with
/// whether this call made it (a new user has no access keys: what making its key waits for).
pub async fn ensure_observed<E: From<CloudError>>(
    iam: &Client,
    bucket: &str,
    repository: &str,
    mode: Mode,
    observed: Observed,
    on_exists: impl FnOnce(bool),
    group_exists: impl Future<Output = Result<(), E>>,
) -> Result<StepReport, E> {
    let (user, group) = (bucket, bucket);
    let wanted_tags = [
        (MANAGED_BY_KEY, MANAGED_BY_VALUE),
        (REPOSITORY_TAG_KEY, repository),
    ];
    let mut report = Report::with_mode(KIND, user, mode);
    let identifiers = json!({
        "user_name": user,
        "group_name": group,
        "repository": repository,
    });
    let found = match observed.found {
        Some(found) => Some(found),
        None if report.creates() => {
            create(iam, user, &wanted_tags, &mut report).await?;
            None
        }
        None => {
            report.planned_new(&[
                ("tags", tags_json(&wanted_tags)),
                ("group_membership", json!(group)),
            ]);
            report.unchanged("login_profile", json!("absent"));
            return Ok(report.into_step_report(identifiers));
        }
    };
    on_exists(report.was_created());
    ensure_settings(
        iam,
        (user, group),
        &wanted_tags,
        found,
        &mut report,
        group_exists,
    )
    .await?;
    Ok(report.into_step_report(identifiers))
}

/// Tags, membership and console access of a user that exists: `found` is what was read
/// (`None`: made by this step, or found made by an earlier attempt; then read again when not
/// made by this step).
async fn ensure_settings<E: From<CloudError>>(
    iam: &Client,
    (user, group): (&str, &str),
    wanted_tags: &Tags<'_>,
    found: Option<Found>,
    report: &mut Report,
    group_exists: impl Future<Output = Result<(), E>>,
) -> Result<(), E> {
    let found = match found {
        Some(found) => Some(found),
        None if report.was_created() => None,
        // EntityAlreadyExists: made by an earlier attempt or a resent request; read it.
        None => observe(iam, user).await?.found,
    };
    if !report.was_created() {
        let tags = found.as_ref().map(|f| f.tags.clone()).unwrap_or_default();
        ensure_tags(iam, user, wanted_tags, &tags, report).await?;
    }
    let groups = found.as_ref().map(|f| f.groups.clone()).unwrap_or_default();
    group_exists.await?;
    ensure_membership(iam, user, group, &groups, report).await?;
    let login_profile = found.as_ref().is_some_and(|f| f.login_profile);
    ensure_no_console_access(iam, user, login_profile, report).await?;
    Ok(())
}

fn tags_json(pairs: &Tags<'_>) -> Value {
    let map: Map<String, Value> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    Value::Object(map)
}

/// Creates the user with our tags. `EntityAlreadyExists` (a resent request whose first answer
/// was lost, or a read that lagged behind an earlier create) leaves the user to be checked
/// like any existing one (tags, group, console access); reading it while it is not visible
/// yet fails retryably.
async fn create(
    iam: &Client,
    user: &str,
    wanted_tags: &Tags<'_>,
    report: &mut Report,
) -> Result<(), CloudError> {
    let sent = iam
        .create_user()
        .user_name(user)
        .path("/")
        .set_tags(Some(tags(wanted_tags)?))
        .send()
        .await;
    match sent {
        Ok(out) => {
            report.created(output_request_id(&out));
            report.made("tags", tags_json(wanted_tags), None);
        }
        Err(err) if err.code() == Some(ENTITY_ALREADY_EXISTS) => {}
        Err(err) => return Err(classify(IAM, "CreateUser", err)),
    }
    Ok(())
}

/// Our tags on an existing user (`current`, as read); missing or different ones are
/// (re)written.
async fn ensure_tags(
    iam: &Client,
    user: &str,
    wanted_tags: &Tags<'_>,
    current: &[(String, String)],
    report: &mut Report,
) -> Result<(), CloudError> {
    let missing: Vec<(&str, &str)> = wanted_tags
        .iter()
        .filter(|(k, v)| !current.iter().any(|(ck, cv)| ck == k && cv == v))
        .copied()
        .collect();
    if missing.is_empty() {
        report.unchanged("tags", tags_json(wanted_tags));
        return Ok(());
    }
    let found = current_values(current, &missing);
    let new_tags = tags(&missing)?;
    let tag = async {
        let out = iam
            .tag_user()
            .user_name(user)
            .set_tags(Some(new_tags))
            .send()
            .await
            .map_err(|e| classify(IAM, "TagUser", e))?;
        Ok(output_request_id(&out))
    };
    let request_id = report.perform(tag).await?;
    let action = Action::create_or_update(found.values().all(Value::is_null));
    let (found, expected) = (Value::Object(found), tags_json(&missing));
    report.repaired("tags", found, expected, action, request_id);
    Ok(())
}

/// The current value (`null`: absent) of each tag of `wanted`.
fn current_values(current: &[(String, String)], wanted: &Tags<'_>) -> Map<String, Value> {
    wanted
        .iter()
        .map(|(k, _)| {
            let value = current.iter().find(|(ck, _)| ck == k).map(|(_, v)| v);
            ((*k).to_owned(), json!(value))
        })
        .collect()
}

/// Group: the bucket's group (`groups`: the user's groups as read; a new user is in none).
async fn ensure_membership(
    iam: &Client,
    user: &str,
    group: &str,
    groups: &[String],
    report: &mut Report,
) -> Result<(), CloudError> {
    const SETTING: &str = "group_membership";
    let created = report.was_created();
    if !created && groups.iter().any(|g| g == group) {
        report.unchanged(SETTING, json!(group));
        return Ok(());
    }
    let add = async {
        let out = iam
            .add_user_to_group()
            .group_name(group)
            .user_name(user)
            .send()
            .await
            .map_err(|e| classify(IAM, "AddUserToGroup", e))?;
        Ok(output_request_id(&out))
    };
    let request_id = report.perform(add).await?;
    if created {
        report.made(SETTING, json!(group), request_id);
    } else {
        report.repaired(
            SETTING,
            json!(null),
            json!(group),
            Action::Create,
            request_id,
        );
    }
    Ok(())
}

/// Do not provide user access to the AWS Management Console: no login profile (`present`: as
/// read; a new user has none).
async fn ensure_no_console_access(
    iam: &Client,
    user: &str,
    present: bool,
    report: &mut Report,
) -> Result<(), CloudError> {
    const SETTING: &str = "login_profile";
    if report.was_created() || !present {
        report.unchanged(SETTING, json!("absent"));
        return Ok(());
    }
    let delete = async {
        match iam.delete_login_profile().user_name(user).send().await {
            Ok(out) => Ok(output_request_id(&out)),
            Err(err) if err.code() == Some("NoSuchEntity") => Ok(None),
            Err(err) => Err(classify(IAM, "DeleteLoginProfile", err)),
        }
    };
    let request_id = report.perform(delete).await?;
    let (found, expected) = (json!("present"), json!("absent"));
    report.repaired(SETTING, found, expected, Action::Delete, request_id);
    Ok(())
}

/// The user's tags as (key, value) pairs (paginated).
pub async fn list_tags(iam: &Client, user: &str) -> Result<Vec<(String, String)>, CloudError> {
    let mut all = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let out = iam
            .list_user_tags()
            .user_name(user)
            .set_marker(marker.take())
            .send()
            .await
            .map_err(|e| classify(IAM, "ListUserTags", e))?;
        all.extend(
            out.tags()
                .iter()
                .map(|t| (t.key().to_owned(), t.value().to_owned())),
        );
        match out.marker() {
            Some(next) if out.is_truncated() => marker = Some(next.to_owned()),
            _ => return Ok(all),
        }
    }
}

/// Names of the groups the user belongs to (paginated).
pub async fn groups_for_user(iam: &Client, user: &str) -> Result<Vec<String>, CloudError> {
    let mut all = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let out = iam
            .list_groups_for_user()
            .user_name(user)
            .set_marker(marker.take())
            .send()
            .await
            .map_err(|e| classify(IAM, "ListGroupsForUser", e))?;
        all.extend(out.groups().iter().map(|g| g.group_name().to_owned()));
        match out.marker() {
            Some(next) if out.is_truncated() => marker = Some(next.to_owned()),
            _ => return Ok(all),
        }
    }
}

pub(crate) fn tags(pairs: &[(&str, &str)]) -> Result<Vec<Tag>, CloudError> {
    pairs
        .iter()
        .map(|(k, v)| {
            Tag::builder()
                .key(*k)
                .value(*v)
                .build()
                .map_err(|e| CloudError::permanent(IAM, "TagUser", format!("invalid tag: {e}")))
        })
        .collect()
}
