//! The hub path, end to end through a loopback mock of the Hugging Face hub: `--model org/name`
//! and data by task name are downloaded into `HF_HUB_CACHE` on the first run and served from it
//! afterwards; `--offline` refuses what is not cached; an interrupted download is not taken for a
//! complete one; `HF_ENDPOINT`, `HF_TOKEN` and `--revision` are honoured; and 401, 404 and a
//! refused connection are one line naming the repository.
//!
//! The mock ([`MockHub`]) serves the endpoints hf-hub's sync client calls: `GET
//! /{repo}/resolve/{revision}/{file}` (models), `GET /datasets/{repo}/resolve/{revision}/{file}`
//! (with `Range`, `x-repo-commit`, `etag` and `content-range`, as the hub answers) and `GET
//! /api/{models|datasets}/{repo}/revision/{revision}` (the file list). It listens on 127.0.0.1
//! only, handles one connection at a time, and stops when dropped or after five minutes. It
//! serves the demo model and a parquet copy of the demo data (`demo/data/nyu-mll-glue`) from the
//! repository: these tests run anywhere.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One revision of a repository: its commit and its files (name → local path).
#[derive(Clone)]
struct Revision {
    commit: String,
    files: BTreeMap<String, PathBuf>,
}

/// A repository on the mock hub: `models/org/name` or `datasets/org/name`, with its revisions
/// by branch name (a revision may also be asked for by its commit).
#[derive(Clone)]
struct MockRepo {
    kind: &'static str,
    id: String,
    branches: BTreeMap<String, Revision>,
}

impl MockRepo {
    fn revision(&self, asked: &str) -> Option<&Revision> {
        self.branches
            .get(asked)
            .or_else(|| self.branches.values().find(|r| r.commit == asked))
    }
}

/// How the mock behaves.
#[derive(Clone, Default)]
struct Behaviour {
    /// Refuse (401) every request without `Authorization: Bearer <token>`.
    token: Option<String>,
    /// Cut the first full download of this file half-way (the connection closes early).
    interrupt: Option<String>,
}

/// A loopback hub serving `repos`; it records every request line.
struct MockHub {
    endpoint: String,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl MockHub {
    fn start(repos: Vec<MockRepo>, behaviour: Behaviour) -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s, l) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || serve(listener, &repos, behaviour, &s, &l));
        MockHub {
            endpoint,
            stop,
            log,
            thread: Some(thread),
        }
    }

    /// The request lines seen so far.
    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    listener: TcpListener,
    repos: &[MockRepo],
    mut behaviour: Behaviour,
    stop: &AtomicBool,
    log: &Mutex<Vec<String>>,
) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = handle(stream, repos, &mut behaviour, log);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// A parsed request: its path and the headers the mock reads.
struct Request {
    path: String,
    range: Option<String>,
    authorization: Option<String>,
}

fn read_request(stream: &TcpStream) -> std::io::Result<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (mut range, mut authorization) = (None, None);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((&header, ""));
        match name.trim().to_ascii_lowercase().as_str() {
            "range" => range = Some(value.trim().to_string()),
            "authorization" => authorization = Some(value.trim().to_string()),
            _ => {}
        }
    }
    Ok(Request {
        path,
        range,
        authorization,
    })
}

fn handle(
    mut stream: TcpStream,
    repos: &[MockRepo],
    behaviour: &mut Behaviour,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let request = read_request(&stream)?;
    log.lock().unwrap().push(request.path.clone());
    if let Some(token) = &behaviour.token {
        if request.authorization.as_deref() != Some(&format!("Bearer {token}")) {
            return respond(
                &mut stream,
                401,
                &[],
                b"{\"error\":\"Invalid credentials\"}",
            );
        }
    }
    if let Some(rest) = request.path.strip_prefix("/api/") {
        return answer_info(&mut stream, repos, rest);
    }
    let (kind, rest) = match request.path.strip_prefix("/datasets/") {
        Some(rest) => ("datasets", rest),
        None => ("models", &request.path[1..]),
    };
    let Some((id, rest)) = rest.split_once("/resolve/") else {
        return respond(&mut stream, 404, &[], b"not found");
    };
    let (revision, file) = rest.split_once('/').unwrap_or((rest, ""));
    let found = repos
        .iter()
        .find(|r| r.kind == kind && r.id == id)
        .and_then(|r| r.revision(&revision.replace("%2F", "/")))
        .and_then(|r| Some((r, r.files.get(file)?)));
    let Some((revision, path)) = found else {
        return respond(&mut stream, 404, &[("x-error-code", "EntryNotFound")], b"");
    };
    let body = std::fs::read(path)?;
    let start = request
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next()?.parse::<usize>().ok())
        .unwrap_or(0)
        .min(body.len());
    let end = match request.range.as_deref() {
        Some("bytes=0-0") => 1.min(body.len()),
        _ => body.len(),
    };
    let etag = format!("\"{:016x}-{}\"", fnv(&body), body.len());
    let content_range = format!(
        "bytes {start}-{}/{}",
        end.saturating_sub(1).max(start),
        body.len()
    );
    let headers = [
        ("x-repo-commit", revision.commit.as_str()),
        ("etag", etag.as_str()),
        ("content-range", content_range.as_str()),
    ];
    let status = if request.range.is_some() { 206 } else { 200 };
    let part = &body[start..end];
    let cut = end > 1 && behaviour.interrupt.as_deref() == Some(file);
    if cut {
        behaviour.interrupt = None;
        head(&mut stream, status, &headers, part.len())?;
        stream.write_all(&part[..part.len() / 2])?;
        return stream.flush();
    }
    respond(&mut stream, status, &headers, part)
}

/// `GET /api/{models|datasets}/{id}/revision/{revision}`: the commit and the file list.
fn answer_info(stream: &mut TcpStream, repos: &[MockRepo], rest: &str) -> std::io::Result<()> {
    let found = rest.split_once('/').and_then(|(kind, rest)| {
        let (id, revision) = rest.split_once("/revision/")?;
        let repo = repos.iter().find(|r| r.kind == kind && r.id == id)?;
        repo.revision(revision)
    });
    let Some(revision) = found else {
        return respond(stream, 404, &[("x-error-code", "RepoNotFound")], b"");
    };
    let siblings: Vec<Value> = revision
        .files
        .keys()
        .map(|f| json!({ "rfilename": f }))
        .collect();
    let body = json!({ "sha": revision.commit, "siblings": siblings }).to_string();
    respond(
        stream,
        200,
        &[("content-type", "application/json")],
        body.as_bytes(),
    )
}

fn head(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(&str, &str)],
    length: usize,
) -> std::io::Result<()> {
    let mut text =
        format!("HTTP/1.1 {status} Mock\r\ncontent-length: {length}\r\nconnection: close\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("\r\n");
    stream.write_all(text.as_bytes())
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    head(stream, status, headers, body.len())?;
    stream.write_all(body)?;
    stream.flush()?;
    // Drain what the client may still send, so that closing does not reset the connection.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
    let _ = stream.read(&mut [0; 64]);
    Ok(())
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

const MAIN: &str = "0123456789abcdef0123456789abcdef01234567";
const V1: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// The model files of `dir` (config, weights, tokenizer) as a revision at `commit`.
fn model_revision(dir: &Path, commit: &str) -> Revision {
    let files = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    Revision {
        commit: commit.to_string(),
        files,
    }
}

/// The demo SST-2 parquet files, as `nyu-mll/glue` at main.
fn glue_repo() -> MockRepo {
    let revision = Revision {
        commit: "9a8b7c6d5e4f30211203f4e5d6c7b8a9f0e1d2c3".to_string(),
        files: common::demo_hub_dataset().into_iter().collect(),
    };
    MockRepo {
        kind: "datasets",
        id: "nyu-mll/glue".to_string(),
        branches: BTreeMap::from([("main".to_string(), revision)]),
    }
}

/// The model `org/minilm` serving `model`: main is it; branch `v1` the same weights with its
/// labels renamed (so a test can tell which revision it got).
fn model_repo(model: &Path, v1_dir: &Path) -> MockRepo {
    let model = model.to_path_buf();
    for entry in std::fs::read_dir(&model).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, v1_dir.join(path.file_name().unwrap())).unwrap();
    }
    let config = std::fs::read_to_string(model.join("config.json")).unwrap();
    let renamed = config
        .replace("\"negative\"", "\"neg\"")
        .replace("\"positive\"", "\"pos\"");
    std::fs::write(v1_dir.join("config.json"), renamed).unwrap();
    MockRepo {
        kind: "models",
        id: "org/minilm".to_string(),
        branches: BTreeMap::from([
            ("main".to_string(), model_revision(&model, MAIN)),
            ("v1".to_string(), model_revision(v1_dir, V1)),
        ]),
    }
}

/// The mock hub serving the demo model as `org/minilm` (with its `v1` branch, whose files live
/// in the returned directory), behaving as `behaviour` says.
fn demo_hub(behaviour: Behaviour) -> (MockHub, tempfile::TempDir) {
    let v1 = tempfile::tempdir().unwrap();
    let hub = MockHub::start(
        vec![model_repo(&common::demo_model(), v1.path())],
        behaviour,
    );
    (hub, v1)
}

/// A user's machine: an empty hub cache and `HF_HOME`, the mock as `HF_ENDPOINT`.
struct Machine {
    home: tempfile::TempDir,
}

impl Machine {
    fn new() -> Machine {
        Machine {
            home: tempfile::tempdir().unwrap(),
        }
    }

    fn cache(&self) -> PathBuf {
        self.home.path().join("hub")
    }

    fn run(&self, endpoint: &str, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let (home, cache) = (self.home.path().to_str().unwrap(), self.cache());
        let mut env = vec![
            ("HF_HOME", home),
            ("HF_HUB_CACHE", cache.to_str().unwrap()),
            ("HF_ENDPOINT", endpoint),
        ];
        env.extend_from_slice(extra);
        common::run_with_env(args, &env)
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_hub_id_and_task_data_download_into_the_cache_once_then_run_from_it() {
    let v1 = tempfile::tempdir().unwrap();
    let hub = MockHub::start(
        vec![model_repo(&common::demo_model(), v1.path()), glue_repo()],
        Behaviour::default(),
    );
    let machine = Machine::new();
    let eval = [
        "eval",
        "--model",
        "org/minilm",
        "--task",
        "sst2",
        "--json",
        "-q",
    ];
    let first = common::json_stdout(&machine.run(&hub.endpoint, &eval, &[]));
    let requests = hub.requests();
    for wanted in [
        "/org/minilm/resolve/main/config.json",
        "/org/minilm/resolve/main/model.safetensors",
        "/api/datasets/nyu-mll/glue/revision/main",
        "/datasets/nyu-mll/glue/resolve/main/sst2/validation-00000-of-00001.parquet",
    ] {
        assert!(
            requests.iter().any(|r| r == wanted),
            "{wanted}: {requests:?}"
        );
    }
    let snapshot = machine
        .cache()
        .join("models--org--minilm/snapshots")
        .join(MAIN);
    assert!(snapshot.join("model.safetensors").is_file());
    // The same accuracy as the demo model directory and its TSV dev set.
    let local = common::eval_json(&common::demo_model(), "sst2", &common::demo_sst2());
    assert_eq!(first["metrics"], local["metrics"], "{first}");
    // The second run is served from the cache: the hub is gone, and nothing is asked of it.
    drop(hub);
    let gone = "http://127.0.0.1:9";
    let second = common::json_stdout(&machine.run(gone, &eval, &[]));
    assert_eq!(second["metrics"], first["metrics"]);
}

#[test]
fn offline_refuses_what_is_not_cached_with_one_line() {
    let (hub, _v1) = demo_hub(Behaviour::default());
    let machine = Machine::new();
    let inspect = ["inspect", "--model", "org/minilm", "--json"];
    for (flag, env) in [("--offline", vec![]), ("", vec![("HF_HUB_OFFLINE", "1")])] {
        let mut args = inspect.to_vec();
        if !flag.is_empty() {
            args.push(flag);
        }
        let out = machine.run(&hub.endpoint, &args, &env);
        common::assert_clean_error(&out, &["org/minilm", "offline", "no complete copy"]);
    }
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
    // Online it downloads; offline it is then served from the cache.
    common::json_stdout(&machine.run(&hub.endpoint, &inspect, &[]));
    let mut offline = inspect.to_vec();
    offline.push("--offline");
    common::json_stdout(&machine.run(&hub.endpoint, &offline, &[]));
}

#[test]
fn a_recovery_teacher_on_the_hub_is_fetched_as_the_run_is_told() {
    let (hub, _v1) = demo_hub(Behaviour::default());
    let machine = Machine::new();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    let text = format!(
        "model = {:?}\ndata = {:?}\ntask = \"sst2\"\n\n[[stages]]\npass = \"recover\"\nteacher = \"org/minilm\"\n",
        common::demo_model(),
        common::demo_sst2(),
    );
    std::fs::write(&config, text).unwrap();
    let out = dir.path().join("out");
    let args = [
        "compress",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--offline",
        "-q",
    ];
    // --offline reaches the teacher: refused before any stage, and the hub is never asked.
    let refused = machine.run(&hub.endpoint, &args, &[]);
    common::assert_clean_error(
        &refused,
        &["teacher org/minilm", "offline", "no complete copy"],
    );
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
    assert!(!out.exists());
}

#[test]
fn an_interrupted_download_is_not_taken_for_a_complete_one() {
    let (hub, _v1) = demo_hub(Behaviour {
        interrupt: Some("model.safetensors".to_string()),
        ..Behaviour::default()
    });
    let machine = Machine::new();
    let inspect = ["inspect", "--model", "org/minilm", "--json"];
    let cut = machine.run(&hub.endpoint, &inspect, &[]);
    common::assert_clean_error(&cut, &["org/minilm", "model.safetensors"]);
    // Offline, the partial copy is not a model.
    let mut offline = inspect.to_vec();
    offline.push("--offline");
    let out = machine.run(&hub.endpoint, &offline, &[]);
    common::assert_clean_error(&out, &["no complete copy"]);
    // Online again, the download completes (resuming the part) and the weights are whole.
    let report = common::json_stdout(&machine.run(&hub.endpoint, &inspect, &[]));
    let dir = PathBuf::from(report["dir"].as_str().unwrap());
    let fetched = std::fs::read(dir.join("model.safetensors")).unwrap();
    let original = std::fs::read(common::demo_model().join("model.safetensors")).unwrap();
    assert!(
        fetched == original,
        "the weights differ from the served file"
    );
}

#[test]
fn revision_selects_a_branch_or_a_commit() {
    let (hub, _v1) = demo_hub(Behaviour::default());
    let machine = Machine::new();
    let labels = |revision: Option<&str>| {
        let mut args = vec!["inspect", "--model", "org/minilm", "--json"];
        if let Some(r) = revision {
            args.extend(["--revision", r]);
        }
        let report = common::json_stdout(&machine.run(&hub.endpoint, &args, &[]));
        let dir = report["dir"].as_str().unwrap().to_string();
        (report["labels"].clone(), dir)
    };
    let (main, main_dir) = labels(None);
    assert_eq!(main, json!(["negative", "positive"]));
    assert!(main_dir.ends_with(MAIN), "{main_dir}");
    for revision in ["v1", V1] {
        let (got, dir) = labels(Some(revision));
        assert_eq!(got, json!(["neg", "pos"]), "{revision}");
        assert!(dir.ends_with(V1), "{revision}: {dir}");
    }
    let out = machine.run(
        &hub.endpoint,
        &["inspect", "--model", "org/minilm", "--revision", "nope"],
        &[],
    );
    common::assert_clean_error(&out, &["org/minilm", "HTTP 404", "--revision"]);
}

#[test]
fn a_token_is_sent_as_a_bearer_and_errors_name_the_repository() {
    let (hub, _v1) = demo_hub(Behaviour {
        token: Some("hf_secret".to_string()),
        ..Behaviour::default()
    });
    let machine = Machine::new();
    let inspect = ["inspect", "--model", "org/minilm", "--json"];
    let refused = machine.run(&hub.endpoint, &inspect, &[]);
    common::assert_clean_error(&refused, &["org/minilm", "HTTP 401", "HF_TOKEN"]);
    let wrong = machine.run(&hub.endpoint, &inspect, &[("HF_TOKEN", "hf_wrong")]);
    common::assert_clean_error(&wrong, &["HTTP 401"]);
    common::json_stdout(&machine.run(&hub.endpoint, &inspect, &[("HF_TOKEN", "hf_secret")]));
    let missing = ["inspect", "--model", "org/missing", "--json"];
    let out = machine.run(&hub.endpoint, &missing, &[("HF_TOKEN", "hf_secret")]);
    common::assert_clean_error(&out, &["org/missing", "HTTP 404", "repository id"]);
    // Nothing listens on port 9 of the loopback.
    let out = machine.run("http://127.0.0.1:9", &missing, &[]);
    common::assert_clean_error(&out, &["org/missing", "cannot reach the hub"]);
    println!("{}\n{}", stderr(&refused), stderr(&out));
}
