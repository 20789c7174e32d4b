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

/// Separates the parts of a keyed cursor (a sort key and a tie-breaker, e.g. a name and an
/// id); neither part of the keys we page by can hold it.
const KEY_SEPARATOR: char = '\n';

/// Like [`split_page`] for rows sorted by a key that may repeat: the cursor carries the key and
/// a unique tie-breaker (see [`decode_keyed_cursor`]).
pub fn split_keyed_page<T>(
    rows: Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> (String, String),
) -> (Vec<T>, Option<String>) {
    split_page(rows, limit, |row| {
        let (key, tie) = key(row);
        format!("{key}{KEY_SEPARATOR}{tie}")
    })
}

/// The key and tie-breaker of a cursor made by [`split_keyed_page`]; a cursor made by
/// [`split_page`] (an earlier page of the same list) has no tie-breaker.
pub fn decode_keyed_cursor(cursor: &str) -> Result<(String, Option<String>), ApiError> {
    let decoded = decode_cursor(cursor)?;
    Ok(match decoded.split_once(KEY_SEPARATOR) {
        Some((key, tie)) => (key.to_owned(), Some(tie.to_owned())),
        None => (decoded, None),
    })
}

/// A cursor's part that must be a UUID.
pub fn cursor_uuid(part: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(part)
        .map_err(|_| ApiError::BadRequest("cursor is not one this server issued".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_cursors_carry_the_key_and_the_tie_breaker() {
        let rows = vec![("a", 1), ("a", 2), ("b", 3)];
        let (page, next) = split_keyed_page(rows, 2, |(k, id)| ((*k).to_owned(), id.to_string()));
        assert_eq!(page.len(), 2);
        let (key, tie) = decode_keyed_cursor(&next.expect("a next page")).unwrap();
        assert_eq!((key.as_str(), tie.as_deref()), ("a", Some("2")));
        assert_eq!(
            decode_keyed_cursor(&encode_cursor("plain")).unwrap(),
            ("plain".to_owned(), None)
        );
    }
}
