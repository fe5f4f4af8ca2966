//! One QMP (QEMU Machine Protocol) client over the VM's unix socket: connect and negotiate,
//! run commands, and keep the asynchronous events QEMU sends in between for the caller to read.
//!
//! QMP serves one client at a time, so the agent holds one `Qmp` per running VM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, sleep, timeout_at};

/// How long one command may take before the client gives up on QEMU.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Events kept for `events()`; older ones are dropped so a chatty guest cannot grow the agent.
pub const MAX_BUFFERED_EVENTS: usize = 1024;
/// Pause between connection attempts while QEMU has not created its socket yet.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP i/o failed")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("no answer from QMP within {0:?}")]
    Timeout(Duration),
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
}

pub type Result<T, E = QmpError> = std::result::Result<T, E>;

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    greeting: Value,
    events: Vec<Value>,
    next_id: u64,
    command_timeout: Duration,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("greeting", &self.greeting).field("events", &self.events.len()).finish()
    }
}

impl Qmp {
    /// Connects to the socket at `path`, retrying until `timeout` (the socket appears only once
    /// QEMU has started), reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(source) if Instant::now() + CONNECT_RETRY >= deadline => {
                    return Err(QmpError::Connect { path: path.to_path_buf(), source });
                }
                Err(_) => sleep(CONNECT_RETRY).await,
            }
        };
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(read),
            writer,
            greeting: Value::Null,
            events: Vec::new(),
            next_id: 0,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        };
        let greeting =
            timeout_at(deadline, qmp.read_message()).await.map_err(|_| QmpError::Timeout(timeout))??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("expected the QMP greeting, got {greeting}")));
        }
        qmp.greeting = greeting;
        qmp.execute("qmp_capabilities", None).await?;
        tracing::debug!(path = %path.display(), "QMP connected");
        Ok(qmp)
    }

    /// Sets how long `execute` waits for a reply.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// The greeting QEMU sent (`{"QMP": {"version": …, "capabilities": […]}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Runs `command` and returns its `return` value. Events that arrive meanwhile are buffered.
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = args {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        tracing::trace!(command, id, "QMP request");
        self.writer.write_all(line.as_bytes()).await?;

        let limit = self.command_timeout;
        let reply = tokio::time::timeout(limit, self.read_reply(id))
            .await
            .map_err(|_| QmpError::Timeout(limit))??;
        if let Some(value) = reply.get("return") {
            return Ok(value.clone());
        }
        let error = &reply["error"];
        Err(QmpError::Command {
            command: command.to_string(),
            class: error["class"].as_str().unwrap_or("GenericError").to_string(),
            desc: error["desc"].as_str().unwrap_or_default().to_string(),
        })
    }

    /// `running`, `paused`, `shutdown`, `prelaunch`, `inmigrate`, `postmigrate`, …
    pub async fn query_status(&mut self) -> Result<String> {
        let status = self.execute("query-status", None).await?;
        status["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(format!("query-status without status: {status}")))
    }

    /// Asks the guest to shut down (ACPI power button); the guest may ignore it.
    pub async fn powerdown(&mut self) -> Result<()> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// Pauses the vCPUs.
    pub async fn stop(&mut self) -> Result<()> {
        self.execute("stop", None).await.map(drop)
    }

    /// Resumes paused vCPUs (also starts a VM launched with `-S`).
    pub async fn cont(&mut self) -> Result<()> {
        self.execute("cont", None).await.map(drop)
    }

    /// Hard reset, like the reset button.
    pub async fn reset(&mut self) -> Result<()> {
        self.execute("system_reset", None).await.map(drop)
    }

    /// Ends QEMU at once (no guest shutdown). QEMU may close the socket before it answers,
    /// which counts as success too.
    pub async fn quit(&mut self) -> Result<()> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Guest RAM at boot in bytes (`query-memory-size-summary` base-memory; hot-plugged DIMMs
    /// are not counted).
    pub async fn memory_size(&mut self) -> Result<u64> {
        let summary = self.execute("query-memory-size-summary", None).await?;
        summary["base-memory"]
            .as_u64()
            .ok_or_else(|| QmpError::Protocol(format!("memory summary without base-memory: {summary}")))
    }

    /// Sets the balloon target: the guest is asked to give back memory above `bytes`.
    pub async fn set_balloon(&mut self, bytes: u64) -> Result<()> {
        self.execute("balloon", Some(json!({ "value": bytes }))).await.map(drop)
    }

    /// Memory the guest currently has, in bytes, as the balloon driver reports it.
    pub async fn balloon_actual(&mut self) -> Result<u64> {
        let info = self.execute("query-balloon", None).await?;
        info["actual"]
            .as_u64()
            .ok_or_else(|| QmpError::Protocol(format!("query-balloon without actual: {info}")))
    }

    /// Sets the link state of a NIC (`net0`); a NIC with `linkDown` is started and then set down.
    pub async fn set_link(&mut self, nic: &str, up: bool) -> Result<()> {
        self.execute("set_link", Some(json!({ "name": nic, "up": up }))).await.map(drop)
    }

    /// Events received so far, oldest first (at most `MAX_BUFFERED_EVENTS`).
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// Returns and forgets the buffered events.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Waits for an event named `name` (`SHUTDOWN`, `STOP`, …), looking at the buffer first.
    /// The event is removed from the buffer and returned.
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        if let Some(pos) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(pos));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let message =
                timeout_at(deadline, self.read_message()).await.map_err(|_| QmpError::Timeout(timeout))??;
            if message["event"] == name {
                return Ok(message);
            }
            if message.get("event").is_some() {
                self.buffer_event(message);
            }
            // A late reply to a command that timed out earlier is of no use to anyone.
        }
    }

    async fn read_reply(&mut self, id: u64) -> Result<Value> {
        loop {
            let message = self.read_message().await?;
            if message.get("event").is_some() {
                self.buffer_event(message);
                continue;
            }
            if message.get("return").is_none() && message.get("error").is_none() {
                return Err(QmpError::Protocol(message.to_string()));
            }
            // Replies carry our id back; one without an id answers a request QEMU could not
            // even parse, which can only be the current one.
            match message.get("id").and_then(Value::as_u64) {
                Some(got) if got != id => {
                    tracing::debug!(got, want = id, "dropping QMP reply to an abandoned command");
                }
                _ => return Ok(message),
            }
        }
    }

    async fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(QmpError::Closed);
            }
            if !line.trim().is_empty() {
                break;
            }
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {}", line.trim_end())))
    }

    fn buffer_event(&mut self, event: Value) {
        tracing::debug!(event = %event["event"], "QMP event");
        if self.events.len() >= MAX_BUFFERED_EVENTS {
            self.events.remove(0);
        }
        self.events.push(event);
    }
}

#[cfg(test)]
mod tests {
    //! Protocol handling against a scripted peer; the real-QEMU tests are in tests/qemu.rs.

    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("kpve-qmp-{}-{name}.sock", std::process::id()))
    }

    /// Answers each request with `reply(request)` lines, after a greeting.
    async fn fake_qemu(path: PathBuf, reply: fn(&Value) -> Vec<String>) {
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            write.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n").await.unwrap();
            while let Ok(Some(line)) = lines.next_line().await {
                let request: Value = serde_json::from_str(&line).unwrap();
                for out in reply(&request) {
                    write.write_all(format!("{out}\r\n").as_bytes()).await.unwrap();
                }
            }
        });
    }

    #[tokio::test]
    async fn events_are_buffered_and_stale_replies_skipped() {
        let path = socket_path("events");
        fake_qemu(path.clone(), |req| {
            let id = &req["id"];
            match req["execute"].as_str().unwrap() {
                "query-status" => vec![
                    json!({"event": "RESUME", "timestamp": {}}).to_string(),
                    json!({"return": {}, "id": 999}).to_string(),
                    json!({"return": {"status": "running", "running": true}, "id": id}).to_string(),
                ],
                "bogus" => vec![
                    json!({"error": {"class": "CommandNotFound", "desc": "The command bogus has not been found"}, "id": id})
                        .to_string(),
                ],
                _ => vec![json!({"return": {}, "id": id}).to_string()],
            }
        })
        .await;
        let mut qmp = Qmp::connect(&path, Duration::from_secs(2)).await.unwrap();
        assert_eq!(qmp.query_status().await.unwrap(), "running");
        assert_eq!(qmp.events().len(), 1);
        assert_eq!(qmp.events()[0]["event"], "RESUME");
        let e = qmp.execute("bogus", None).await.unwrap_err();
        assert!(matches!(&e, QmpError::Command { class, .. } if class == "CommandNotFound"), "{e}");
        let event = qmp.wait_event("RESUME", Duration::from_millis(10)).await.unwrap();
        assert_eq!(event["event"], "RESUME");
        assert!(qmp.events().is_empty());
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let path = socket_path("silent");
        fake_qemu(path.clone(), |req| match req["execute"].as_str().unwrap() {
            "qmp_capabilities" => vec![json!({"return": {}, "id": req["id"]}).to_string()],
            _ => vec![],
        })
        .await;
        let mut qmp = Qmp::connect(&path, Duration::from_secs(2)).await.unwrap();
        qmp.set_command_timeout(Duration::from_millis(100));
        assert!(matches!(qmp.stop().await, Err(QmpError::Timeout(_))));
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn missing_socket_fails_after_the_timeout() {
        let path = socket_path("absent");
        let started = Instant::now();
        let e = Qmp::connect(&path, Duration::from_millis(200)).await.unwrap_err();
        assert!(matches!(e, QmpError::Connect { .. }), "{e}");
        assert!(started.elapsed() >= Duration::from_millis(150));
    }
}
