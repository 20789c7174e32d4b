//! Secret material between the step that makes it and the step that delivers it to the
//! Kubernetes Secret: an access key's secret (IAM reveals it only once) and a freshly generated
//! cipher pass. Always encrypted with the current key of a [`Keyring`]; the AAD binds each
//! ciphertext to its repository, kind and key id, so rows cannot be swapped. Each row names the
//! encryption key that sealed it: a row sealed with a previous key (`BP_PREVIOUS_ENCRYPTION_KEYS`)
//! is re-sealed with the current key when it is read. Wiped once the Secret holds them.

use secrecy::{ExposeSecret, SecretString};
use sqlx::{Acquire, PgConnection, PgExecutor, Postgres};
use uuid::Uuid;

use crate::crypto::{self, Keyring, Sealed};
use crate::jobs::JobError;
use crate::jobs::context::PgQuery;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    AccessKey,
    CipherPass,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::AccessKey => "access-key",
            Kind::CipherPass => "cipher-pass",
        }
    }
}

fn aad(repository_id: Uuid, kind: Kind, key_id: &str) -> Vec<u8> {
    crypto::aad(&[
        repository_id.as_bytes(),
        kind.as_str().as_bytes(),
        key_id.as_bytes(),
    ])
}

/// Stores (or replaces) the material of `kind` for a repository. Call it in the transaction
/// that records the step's success, so the secret and the success are durable together.
///
/// A cipher pass is never replaced, here too: storing one when one is already sealed fails
/// (a database error, so the step is retried and its next attempt reuses the sealed pass).
pub async fn put(
    conn: &mut PgConnection,
    keys: &Keyring,
    repository_id: Uuid,
    kind: Kind,
    key_id: &str,
    secret: &SecretString,
) -> Result<(), sqlx::Error> {
    let row = SealedRow::seal(keys, repository_id, kind, key_id, secret);
    let sql = store_sql("VALUES ($1, $2, $3, $4, $5, $6)");
    let stored = row
        .bind(sqlx::query(sqlx::AssertSqlSafe(sql)))
        .execute(conn)
        .await?;
    if stored.rows_affected() == 0 {
        return Err(sqlx::Error::Protocol(format!(
            "a {} is already sealed for this repository; it is never replaced",
            kind.as_str()
        )));
    }
    Ok(())
}

/// The write of one sealed row whose values `source` gives as six parameters (a VALUES list,
/// or a SELECT that decides whether it is written), bound by [`SealedRow::bind`]. A cipher
/// pass already sealed is left as it is (no row written).
fn store_sql(source: &str) -> String {
    format!(
        "INSERT INTO secret_material (repository_id, kind, key_id, nonce, ciphertext, encryption_key_id)
         {source}
         ON CONFLICT (repository_id, kind) DO UPDATE
            SET key_id = excluded.key_id, nonce = excluded.nonce, ciphertext = excluded.ciphertext,
                encryption_key_id = excluded.encryption_key_id, created_at = now()
          WHERE secret_material.kind <> 'cipher-pass'"
    )
}

/// Material sealed with the current key, ready to be stored ([`store_sql`]).
pub struct SealedRow {
    repository_id: Uuid,
    kind: Kind,
    key_id: String,
    sealed: Sealed,
    encryption_key_id: String,
}

impl SealedRow {
    fn seal(
        keys: &Keyring,
        repository_id: Uuid,
        kind: Kind,
        key_id: &str,
        secret: &SecretString,
    ) -> Self {
        let current = keys.current();
        let aad = aad(repository_id, kind, key_id);
        SealedRow {
            repository_id,
            kind,
            key_id: key_id.to_owned(),
            sealed: current.seal(secret.expose_secret().as_bytes(), &aad),
            encryption_key_id: current.id(),
        }
    }

    /// The write as a statement of `JobContext::record_success_with` (durable with the step's
    /// success): written only while the lease holds; parameters `$16` to `$21`.
    pub fn store_with_success() -> String {
        store_sql("SELECT $16, $17, $18, $19, $20, $21 FROM lease")
    }

    /// Binds the row's six values (the next six parameters).
    pub fn bind(self, query: PgQuery<'_>) -> PgQuery<'_> {
        query
            .bind(self.repository_id)
            .bind(self.kind.as_str())
            .bind(self.key_id)
            .bind(self.sealed.nonce)
            .bind(self.sealed.ciphertext)
            .bind(self.encryption_key_id)
    }
}

/// Material we hold, opened: its key id and secret.
pub struct Unsealed {
    pub key_id: String,
    pub secret: SecretString,
}

#[derive(Debug, thiserror::Error)]
pub enum SealedError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(
        "stored {0} cannot be decrypted with BP_ENCRYPTION_KEY or any of \
         BP_PREVIOUS_ENCRYPTION_KEYS (was the key changed without keeping the old one?)"
    )]
    Undecryptable(&'static str),
}

/// A row of `secret_material` as stored.
#[derive(sqlx::FromRow)]
struct Row {
    key_id: String,
    nonce: Vec<u8>,
    ciphertext: Vec<u8>,
    encryption_key_id: Option<String>,
}

/// The material of `kind` held for a repository, decrypted; `None` when none is held. Material
/// opened with a previous key (or sealed before key ids were recorded) is re-sealed with the
/// current key. An access key's secret that no key opens counts as absent (the key step makes
/// a new key and deletes the old one); a cipher pass no key opens is [`SealedError::Undecryptable`]
/// (callers look in the Secret first: see `secret::s3_conf`, `cipher_pass::Copies::find`).
pub async fn get<'c>(
    db: impl Acquire<'c, Database = Postgres>,
    keys: &Keyring,
    repository_id: Uuid,
    kind: Kind,
) -> Result<Option<Unsealed>, SealedError> {
    let mut conn = db.acquire().await?;
    let row: Option<Row> = sqlx::query_as(
        "SELECT key_id, nonce, ciphertext, encryption_key_id
           FROM secret_material WHERE repository_id = $1 AND kind = $2",
    )
    .bind(repository_id)
    .bind(kind.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let sealed = Sealed {
        nonce: row.nonce,
        ciphertext: row.ciphertext,
    };
    let aad = aad(repository_id, kind, &row.key_id);
    let opened = match keys.open_string(&sealed, &aad, row.encryption_key_id.as_deref()) {
        Ok(opened) => opened,
        Err(_) if kind == Kind::AccessKey => {
            tracing::warn!(%repository_id, access_key_id = %row.key_id,
                "the sealed access key secret opens with no configured encryption key; treated as absent");
            return Ok(None);
        }
        Err(_) => return Err(SealedError::Undecryptable(kind.as_str())),
    };
    let unsealed = Unsealed {
        key_id: row.key_id,
        secret: opened.secret,
    };
    if row.encryption_key_id.as_deref() != Some(keys.current().id().as_str()) {
        reseal(&mut conn, keys, repository_id, kind, &sealed, &unsealed).await?;
    }
    Ok(Some(unsealed))
}

/// Seals `unsealed` again with the current key, unless the row changed since it was read (the
/// nonce is compared, so a newer secret written meanwhile is never overwritten).
async fn reseal(
    conn: &mut PgConnection,
    keys: &Keyring,
    repository_id: Uuid,
    kind: Kind,
    read: &Sealed,
    unsealed: &Unsealed,
) -> Result<(), sqlx::Error> {
    let aad = aad(repository_id, kind, &unsealed.key_id);
    let sealed = keys
        .current()
        .seal(unsealed.secret.expose_secret().as_bytes(), &aad);
    sqlx::query(
        "UPDATE secret_material SET nonce = $4, ciphertext = $5, encryption_key_id = $6
          WHERE repository_id = $1 AND kind = $2 AND nonce = $3",
    )
    .bind(repository_id)
    .bind(kind.as_str())
    .bind(&read.nonce)
    .bind(&sealed.nonce)
    .bind(&sealed.ciphertext)
    .bind(keys.current().id())
    .execute(conn)
    .await?;
    Ok(())
}

/// Removes one kind of material (e.g. an access key we deleted in IAM).
pub async fn forget(
    db: impl PgExecutor<'_>,
    repository_id: Uuid,
    kind: Kind,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM secret_material WHERE repository_id = $1 AND kind = $2")
        .bind(repository_id)
        .bind(kind.as_str())
        .execute(db)
        .await?;
    Ok(())
}

/// Removes all material of a repository, once the Secret holds it.
pub async fn wipe(db: impl PgExecutor<'_>, repository_id: Uuid) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM secret_material WHERE repository_id = $1")
        .bind(repository_id)
        .execute(db)
        .await?;
    Ok(done.rows_affected())
}

/// A sealed value that cannot be read ends the step: a database error may pass, a key that no
/// longer opens it will not.
impl From<SealedError> for JobError {
    fn from(err: SealedError) -> Self {
        match err {
            SealedError::Database(e) => JobError::Database(e),
            other => JobError::Permanent(other.to_string()),
        }
    }
}

/// One repository's sealed material and the keys that open it.
#[derive(Clone, Copy)]
pub struct Store<'a> {
    pub key: &'a Keyring,
    pub repository_id: Uuid,
}

impl Store<'_> {
    /// See [`get`].
    pub async fn get<'c>(
        &self,
        db: impl Acquire<'c, Database = Postgres>,
        kind: Kind,
    ) -> Result<Option<Unsealed>, SealedError> {
        get(db, self.key, self.repository_id, kind).await
    }

    /// An access key's secret sealed for [`SealedRow::store_with_success`].
    pub fn seal_access_key(&self, key_id: &str, secret: &SecretString) -> SealedRow {
        let kind = Kind::AccessKey;
        SealedRow::seal(self.key, self.repository_id, kind, key_id, secret)
    }

    /// See [`put`]: call it in the transaction that records the step's success.
    pub async fn put(
        &self,
        conn: &mut PgConnection,
        kind: Kind,
        key_id: &str,
        secret: &SecretString,
    ) -> Result<(), sqlx::Error> {
        put(conn, self.key, self.repository_id, kind, key_id, secret).await
    }

    /// See [`forget`].
    pub async fn forget(&self, db: impl PgExecutor<'_>, kind: Kind) -> Result<(), sqlx::Error> {
        forget(db, self.repository_id, kind).await
    }

    /// See [`wipe`].
    pub async fn wipe(&self, db: impl PgExecutor<'_>) -> Result<u64, sqlx::Error> {
        wipe(db, self.repository_id).await
    }
}
