//! `auth_file`: users and passwords in PgBouncer's `userlist.txt` format, one user a line:
//!
//! ```text
//! "app" "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy"
//! "reporting" "md5ad1b1d8d3a4d4e8f9f1a2b3c4d5e6f70"
//! "batch" "plain text works too"
//! ```
//!
//! Each field is in double quotes; a double quote inside a field is written twice (`""`).
//! Text after the second field is ignored (PgBouncer's files may carry more). Blank lines and
//! lines starting with `;` or `#` are comments. Anything else is an error that names the line.

use std::collections::BTreeMap;

use crate::secrets::Password;

/// Parses the file's text into user → password (plain text, md5 hash or SCRAM verifier).
pub fn parse(text: &str) -> Result<BTreeMap<String, Password>, String> {
    let mut users = BTreeMap::new();
    let mut first_line: BTreeMap<String, usize> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        let (user, rest) =
            quoted(line).ok_or_else(|| format!("line {n}: expected \"user\" \"password\""))?;
        let (password, _) = quoted(rest.trim_start())
            .ok_or_else(|| format!("line {n}: expected \"user\" \"password\""))?;
        if user.is_empty() {
            return Err(format!("line {n}: the user name is empty"));
        }
        if let Some(first) = first_line.get(&user) {
            return Err(format!(
                "line {n}: user {user:?} is listed twice (first on line {first})"
            ));
        }
        first_line.insert(user.clone(), n);
        users.insert(user, Password::new(password));
    }
    Ok(users)
}

/// Reads one `"…"` field at the start of `s` (`""` is a quote); returns it and the rest.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut chars = s.strip_prefix('"')?.char_indices().peekable();
    let body = &s[1..];
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if matches!(chars.peek(), Some((_, '"'))) {
                chars.next();
                out.push('"');
            } else {
                return Some((out, &body[i + 1..]));
            }
        } else {
            out.push(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbouncer_userlist() {
        let text = "; comment\n\n\"app\" \"SCRAM-SHA-256$4096:c2FsdA==$a:b\"\n# another\n  \"we\"\"ird\" \"p\"\"w\" extra stuff\n\"empty\" \"\"\n";
        let u = parse(text).unwrap();
        assert_eq!(u.len(), 3);
        assert_eq!(u["app"].expose(), "SCRAM-SHA-256$4096:c2FsdA==$a:b");
        assert_eq!(u["we\"ird"].expose(), "p\"w");
        assert_eq!(u["empty"].expose(), "");
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            parse("\"a\" \"x\"\napp password\n").unwrap_err(),
            "line 2: expected \"user\" \"password\""
        );
        assert_eq!(
            parse("\"a\" \"unterminated\n").unwrap_err(),
            "line 1: expected \"user\" \"password\""
        );
        assert_eq!(
            parse("\"a\"\n").unwrap_err(),
            "line 1: expected \"user\" \"password\""
        );
        assert_eq!(
            parse("\"\" \"x\"\n").unwrap_err(),
            "line 1: the user name is empty"
        );
        assert_eq!(
            parse("\"a\" \"x\"\n\"a\" \"y\"\n").unwrap_err(),
            "line 2: user \"a\" is listed twice (first on line 1)"
        );
    }
}
