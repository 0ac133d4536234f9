//! [`ConnectConfig`]: where and as whom to connect, parsed from a `postgres://` URL.

use super::error::{Error, Result};
use percent_encoding::percent_decode_str;
use std::fmt;

/// The `application_name` used when none is given.
pub const DEFAULT_APPLICATION_NAME: &str = "raftcache-cdc";

/// Settings of a replication connection.
///
/// Only plain TCP is supported for now (no TLS, no Unix sockets).
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectConfig {
    /// Host name or IP address of the server.
    pub host: String,
    /// TCP port of the server.
    pub port: u16,
    /// Role to log in as; it needs the `REPLICATION` attribute.
    pub user: String,
    /// Password, for cleartext, MD5 or SCRAM-SHA-256 authentication.
    pub password: Option<String>,
    /// Database whose changes are decoded (logical slots belong to one database).
    pub dbname: String,
    /// Shown in `pg_stat_replication` / `pg_stat_activity`, to tell the worker apart.
    pub application_name: String,
}

impl fmt::Debug for ConnectConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .finish()
    }
}

impl ConnectConfig {
    /// Parses `postgres://user:password@host:port/dbname?sslmode=disable` (also
    /// `postgresql://`). User, password and dbname are percent-decoded; the port
    /// defaults to 5432, the database to the user name. Query parameters:
    /// `sslmode` (`disable`, `allow` and `prefer` mean plain TCP; `require`,
    /// `verify-ca` and `verify-full` are refused, TLS is not supported yet) and
    /// `application_name`.
    ///
    /// # Errors
    /// [`Error::Config`] for anything else, naming what is wrong.
    ///
    /// # Examples
    /// ```
    /// use raftcache_cdc::walsender::ConnectConfig;
    /// let c = ConnectConfig::from_url("postgres://cdc:p%40ss@db:6432/app?sslmode=disable").unwrap();
    /// assert_eq!((c.user.as_str(), c.password.as_deref(), c.port), ("cdc", Some("p@ss"), 6432));
    /// ```
    pub fn from_url(url: &str) -> Result<ConnectConfig> {
        let bad = |what: &str| Error::Config(format!("{what} in connection URL {}", redact(url)));
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| bad("expected scheme postgres:// or postgresql://"))?;
        if let Some(i) = rest.find('#') {
            return Err(bad(&format!("unexpected fragment {:?}", &rest[i..])));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        // The user info ends at the last '@' (a raw '@' in a password is common).
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(ui) => match ui.split_once(':') {
                Some((u, p)) => (decode(u, "user")?, Some(decode(p, "password")?)),
                None => (decode(ui, "user")?, None),
            },
            None => (String::new(), None),
        };
        if user.is_empty() {
            return Err(bad("missing user name"));
        }
        let (host, port) = split_host_port(hostport).map_err(|e| bad(&e))?;
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        let dbname = match path {
            Some(p) if !p.is_empty() => decode(p, "database name")?,
            _ => user.clone(),
        };
        let mut cfg = ConnectConfig {
            host,
            port,
            user,
            password,
            dbname,
            application_name: DEFAULT_APPLICATION_NAME.to_owned(),
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v, k)?;
            match k {
                "sslmode" => match v.as_str() {
                    "disable" | "allow" | "prefer" => {}
                    "require" | "verify-ca" | "verify-full" => {
                        return Err(Error::Config(format!(
                            "sslmode={v} is not supported: the replication client has no TLS yet \
                             (use sslmode=disable, or a TLS-terminating proxy on the same host)"
                        )))
                    }
                    other => return Err(bad(&format!("unknown sslmode {other:?}"))),
                },
                "application_name" => cfg.application_name = v,
                other => {
                    return Err(bad(&format!(
                        "unsupported parameter {other:?} (supported: sslmode, application_name)"
                    )))
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that every field can go into a startup packet.
    ///
    /// # Errors
    /// [`Error::Config`] when a field is empty where it must not be, or contains a
    /// NUL byte.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("host", self.host.as_str()),
            ("user", self.user.as_str()),
            ("dbname", self.dbname.as_str()),
        ] {
            if v.is_empty() {
                return Err(Error::Config(format!("{name} is empty")));
            }
        }
        for (name, v) in [
            ("host", Some(self.host.as_str())),
            ("user", Some(self.user.as_str())),
            ("password", self.password.as_deref()),
            ("dbname", Some(self.dbname.as_str())),
            ("application_name", Some(self.application_name.as_str())),
        ] {
            if v.is_some_and(|v| v.contains('\0')) {
                return Err(Error::Config(format!("{name} contains a NUL byte")));
            }
        }
        Ok(())
    }
}

fn decode(s: &str, what: &str) -> Result<String> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| Error::Config(format!("{what} is not UTF-8 after percent-decoding")))
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(s: &str) -> std::result::Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unterminated [ in host")?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or("junk after ]")?)),
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None | Some("") => 5432,
        Some(p) => p.parse().map_err(|_| format!("invalid port {p:?}"))?,
    };
    let host = percent_decode_str(host)
        .decode_utf8()
        .map_err(|_| "host is not UTF-8")?
        .into_owned();
    Ok((host, port))
}

/// The URL with its password replaced, for error messages.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let authority_end = url[scheme_end..]
        .find(['/', '?'])
        .map_or(url.len(), |i| scheme_end + i);
    let authority = &url[scheme_end..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &authority[..colon],
            &url[scheme_end + at..]
        ),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_full_url() {
        let c = ConnectConfig::from_url(
            "postgres://app%20user:s%3Ac%40r%2Fet@db.example:6543/my%2Ddb?sslmode=prefer&application_name=w1",
        )
        .unwrap();
        assert_eq!(c.host, "db.example");
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "app user");
        assert_eq!(c.password.as_deref(), Some("s:c@r/et"));
        assert_eq!(c.dbname, "my-db");
        assert_eq!(c.application_name, "w1");
    }

    #[test]
    fn defaults_and_variants() {
        let c = ConnectConfig::from_url("postgresql://u@h").unwrap();
        assert_eq!((c.port, c.dbname.as_str(), c.password), (5432, "u", None));
        assert_eq!(c.application_name, DEFAULT_APPLICATION_NAME);
        let c = ConnectConfig::from_url("postgres://u:p@w@[::1]:5433/d?sslmode=disable").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 5433));
        assert_eq!(c.password.as_deref(), Some("p@w"));
        let c = ConnectConfig::from_url("postgres://u:@127.0.0.1/").unwrap();
        assert_eq!((c.password.as_deref(), c.dbname.as_str()), (Some(""), "u"));
        assert!(ConnectConfig::from_url("postgres://u@h?sslmode=allow").is_ok());
    }

    #[test]
    fn rejects_bad_urls_clearly() {
        for (url, needle) in [
            ("mysql://u@h/d", "scheme"),
            ("postgres://h/d", "missing user"),
            ("postgres://u@:5432/d", "missing host"),
            ("postgres://u@h:99999/d", "invalid port"),
            ("postgres://u@h:x/d", "invalid port"),
            ("postgres://u@h/d?foo=1", "unsupported parameter"),
            ("postgres://u@h/d?sslmode=bogus", "unknown sslmode"),
            ("postgres://u@h/d#frag", "fragment"),
            ("postgres://u%00@h/d", "NUL"),
            ("postgres://u%ff@h/d", "UTF-8"),
        ] {
            let e = ConnectConfig::from_url(url).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{url}: {e:?}");
            assert!(e.to_string().contains(needle), "{url}: {e}");
        }
        for mode in ["require", "verify-ca", "verify-full"] {
            let e =
                ConnectConfig::from_url(&format!("postgres://u@h/d?sslmode={mode}")).unwrap_err();
            assert!(e.to_string().contains("TLS"), "{e}");
        }
    }

    #[test]
    fn secrets_stay_out_of_messages() {
        let e = ConnectConfig::from_url("postgres://u:hunter2@h/d?foo=1").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("u:***@h"), "{e}");
        let c = ConnectConfig::from_url("postgres://u:hunter2@h/d").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
