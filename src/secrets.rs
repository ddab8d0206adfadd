//! Secrets in the configuration: passwords that never show in logs or `Debug` output, and
//! that may be given as `env:NAME` (an environment variable) or `file:PATH` (a file's
//! contents), the two ways ECS hands over Secrets Manager values. References are resolved
//! each time the configuration is loaded, so a rotated file is picked up by a reload.

use std::fmt;
use std::ops::Deref;

use serde::Deserialize;

/// A password from the configuration. `Debug` prints `"***"`; the value is reached with
/// [`Password::expose`] (or through `Deref`, e.g. `Option<Password>::as_deref`).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Password(String);

impl Password {
    pub fn new(value: impl Into<String>) -> Password {
        Password(value.into())
    }

    /// The secret itself. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Replaces an `env:NAME` or `file:PATH` reference by what it points to. `key` names the
    /// setting in error messages (never the value).
    pub fn resolve(
        &mut self,
        key: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), String> {
        if let Some(value) = resolve(key, &self.0, env)? {
            self.0 = value;
        }
        Ok(())
    }
}

impl Deref for Password {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl From<&str> for Password {
    fn from(s: &str) -> Password {
        Password(s.to_owned())
    }
}

impl From<String> for Password {
    fn from(s: String) -> Password {
        Password(s)
    }
}

/// Resolves one value: `Some(secret)` for a reference, `None` for a literal. Errors say
/// what is missing and name `key`.
pub fn resolve(
    key: &str,
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<String>, String> {
    if let Some(name) = value.strip_prefix("env:") {
        if name.is_empty() {
            return Err(format!(
                "{key}: \"env:\" needs a variable name, as in env:DB_PASSWORD"
            ));
        }
        return match env(name) {
            Some(v) if !v.is_empty() => Ok(Some(v)),
            Some(_) => Err(format!("{key}: environment variable {name} is empty")),
            None => Err(format!("{key}: environment variable {name} is not set")),
        };
    }
    if let Some(path) = value.strip_prefix("file:") {
        if path.is_empty() {
            return Err(format!(
                "{key}: \"file:\" needs a path, as in file:/run/secrets/db"
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{key}: cannot read secret file {path}: {e}"))?;
        // Secret files usually end with one newline that is not part of the secret.
        let text = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text);
        if text.is_empty() {
            return Err(format!("{key}: secret file {path} is empty"));
        }
        return Ok(Some(text.to_owned()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "DB_PW" => Some("from-env".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn literals_stay() {
        assert_eq!(resolve("k", "plain", &env).unwrap(), None);
        assert_eq!(
            resolve("k", "SCRAM-SHA-256$4096:x$y:z", &env).unwrap(),
            None
        );
    }

    #[test]
    fn env_references() {
        assert_eq!(
            resolve("k", "env:DB_PW", &env).unwrap().as_deref(),
            Some("from-env")
        );
        let e = resolve("users.app.password", "env:NOPE", &env).unwrap_err();
        assert_eq!(
            e,
            "users.app.password: environment variable NOPE is not set"
        );
        assert!(resolve("k", "env:EMPTY", &env)
            .unwrap_err()
            .contains("is empty"));
        assert!(resolve("k", "env:", &env)
            .unwrap_err()
            .contains("variable name"));
    }

    #[test]
    fn file_references() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        let r = format!("file:{}", p.display());
        assert_eq!(resolve("k", &r, &env).unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&p, "s3cret\r\n").unwrap();
        assert_eq!(resolve("k", &r, &env).unwrap().as_deref(), Some("s3cret"));
        // Only one trailing newline goes; inner and leading spaces are the secret's.
        std::fs::write(&p, " a b\n\n").unwrap();
        assert_eq!(resolve("k", &r, &env).unwrap().as_deref(), Some(" a b\n"));
        std::fs::write(&p, "\n").unwrap();
        assert!(resolve("k", &r, &env).unwrap_err().contains("is empty"));
        let missing = format!("file:{}", dir.path().join("nope").display());
        let e = resolve("databases.app.password", &missing, &env).unwrap_err();
        assert!(
            e.starts_with("databases.app.password: cannot read secret file "),
            "{e}"
        );
    }

    #[test]
    fn debug_hides_the_value() {
        let p = Password::new("hunter2");
        assert_eq!(format!("{p:?}"), "\"***\"");
        assert_eq!(format!("{:?}", Some(p.clone())), "Some(\"***\")");
        assert_eq!(p.expose(), "hunter2");
        assert_eq!(Some(p).as_deref(), Some("hunter2"));
    }
}
