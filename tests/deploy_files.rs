//! The Docker and ECS files cannot be run here (no Docker engine on CI machines), so they are
//! checked statically: they parse, and the settings they give pgsluice are a valid config.

use std::path::Path;
use std::process::Command;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Loads a config from environment variables alone, as a container does.
fn config_from_env(env: Vec<(String, String)>) -> pgsluice::Config {
    pgsluice::Config::load_from(None, &env, &[]).unwrap_or_else(|e| panic!("{e}: {env:?}"))
}

#[test]
fn ecs_task_definition_configures_a_valid_sidecar() {
    let def: serde_json::Value =
        serde_json::from_str(&read("docker/ecs-task-definition.json")).unwrap();
    let containers = def["containerDefinitions"].as_array().unwrap();
    let sidecar = containers
        .iter()
        .find(|c| c["name"] == "pgsluice")
        .expect("a pgsluice container");
    let app = containers
        .iter()
        .find(|c| c["name"] == "app")
        .expect("an app container");
    assert_eq!(app["dependsOn"][0]["containerName"], "pgsluice");
    assert_eq!(app["dependsOn"][0]["condition"], "HEALTHY");
    assert_eq!(sidecar["healthCheck"]["command"][1], "pgsluice");
    let mut env: Vec<(String, String)> = sidecar["environment"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // The upstream URL comes from a secret; any valid one will do here.
    for s in sidecar["secrets"].as_array().unwrap() {
        assert!(s["name"].as_str().unwrap().starts_with("PGSLUICE_"));
    }
    env.push((
        "PGSLUICE_UPSTREAM".into(),
        "postgres://app:pw@db.internal:5432/shop".into(),
    ));
    let c = config_from_env(env);
    assert_eq!(c.listen, "127.0.0.1:6432");
    assert_eq!(c.pool_size, 8);
    assert_eq!(c.fleet.name, "shop");
    assert_eq!(c.query_wait_timeout.as_secs(), 30);
    assert!(c.databases.contains_key("shop"));
    // stopTimeout leaves the drain time to finish.
    assert!(sidecar["stopTimeout"].as_u64().unwrap() >= 30);
}

#[test]
fn compose_file_is_valid_and_configures_pgsluice() {
    let compose: serde_yaml::Value = serde_yaml::from_str(&read("docker/compose.yaml")).unwrap();
    let env = compose["services"]["pgsluice"]["environment"]
        .as_mapping()
        .expect("pgsluice environment");
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let c = config_from_env(env);
    assert_eq!(c.pool_size, 10);
    assert_eq!(c.admin_users, vec!["postgres".to_owned()]);
    let prom: serde_yaml::Value = serde_yaml::from_str(&read("docker/prometheus.yml")).unwrap();
    assert_eq!(
        prom["scrape_configs"][0]["static_configs"][0]["targets"][0],
        "pgsluice:9127"
    );
    let rules = compose["services"]["prometheus"]["volumes"][1]
        .as_str()
        .unwrap();
    let rules_file = rules.split(':').next().unwrap().trim_start_matches("../");
    assert!(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(rules_file)
            .exists(),
        "{rules_file}"
    );
}

#[test]
fn dockerfile_builds_what_the_docs_say() {
    let d = read("docker/Dockerfile");
    assert!(d.contains("cargo build --release --locked --bin pgsluice"));
    assert!(d.contains("STOPSIGNAL SIGTERM"));
    assert!(d.contains("USER 10001"), "runs as a non-root user");
    assert!(d.contains("HEALTHCHECK"));
    let docs = read("docs/deploy/docker.md");
    assert!(
        docs.contains("cargo build --release --locked --bin pgsluice"),
        "docs/deploy/docker.md names the build command"
    );
    // The health check command exists in the binary.
    let out = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .args(["health", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn health_command_checks_the_endpoint() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let out = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .args([
            "health",
            "--url",
            &format!("http://127.0.0.1:{port}/readyz"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "nothing listens: unhealthy");
    // A tiny HTTP server answering 200, then 503.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        use std::io::{Read, Write};
        for status in ["200 OK", "503 Service Unavailable"] {
            let (mut s, _) = server.accept().unwrap();
            // Read the whole request, so closing does not reset the connection.
            let mut req = Vec::new();
            let mut buf = [0u8; 512];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            // In pieces, as some servers send it: the status line too.
            for piece in ["HTTP/1.1 ", status, "\r\ncontent-length: 0\r\n\r\n"] {
                s.write_all(piece.as_bytes()).unwrap();
                s.flush().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    });
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_pgsluice"))
            .args([
                "health",
                "--url",
                &format!("http://127.0.0.1:{port}/readyz"),
            ])
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(run(), Some(0));
    assert_eq!(run(), Some(1));
    handle.join().unwrap();
}
