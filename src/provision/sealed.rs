//! Secret material between the step that makes it and the step that delivers it to the
//! Kubernetes Secret: an access key's secret (IAM reveals it only once) and a freshly generated
//! cipher pass. Always encrypted with [`EncryptionKey`]; the AAD binds each ciphertext to its
//! repository, kind and key id, so rows cannot be swapped. Wiped once the Secret holds them.

use secrecy::{ExposeSecret, SecretString};
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use crate::crypto::{self, EncryptionKey, Sealed};
use crate::jobs::JobError;

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
pub async fn put(
    conn: &mut PgConnection,
    key: &EncryptionKey,
    repository_id: Uuid,
    kind: Kind,
    key_id: &str,
    secret: &SecretString,
) -> Result<(), sqlx::Error> {
    let sealed = key.seal(
        secret.expose_secret().as_bytes(),
        &aad(repository_id, kind, key_id),
    );
    sqlx::query(
        "INSERT INTO secret_material (repository_id, kind, key_id, nonce, ciphertext)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (repository_id, kind) DO UPDATE
            SET key_id = excluded.key_id, nonce = excluded.nonce, ciphertext = excluded.ciphertext,
                created_at = now()",
    )
    .bind(repository_id)
    .bind(kind.as_str())
    .bind(key_id)
    .bind(&sealed.nonce)
    .bind(&sealed.ciphertext)
    .execute(conn)
    .await?;
    Ok(())
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
    #[error("stored {0} cannot be decrypted with BP_ENCRYPTION_KEY (was the key changed?)")]
    Undecryptable(&'static str),
}

/// The material of `kind` held for a repository, decrypted; `None` when none is held.
pub async fn get(
    db: impl PgExecutor<'_>,
    key: &EncryptionKey,
    repository_id: Uuid,
    kind: Kind,
) -> Result<Option<Unsealed>, SealedError> {
    let row: Option<(String, Vec<u8>, Vec<u8>)> = sqlx::query_as(
        "SELECT key_id, nonce, ciphertext FROM secret_material WHERE repository_id = $1 AND kind = $2",
    )
    .bind(repository_id)
    .bind(kind.as_str())
    .fetch_optional(db)
    .await?;
    let Some((key_id, nonce, ciphertext)) = row else {
        return Ok(None);
    };
    let secret = key
        .open_string(
            &Sealed { nonce, ciphertext },
            &aad(repository_id, kind, &key_id),
        )
        .map_err(|_| SealedError::Undecryptable(kind.as_str()))?;
    Ok(Some(Unsealed { key_id, secret }))
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

/// One repository's sealed material and the key that opens it.
#[derive(Clone, Copy)]
pub struct Store<'a> {
    pub key: &'a EncryptionKey,
    pub repository_id: Uuid,
}

impl Store<'_> {
    /// See [`get`].
    pub async fn get(
        &self,
        db: impl PgExecutor<'_>,
        kind: Kind,
    ) -> Result<Option<Unsealed>, SealedError> {
        get(db, self.key, self.repository_id, kind).await
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
