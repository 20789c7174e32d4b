//! Where a webhook may go: `BP_WEBHOOK_ALLOWED_HOSTS`, and the check of a `callback_url`.
//!
//! An entry is `host` (port 443), `host:port`, or `*.suffix` (any host under `suffix`, not
//! `suffix` itself), optionally prefixed with `https://`. Prefixed with `http://`, the entry
//! allows plain HTTP to that host (port 80 unless given) and nothing else: for receivers inside
//! the cluster or a test. Hosts compare case-insensitively and exactly; an IP address is allowed
//! only when listed as such. The check is on names: what a listed name resolves to is trusted.

use url::Url;

use crate::domain::ValidationError;

/// The field every refusal names.
pub const FIELD: &str = "callback_url";

/// Longest accepted `callback_url`, in bytes.
pub const MAX_URL_BYTES: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `*.suffix`: matches hosts ending in `.suffix`.
    Under(String),
}

/// One `BP_WEBHOOK_ALLOWED_HOSTS` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    http: bool,
    host: HostPattern,
    /// None: the scheme's default port.
    port: Option<u16>,
}

impl Entry {
    fn parse(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        let (http, rest) = match raw.split_once("://") {
            Some(("http", rest)) => (true, rest),
            Some(("https", rest)) => (false, rest),
            Some(_) => {
                return Err(format!(
                    "'{raw}': only http:// or https:// may prefix a host"
                ));
            }
            None => (false, raw),
        };
        let (wildcard, rest) = match rest.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, rest),
        };
        let usage = || format!("'{raw}' is not a host, host:port or *.domain");
        let url = Url::parse(&format!("http://{rest}")).map_err(|_| usage())?;
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(usage)?;
        if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
            return Err(usage());
        }
        // `Url` drops an explicit `:80` (http's default): keep it, for an https entry on 80.
        let port = url.port().or_else(|| rest.ends_with(":80").then_some(80));
        let host = host.to_ascii_lowercase();
        let host = match wildcard {
            true => HostPattern::Under(host),
            false => HostPattern::Exact(host),
        };
        Ok(Entry { http, host, port })
    }

    fn allows(&self, url: &Url) -> bool {
        let scheme_ok = match url.scheme() {
            "https" => true,
            "http" => self.http,
            _ => false,
        };
        let default_port = if self.http { 80 } else { 443 };
        let port_ok = url.port_or_known_default() == Some(self.port.unwrap_or(default_port));
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let host_ok = match &self.host {
            HostPattern::Exact(allowed) => host == *allowed,
            HostPattern::Under(suffix) => host
                .strip_suffix(suffix.as_str())
                .is_some_and(|label| label.len() > 1 && label.ends_with('.')),
        };
        scheme_ok && port_ok && host_ok
    }
}

/// The parsed `BP_WEBHOOK_ALLOWED_HOSTS`; empty allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    entries: Vec<Entry>,
}

impl AllowedHosts {
    /// Parses the entries (blank ones are skipped); the error names the first bad one.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let entries = entries
            .iter()
            .map(AsRef::as_ref)
            .filter(|e| !e.trim().is_empty())
            .map(Entry::parse)
            .collect::<Result<_, _>>()?;
        Ok(AllowedHosts { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `raw` parsed, if it is a URL a delivery may be sent to; else why not (the message names
    /// no allowed host).
    pub fn check(&self, raw: &str) -> Result<Url, String> {
        if raw.len() > MAX_URL_BYTES {
            return Err(format!("must be at most {MAX_URL_BYTES} bytes"));
        }
        let url = Url::parse(raw).map_err(|e| format!("must be an absolute https URL ({e})"))?;
        if !matches!(url.scheme(), "https" | "http") || url.cannot_be_a_base() {
            return Err("must be an absolute https URL".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "must not carry a user name or password; receivers check the signature instead"
                    .into(),
            );
        }
        if url.fragment().is_some() {
            return Err("must not carry a fragment (#...)".into());
        }
        if self.entries.iter().any(|entry| entry.allows(&url)) {
            return Ok(url);
        }
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default().unwrap_or_default();
        Err(match url.scheme() {
            "http" if self.allows_https_to(&url) => format!(
                "plain http is not allowed to {host}:{port}: use https (http only for a \
                 BP_WEBHOOK_ALLOWED_HOSTS entry written http://host)"
            ),
            _ => format!(
                "{}://{host}:{port} is not an allowed webhook destination \
                 (BP_WEBHOOK_ALLOWED_HOSTS)",
                url.scheme()
            ),
        })
    }

    fn allows_https_to(&self, url: &Url) -> bool {
        let mut https = url.clone();
        https.set_scheme("https").is_ok() && self.entries.iter().any(|e| e.allows(&https))
    }
}

/// What the API accepts as a `callback_url`.
#[derive(Debug, Clone, Default)]
pub struct CallbackPolicy {
    pub allowed: AllowedHosts,
    /// `BP_WEBHOOK_SECRET` is set: deliveries can be signed. Without it no callback is taken.
    pub signing: bool,
}

impl CallbackPolicy {
    /// Checks a request's `callback_url` (see the module doc); the error names the field.
    pub fn check(&self, raw: &str) -> Result<Url, ValidationError> {
        if !self.signing {
            return Err(ValidationError::new(
                FIELD,
                "webhooks are off: this service has no BP_WEBHOOK_SECRET to sign deliveries \
                 with; send the request without callback_url",
            ));
        }
        self.allowed
            .check(raw)
            .map_err(|message| ValidationError::new(FIELD, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(entries: &[&str]) -> AllowedHosts {
        AllowedHosts::parse(entries).expect("valid entries")
    }

    #[test]
    fn exact_hosts_allow_https_on_their_port_only() {
        let allowed = hosts(&["holos.example.com", "hooks.example.com:8443"]);
        assert!(
            allowed
                .check("https://holos.example.com/hooks/bp?x=1")
                .is_ok()
        );
        assert!(allowed.check("https://HOLOS.example.com/").is_ok());
        assert!(allowed.check("https://holos.example.com:8443/").is_err());
        assert!(allowed.check("https://hooks.example.com:8443/").is_ok());
        assert!(allowed.check("https://hooks.example.com/").is_err());
        assert!(
            allowed
                .check("https://holos.example.com.evil.test/")
                .is_err()
        );
        assert!(allowed.check("https://evilholos.example.com/").is_err());
        let http = allowed.check("http://holos.example.com/").unwrap_err();
        assert!(http.contains("plain http"), "{http}");
    }

    #[test]
    fn wildcards_match_subdomains_but_not_the_domain() {
        let allowed = hosts(&["*.holos.run"]);
        assert!(allowed.check("https://server.holos.run/").is_ok());
        assert!(allowed.check("https://a.b.holos.run/").is_ok());
        assert!(allowed.check("https://holos.run/").is_err());
        assert!(allowed.check("https://xholos.run/").is_err());
    }

    #[test]
    fn http_only_for_entries_that_say_so() {
        let allowed = hosts(&["http://127.0.0.1:9000", "http://receiver.svc"]);
        assert!(allowed.check("http://127.0.0.1:9000/hook").is_ok());
        assert!(allowed.check("http://127.0.0.1:9001/hook").is_err());
        assert!(allowed.check("http://receiver.svc/hook").is_ok());
        assert!(allowed.check("http://receiver.svc:8080/hook").is_err());
    }

    #[test]
    fn user_info_fragments_and_other_schemes_are_refused() {
        let allowed = hosts(&["holos.example.com"]);
        for bad in [
            "https://user:pw@holos.example.com/",
            "https://user@holos.example.com/",
            "https://holos.example.com/#frag",
            "ftp://holos.example.com/",
            "/relative/path",
            "holos.example.com",
            "mailto:a@holos.example.com",
        ] {
            assert!(allowed.check(bad).is_err(), "{bad}");
        }
        let long = format!("https://holos.example.com/{}", "a".repeat(MAX_URL_BYTES));
        assert!(allowed.check(&long).is_err());
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in ["ftp://x", "host/path", "user@host", "*.", "http://"] {
            let err = AllowedHosts::parse(&[bad]).unwrap_err();
            assert!(err.contains(bad.trim_start_matches("*.")), "{bad}: {err}");
        }
        assert!(AllowedHosts::parse(&["", " "]).unwrap().is_empty());
    }

    #[test]
    fn no_secret_no_callback() {
        let policy = CallbackPolicy {
            allowed: hosts(&["holos.example.com"]),
            signing: false,
        };
        let err = policy.check("https://holos.example.com/").unwrap_err();
        assert_eq!(err.field, FIELD);
        assert!(err.message.contains("BP_WEBHOOK_SECRET"));
    }
}
