//! Cursor pagination shared by the list endpoints: a page size in 1..=200 and opaque cursors
//! (URL-safe base64 of the last item's sort key).

use base64::Engine;

use super::ApiError;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 200;

/// The page size asked for, or the default; out of range is a 400.
pub fn page_limit(requested: Option<i64>) -> Result<i64, ApiError> {
    match requested.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n),
        n => Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT} (got {n})"
        ))),
    }
}

pub fn encode_cursor(value: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value)
}

pub fn decode_cursor(cursor: &str) -> Result<String, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| ApiError::BadRequest("cursor is not one this server issued".into()))
}

/// Cuts `rows` (fetched as `limit + 1`, so a further page shows itself) to one page, and returns
/// it with the cursor of the next page (the last item's `key`), if there is one.
pub fn split_page<T>(
    mut rows: Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    let next = (rows.len() as i64 > limit).then(|| {
        rows.truncate(limit as usize);
        encode_cursor(&key(rows.last().expect("a full page")))
    });
    (rows, next)
}
