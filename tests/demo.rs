//! `pgsluice demo` on the built binary, unattended (no terminal, stdin closed): it runs both
//! phases, prints the summary with its figures, exits 0, and leaves no PostgreSQL and no
//! temp dir behind; Ctrl-C and SIGTERM stop it early with the same cleanup.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn demo(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .arg("demo")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Lines of the child's stdout, as they come.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Collects lines until one contains `marker` (returned with everything before it).
fn until(rx: &mpsc::Receiver<String>, marker: &str, within: Duration, seen: &mut Vec<String>) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(marker);
                seen.push(line);
                if hit {
                    return;
                }
            }
            Err(_) => panic!(
                "no line with {marker:?} within {within:?}; output:\n{}",
                seen.join("\n")
            ),
        }
    }
}

fn wait(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pgsluice demo did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stderr(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// The throwaway cluster's directory and port, from the line the demo prints.
fn cluster(out: &[String]) -> (PathBuf, u16) {
    let line = out
        .iter()
        .find(|l| l.starts_with("PostgreSQL: ") && l.contains(", data in "))
        .unwrap_or_else(|| panic!("no PostgreSQL line in:\n{}", out.join("\n")));
    let dir = PathBuf::from(line.rsplit_once(", data in ").unwrap().1);
    let port = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    (dir, port)
}

/// Nothing is left: the directory is gone and nothing listens on the server's port.
fn assert_cleaned_up(out: &[String]) {
    let (dir, port) = cluster(out);
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(1)
        )
        .is_err(),
        "PostgreSQL still listens on {port}"
    );
}

/// The numbers after `label` on the summary's lines, one per phase.
fn figures(out: &[String], label: &str) -> Vec<f64> {
    out.iter()
        .filter_map(|l| l.trim_start().strip_prefix(label))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn runs_unattended_and_cleans_up() {
    let mut child = demo(&["--duration", "12", "--checkout-timeout", "3s"]);
    let rx = lines(&mut child);
    let status = wait(&mut child, Duration::from_secs(180));
    let err = stderr(&mut child);
    let out: Vec<String> = rx.try_iter().collect();
    let text = out.join("\n");
    assert!(
        status.success(),
        "exit {status}\nstdout:\n{text}\nstderr:\n{err}"
    );
    assert!(
        !text.contains('\x1b'),
        "no terminal: no escape codes\n{text}"
    );
    assert!(
        text.contains("[phase 1 "),
        "periodic lines for phase 1:\n{text}"
    );
    assert!(
        text.contains("[phase 2 "),
        "periodic lines for phase 2:\n{text}"
    );

    let products = figures(&out, "products done");
    let timeouts = figures(&out, "checkout timeouts");
    let hoarding = figures(&out, "hoarding");
    assert_eq!(products.len(), 2, "{text}");
    assert_eq!(timeouts.len(), 2, "{text}");
    assert_eq!(hoarding.len(), 2, "{text}");
    // 40 workers over 9 servers, each holding one for a 2 s call: most of the queue waits
    // past the 3 s timeout. Released during the call, the same servers keep up with all 40.
    assert!(products[0] > 0.0, "{text}");
    assert!(
        timeouts[0] > 0.0,
        "holding connections makes workers time out:\n{text}"
    );
    assert!(hoarding[0] > 0.0, "{text}");
    assert!(
        products[1] > products[0],
        "releasing does more work:\n{text}"
    );
    assert_eq!(timeouts[1], 0.0, "{text}");
    assert_eq!(hoarding[1], 0.0, "{text}");
    assert!(text.contains("never had more than"), "{text}");
    assert!(text.contains("Where to look next"), "{text}");
    assert!(text.contains("Cleaned up: PostgreSQL stopped"), "{text}");
    assert_cleaned_up(&out);
}

#[test]
fn ctrl_c_during_the_load_cleans_up() {
    let mut child = demo(&["--duration", "600"]);
    let rx = lines(&mut child);
    let mut out = Vec::new();
    until(&rx, "[phase 1 ", Duration::from_secs(120), &mut out);
    std::thread::sleep(Duration::from_secs(1));
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = wait(&mut child, Duration::from_secs(60));
    out.extend(rx.try_iter());
    let text = out.join("\n");
    assert_eq!(status.code(), Some(130), "{text}\n{}", stderr(&mut child));
    assert!(text.contains("Interrupted"), "{text}");
    assert!(text.contains("Summary (interrupted)"), "{text}");
    assert_cleaned_up(&out);
}

#[test]
fn sigterm_while_postgres_starts_cleans_up() {
    let mut child = demo(&["--duration", "600"]);
    let rx = lines(&mut child);
    let mut out = Vec::new();
    // The signal lands while initdb and pg_ctl run.
    until(
        &rx,
        "Starting a throwaway PostgreSQL",
        Duration::from_secs(60),
        &mut out,
    );
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = wait(&mut child, Duration::from_secs(90));
    out.extend(rx.try_iter());
    let text = out.join("\n");
    assert_eq!(status.code(), Some(143), "{text}\n{}", stderr(&mut child));
    assert!(
        !text.contains("[phase 1 "),
        "no load after the signal:\n{text}"
    );
    assert_cleaned_up(&out);
}

#[test]
fn without_postgres_it_says_what_to_install() {
    let out = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .args(["demo", "--duration", "4"])
        .env("PG_BIN", "/nonexistent/pgsluice-test")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PostgreSQL") && err.contains("PG_BIN=/nonexistent/pgsluice-test"),
        "{err}"
    );
}
