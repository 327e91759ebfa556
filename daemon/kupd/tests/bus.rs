//! kupd on a private dbus-daemon, with a fake engine and a fake polkit: the D-Bus contract end
//! to end (kupctl's client code included). Skipped, with a note, where dbus-daemon is missing.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use kup_dbus::{
    ERROR_BUSY, ERROR_INVALID_ARGS, ERROR_NOT_AUTHORIZED, ERROR_REFUSED, Manager1Proxy,
    StatusReport, UnitReport, Update1Proxy, error_name, phase,
};
use kupctl::{ClientError, Outcome, Reporter};
use kupd::{
    Authority, BoxFuture, Decision, Engine, EngineError, Plan, ServeError, UpdateOptions, serve,
};
use zbus::proxy::CacheProperties;
use zbus::{Connection, OwnedObjectPath, Variant};
use zbus_polkit::policykit1::Subject;

const TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// A private bus.

struct Bus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dbus_daemon() -> Option<PathBuf> {
    ["/usr/bin/dbus-daemon", "/bin/dbus-daemon"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Starts a dbus-daemon that includes kup's own bus policy (so a syntax error in it fails here).
fn start_bus() -> Option<Bus> {
    let Some(daemon) = dbus_daemon() else {
        eprintln!("SKIPPED: dbus-daemon is not installed (apt-get install dbus-daemon)");
        return None;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../data/dbus-1/system.d/org.kup.Manager1.conf")
        .canonicalize()
        .expect("kup's bus policy file exists");
    let config = dir.path().join("bus.conf");
    let mut file = std::fs::File::create(&config).expect("config");
    write!(
        file,
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
  <include>{}</include>
</busconfig>
"#,
        dir.path().display(),
        policy.display()
    )
    .expect("write config");
    drop(file);
    let mut child = Command::new(daemon)
        .arg(format!("--config-file={}", config.display()))
        .args(["--nofork", "--print-address=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("dbus-daemon starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut address = String::new();
    BufReader::new(stdout)
        .read_line(&mut address)
        .expect("dbus-daemon prints its address");
    let address = address.trim().to_owned();
    assert!(!address.is_empty(), "dbus-daemon printed no address");
    Some(Bus {
        child,
        address,
        _dir: dir,
    })
}

async fn connect(bus: &Bus) -> Connection {
    zbus::connection::Builder::address(bus.address.as_str())
        .build()
        .await
        .expect("connects to the private bus")
}

// ---------------------------------------------------------------------------------------------
// Fakes.

/// Allows or denies everyone, as switched.
#[derive(Debug, Default)]
struct FakeAuthority {
    deny: AtomicBool,
    checks: AtomicUsize,
}

impl Authority for FakeAuthority {
    fn check<'a>(
        &'a self,
        subject: &'a Subject,
        action: &'a str,
    ) -> BoxFuture<'a, Result<Decision, kupd::AuthorityError>> {
        assert_eq!(subject.kind(), "system-bus-name");
        assert_eq!(action, kup_dbus::ACTION_UPDATE);
        self.checks.fetch_add(1, Ordering::SeqCst);
        let deny = self.deny.load(Ordering::SeqCst);
        Box::pin(async move {
            Ok(if deny {
                Decision::Denied
            } else {
                Decision::Allowed
            })
        })
    }
}

/// A gate the engine waits at until the test opens it.
#[derive(Debug, Default)]
struct Gate {
    open: Mutex<bool>,
    cond: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().expect("gate");
        while !*open {
            open = self.cond.wait(open).expect("gate");
        }
    }
    fn open(&self) {
        *self.open.lock().expect("gate") = true;
        self.cond.notify_all();
    }
}

/// Targets steer it: `refuse` is refused by plan; `fail` fails after preflight; `hold` waits at
/// the gate after stage; `hold-switch` waits at the gate in the switch phase; anything else
/// runs stage, preflight, dump, switch and succeeds. `""` resolves to `9.9.9-fake`.
#[derive(Debug, Default)]
struct FakeEngine {
    gate: Gate,
    plans: Mutex<Vec<(String, UpdateOptions)>>,
}

impl Engine for FakeEngine {
    fn plan(&self, target: &str, options: &UpdateOptions) -> Result<Plan, EngineError> {
        self.plans
            .lock()
            .expect("plans")
            .push((target.to_owned(), options.clone()));
        match target {
            "refuse" => Err(EngineError::Refused(
                "fake: kernel refuse is not installed: install linux-image-refuse".into(),
            )),
            "" => Ok(Plan::new("9.9.9-fake")),
            other => Ok(Plan::with_data(other, options.append.clone())),
        }
    }

    fn run(&self, plan: Plan, progress: &dyn Fn(&str, u32)) -> Result<(), EngineError> {
        progress(phase::STAGE, 10);
        if plan.target == "hold" {
            self.gate.wait();
        }
        progress(phase::PREFLIGHT, 30);
        if plan.target == "fail" {
            return Err(EngineError::Failed(
                "fake: memcached.service cannot be dumped: see criu.log".into(),
            ));
        }
        progress(phase::DUMP, 60);
        progress(phase::SWITCH, 90);
        if plan.target == "hold-switch" {
            self.gate.wait();
        }
        Ok(())
    }

    fn run_cancellable(
        &self,
        plan: Plan,
        progress: &dyn Fn(&str, u32),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), EngineError> {
        // Like `run`, with a cancellation check at each boundary before the switch.
        let stop = || cancelled().then(|| EngineError::cancelled(&plan.target));
        progress(phase::STAGE, 10);
        if plan.target == "hold" {
            self.gate.wait();
        }
        if let Some(err) = stop() {
            return Err(err);
        }
        progress(phase::PREFLIGHT, 30);
        if plan.target == "fail" {
            return Err(EngineError::Failed(
                "fake: memcached.service cannot be dumped: see criu.log".into(),
            ));
        }
        if let Some(err) = stop() {
            return Err(err);
        }
        progress(phase::DUMP, 60);
        if let Some(err) = stop() {
            return Err(err);
        }
        progress(phase::SWITCH, 90);
        if plan.target == "hold-switch" {
            self.gate.wait();
        }
        Ok(())
    }

    fn status(&self) -> StatusReport {
        StatusReport {
            running_kernel: "6.12.107-fake".into(),
            default_target: Some("9.9.9-fake".into()),
            marked_units: 1,
            ..StatusReport::default()
        }
    }

    fn units(&self) -> Vec<UnitReport> {
        vec![UnitReport {
            name: "memcached.service".into(),
            checkpointable: true,
            reason: String::new(),
        }]
    }

    fn dry_run(&self, target: &str) -> Result<kup_dbus::DryRunReport, EngineError> {
        Ok(kup_dbus::DryRunReport {
            target: target.to_owned(),
            units: vec![kup_dbus::DryRunUnit {
                name: "memcached.service".into(),
                restorable: true,
                ..kup_dbus::DryRunUnit::default()
            }],
            ..kup_dbus::DryRunReport::default()
        })
    }
}

/// Opens the engine's gate when dropped, so a failing test never leaves a blocking thread
/// waiting (the runtime would wait for it forever).
struct OpenOnDrop(Arc<FakeEngine>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.gate.open();
    }
}

struct Setup {
    bus: Bus,
    server: Connection,
    client: Connection,
    engine: Arc<FakeEngine>,
    authority: Arc<FakeAuthority>,
    _open_on_drop: OpenOnDrop,
}

async fn setup() -> Option<Setup> {
    let bus = start_bus()?;
    let server = connect(&bus).await;
    let engine = Arc::new(FakeEngine::default());
    let authority = Arc::new(FakeAuthority::default());
    serve(&server, engine.clone(), authority.clone())
        .await
        .expect("kupd serves");
    let client = connect(&bus).await;
    Some(Setup {
        bus,
        server,
        client,
        _open_on_drop: OpenOnDrop(engine.clone()),
        engine,
        authority,
    })
}

async fn update(
    conn: &Connection,
    target: &str,
    options: HashMap<&str, Variant<'_>>,
) -> zbus::Result<OwnedObjectPath> {
    Manager1Proxy::new(conn)
        .await
        .expect("proxy")
        .update(target, options)
        .await
}

async fn update_proxy<'a>(conn: &'a Connection, path: &OwnedObjectPath) -> Update1Proxy<'a> {
    Update1Proxy::builder(conn)
        .path(path.clone())
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .expect("update proxy")
}

async fn status(conn: &Connection) -> StatusReport {
    let json = Manager1Proxy::new(conn)
        .await
        .expect("proxy")
        .status()
        .await
        .expect("Status");
    StatusReport::from_json(&json).expect("status JSON")
}

/// Waits until the running update reaches `phase` (by polling Status).
async fn wait_for_phase(conn: &Connection, wanted: &str) {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let status = status(conn).await;
            if status
                .active_update
                .as_ref()
                .is_some_and(|u| u.phase == wanted)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the update never reached phase {wanted}"));
}

/// A writer that tells when kupctl wrote its first line (it has subscribed by then).
struct Notifying(Option<tokio::sync::oneshot::Sender<()>>);

impl Write for Notifying {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `kupctl::follow` in a task and returns once it has subscribed to the update.
async fn spawn_follow(
    client: &Connection,
    path: OwnedObjectPath,
) -> tokio::task::JoinHandle<Result<Outcome, ClientError>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let client = client.clone();
    let task = tokio::spawn(async move {
        let mut reporter = Reporter::lines(Notifying(Some(tx)));
        kupctl::follow(&client, path, &mut reporter).await
    });
    tokio::time::timeout(TIMEOUT, rx)
        .await
        .expect("kupctl follows")
        .expect("kupctl wrote");
    task
}

fn assert_dbus_error(result: zbus::Result<OwnedObjectPath>, name: &str) -> String {
    let err = result.expect_err("kupd refuses");
    assert_eq!(error_name(&err).as_deref(), Some(name), "{err}");
    match err {
        zbus::Error::MethodError(_, Some(message), _) => message,
        other => panic!("no message in {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_returns_a_path_then_progress_and_finished_arrive() {
    let Some(s) = setup().await else { return };
    let mut options = HashMap::new();
    options.insert(kup_dbus::options::APPEND, Variant::from("quiet"));
    let path = update(&s.client, "hold", options).await.expect("Update");
    assert_eq!(path.as_str(), "/org/kup/Manager1/update/1");

    let proxy = update_proxy(&s.client, &path).await;
    let mut progress = proxy.receive_progress().await.expect("subscribe Progress");
    let mut finished = proxy.receive_finished().await.expect("subscribe Finished");
    assert_eq!(proxy.target().await.expect("Target"), "hold");
    wait_for_phase(&s.client, phase::STAGE).await;
    s.engine.gate.open();

    let mut seen = Vec::new();
    let (success, message) = tokio::time::timeout(TIMEOUT, async {
        loop {
            tokio::select! {
                biased;
                Some(signal) = progress.next() => {
                    let args = signal.args().expect("Progress args");
                    seen.push((args.phase().to_string(), *args.percentage()));
                }
                Some(signal) = finished.next() => {
                    let args = signal.args().expect("Finished args");
                    return (*args.success(), args.message().to_string());
                }
            }
        }
    })
    .await
    .expect("Finished arrives");
    assert!(success, "{message}");
    assert!(message.contains("hold"), "{message}");
    // Progress after the gate is certain; the first one may have come before the subscription.
    let tail: Vec<_> = seen
        .iter()
        .filter(|(p, _)| p != phase::STAGE)
        .cloned()
        .collect();
    assert_eq!(
        tail,
        vec![
            (phase::PREFLIGHT.to_owned(), 30),
            (phase::DUMP.to_owned(), 60),
            (phase::SWITCH.to_owned(), 90),
        ]
    );
    assert_eq!(proxy.phase().await.expect("Phase"), phase::DONE);
    assert_eq!(proxy.percentage().await.expect("Percentage"), 100);
    assert_eq!(proxy.message().await.expect("Message"), message);

    let plans = s.engine.plans.lock().expect("plans").clone();
    assert_eq!(plans.len(), 1);
    assert_eq!(plans[0].1.append.as_deref(), Some("quiet"));

    let status = status(&s.client).await;
    assert_eq!(status.active_update, None);
    let last = status.last_update.expect("last update");
    assert!(last.success);
    assert_eq!(last.path, path.as_str());
    assert_eq!(status.daemon_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(status.running_kernel, "6.12.107-fake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_caller_gets_not_authorized_and_nothing_runs() {
    let Some(s) = setup().await else { return };
    s.authority.deny.store(true, Ordering::SeqCst);
    let message = assert_dbus_error(
        update(&s.client, "7.3.4", HashMap::new()).await,
        ERROR_NOT_AUTHORIZED,
    );
    let me = s.client.unique_name().expect("unique name").to_string();
    assert!(message.contains(&me), "names the caller: {message}");
    assert!(message.contains("uid "), "names the uid: {message}");
    assert!(
        message.ends_with("ask an administrator to grant org.kup.update (polkit rule)"),
        "{message}"
    );
    assert_eq!(s.authority.checks.load(Ordering::SeqCst), 1);
    assert!(s.engine.plans.lock().expect("plans").is_empty());
    assert_eq!(status(&s.client).await.active_update, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_update_while_one_runs_is_busy() {
    let Some(s) = setup().await else { return };
    let first = update(&s.client, "hold", HashMap::new())
        .await
        .expect("first Update");
    wait_for_phase(&s.client, phase::STAGE).await;

    let other = connect(&s.bus).await;
    let message = assert_dbus_error(update(&other, "7.3.4", HashMap::new()).await, ERROR_BUSY);
    assert!(message.contains(first.as_str()), "{message}");
    assert!(message.contains("kupctl status"), "{message}");

    // Once the first ends, the slot is free again.
    let proxy = update_proxy(&s.client, &first).await;
    let mut finished = proxy.receive_finished().await.expect("subscribe");
    s.engine.gate.open();
    if proxy.phase().await.expect("Phase") != phase::DONE {
        tokio::time::timeout(TIMEOUT, finished.next())
            .await
            .expect("Finished arrives");
    }
    let second = update(&other, "7.3.4", HashMap::new())
        .await
        .expect("Update after the first finished");
    assert_eq!(second.as_str(), "/org/kup/Manager1/update/2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_bad_options_come_back_as_errors_and_free_the_slot() {
    let Some(s) = setup().await else { return };
    let message = assert_dbus_error(
        update(&s.client, "refuse", HashMap::new()).await,
        ERROR_REFUSED,
    );
    assert_eq!(
        message,
        "fake: kernel refuse is not installed: install linux-image-refuse"
    );

    let mut bad = HashMap::new();
    bad.insert("apend", Variant::from("quiet"));
    let message = assert_dbus_error(update(&s.client, "7.3.4", bad).await, ERROR_INVALID_ARGS);
    assert!(message.contains("'apend'"), "{message}");

    let mut mistyped = HashMap::new();
    mistyped.insert(kup_dbus::options::APPEND, Variant::from(7u32));
    assert_dbus_error(
        update(&s.client, "7.3.4", mistyped).await,
        ERROR_INVALID_ARGS,
    );

    assert_eq!(status(&s.client).await.active_update, None);
    let mut reporter = Reporter::lines(std::io::sink());
    let path = kupctl::start(&s.client, None, None).await.expect("Update");
    let outcome = kupctl::follow(&s.client, path, &mut reporter)
        .await
        .expect("succeeds");
    assert!(
        matches!(&outcome, Outcome::Done { target, .. } if target == "9.9.9-fake"),
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kupctl_reports_kupd_errors_and_failures_in_kupds_words() {
    let Some(s) = setup().await else { return };
    let err = kupctl::start(&s.client, Some("refuse"), None)
        .await
        .expect_err("refused");
    assert_eq!(err.kupd_error_name(), Some(ERROR_REFUSED));
    assert_eq!(
        err.to_string(),
        "fake: kernel refuse is not installed: install linux-image-refuse"
    );

    let path = kupctl::start(&s.client, Some("fail"), Some("quiet"))
        .await
        .expect("Update");
    let mut reporter = Reporter::lines(std::io::sink());
    let err = kupctl::follow(&s.client, path.clone(), &mut reporter)
        .await
        .expect_err("fails");
    assert!(
        matches!(&err, ClientError::UpdateFailed(m) if m.contains("cannot be dumped")),
        "{err}"
    );
    let proxy = update_proxy(&s.client, &path).await;
    assert_eq!(proxy.phase().await.expect("Phase"), phase::FAILED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_kupd_during_the_switch_is_success_and_before_it_is_an_error() {
    let Some(s) = setup().await else { return };
    let path = kupctl::start(&s.client, Some("hold-switch"), None)
        .await
        .expect("Update");
    wait_for_phase(&s.client, phase::SWITCH).await;
    let follower = spawn_follow(&s.client, path).await;
    // The follower has subscribed; now kupd "kexecs away".
    s.server.close().await.expect("close kupd's connection");
    let outcome = tokio::time::timeout(TIMEOUT, follower)
        .await
        .expect("follow ends")
        .expect("no panic")
        .expect("success in progress");
    assert_eq!(
        outcome,
        Outcome::Switching {
            target: "hold-switch".into()
        }
    );
    s.engine.gate.open();

    // Before the switch, losing kupd is an error.
    let server = connect(&s.bus).await;
    let engine = Arc::new(FakeEngine::default());
    let _open_on_drop = OpenOnDrop(engine.clone());
    serve(&server, engine.clone(), Arc::new(FakeAuthority::default()))
        .await
        .expect("kupd serves again");
    let path = kupctl::start(&s.client, Some("hold"), None)
        .await
        .expect("Update");
    wait_for_phase(&s.client, phase::STAGE).await;
    let follower = spawn_follow(&s.client, path).await;
    server.close().await.expect("close kupd's connection");
    let err = tokio::time::timeout(TIMEOUT, follower)
        .await
        .expect("follow ends")
        .expect("no panic")
        .expect_err("kupd lost before the switch");
    assert!(
        matches!(&err, ClientError::Lost { phase, .. } if phase == phase::STAGE),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_and_status_are_json_and_a_second_kupd_cannot_take_the_name() {
    let Some(s) = setup().await else { return };
    let json = Manager1Proxy::new(&s.client)
        .await
        .expect("proxy")
        .units()
        .await
        .expect("Units");
    let units = UnitReport::list_from_json(&json).expect("units JSON");
    assert_eq!(units.len(), 1);
    assert_eq!(units[0].name, "memcached.service");
    assert!(units[0].checkpointable);

    let status = status(&s.client).await;
    assert_eq!(status.default_target.as_deref(), Some("9.9.9-fake"));
    assert_eq!(status.last_update, None);

    let second = connect(&s.bus).await;
    let err = serve(
        &second,
        Arc::new(FakeEngine::default()),
        Arc::new(FakeAuthority::default()),
    )
    .await
    .expect_err("the name is taken");
    assert!(matches!(err, ServeError::NameTaken), "{err}");
    assert!(err.to_string().contains("systemctl status kupd"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kupctl_says_kupd_is_not_running_when_nobody_owns_the_name() {
    let Some(bus) = start_bus() else { return };
    let client = connect(&bus).await;
    let err = kupctl::start(&client, None, None)
        .await
        .expect_err("no kupd");
    assert!(matches!(err, ClientError::NotRunning(_)), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("kupd is not running: systemctl start kupd"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// The documented interface, CanUpdate and Cancel.

/// The `<interface name="NAME">` element of an introspection document, comments dropped and
/// whitespace normalized (one tag per line), so layout does not matter but content does.
fn interface_element(xml: &str, name: &str) -> Option<String> {
    let mut text = String::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<!--") {
        text.push_str(&rest[..start]);
        let end = rest[start..].find("-->")? + start + 3;
        rest = &rest[end..];
    }
    text.push_str(rest);
    let open = format!("<interface name=\"{name}\">");
    let start = text.find(&open)?;
    let end = text[start..].find("</interface>")? + start + "</interface>".len();
    let element = &text[start..end];
    Some(
        element
            .replace('>', ">\n")
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_interfaces_match_the_checked_in_introspection_xml() {
    let Some(s) = setup().await else { return };
    let path = update(&s.client, "hold", HashMap::new())
        .await
        .expect("Update");
    let introspect = |object: String| {
        let conn = s.client.clone();
        async move {
            zbus::fdo::IntrospectableProxy::builder(&conn)
                .destination(kup_dbus::BUS_NAME)
                .path(object)
                .cache_properties(CacheProperties::No)
                .build()
                .await
                .expect("introspectable proxy")
                .introspect()
                .await
                .expect("Introspect")
                .to_string()
        }
    };
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/dbus-1/interfaces");
    for (object, name) in [
        (
            kup_dbus::MANAGER_PATH.to_owned(),
            kup_dbus::MANAGER_INTERFACE,
        ),
        (path.to_string(), kup_dbus::UPDATE_INTERFACE),
    ] {
        let live = introspect(object.clone()).await;
        let live = interface_element(&live, name)
            .unwrap_or_else(|| panic!("{object} does not serve {name}:\n{live}"));
        let file = data.join(format!("{name}.xml"));
        let doc =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let documented = interface_element(&doc, name)
            .unwrap_or_else(|| panic!("{} has no <interface name=\"{name}\">", file.display()));
        assert_eq!(
            documented,
            live,
            "{} differs from what kupd serves; update it (and docs/DBUS.md) to:\n{live}",
            file.display()
        );
    }
    s.engine.gate.open();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn can_update_answers_without_touching_anything() {
    let Some(s) = setup().await else { return };
    let manager = Manager1Proxy::new(&s.client).await.expect("proxy");
    let (can, target, reason) = manager.can_update("").await.expect("CanUpdate");
    assert!(can, "{reason}");
    assert_eq!(target, "9.9.9-fake");
    assert_eq!(reason, "");
    let (can, target, reason) = manager.can_update("refuse").await.expect("CanUpdate");
    assert!(!can);
    assert_eq!(target, "refuse");
    assert!(reason.contains("install linux-image-refuse"), "{reason}");
    // No authorization is asked, and no update object came of it.
    assert_eq!(s.authority.checks.load(Ordering::SeqCst), 0);
    assert!(status(&s.client).await.active_update.is_none());

    let path = update(&s.client, "hold", HashMap::new())
        .await
        .expect("Update");
    wait_for_phase(&s.client, phase::STAGE).await;
    let (can, _, reason) = manager.can_update("7.3.4").await.expect("CanUpdate");
    assert!(!can);
    assert!(reason.contains(path.as_str()), "{reason}");
    s.engine.gate.open();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_needs_authorization_and_reports_each_unit() {
    let Some(s) = setup().await else { return };
    let manager = Manager1Proxy::new(&s.client).await.expect("proxy");
    s.authority.deny.store(true, Ordering::SeqCst);
    let err = manager.dry_run("7.3.4").await.expect_err("denied");
    assert_eq!(error_name(&err).as_deref(), Some(ERROR_NOT_AUTHORIZED));
    s.authority.deny.store(false, Ordering::SeqCst);
    let report =
        kup_dbus::DryRunReport::from_json(&manager.dry_run("7.3.4").await.expect("DryRun"))
            .expect("a DryRunReport");
    assert_eq!(report.target, "7.3.4");
    assert_eq!(report.units.len(), 1);
    assert!(report.units[0].restorable);
    assert!(
        status(&s.client).await.active_update.is_none(),
        "no update object"
    );
    s.engine.gate.open();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_update_before_the_switch_and_not_after() {
    let Some(s) = setup().await else { return };
    let path = update(&s.client, "hold", HashMap::new())
        .await
        .expect("Update");
    wait_for_phase(&s.client, phase::STAGE).await;
    let proxy = update_proxy(&s.client, &path).await;
    let mut finished = proxy.receive_finished().await.expect("subscribe");

    s.authority.deny.store(true, Ordering::SeqCst);
    let err = proxy.cancel().await.expect_err("denied");
    assert_eq!(error_name(&err).as_deref(), Some(ERROR_NOT_AUTHORIZED));
    s.authority.deny.store(false, Ordering::SeqCst);

    proxy.cancel().await.expect("Cancel");
    s.engine.gate.open();
    let signal = tokio::time::timeout(TIMEOUT, finished.next())
        .await
        .expect("Finished arrives")
        .expect("signal");
    let args = signal.args().expect("args");
    assert!(!*args.success());
    assert!(
        args.message().contains("cancelled before the switch"),
        "{}",
        args.message()
    );
    assert_eq!(proxy.phase().await.expect("Phase"), phase::CANCELLED);
    let err = proxy.cancel().await.expect_err("already ended");
    assert_eq!(error_name(&err).as_deref(), Some(ERROR_REFUSED));

    // In the switch phase it is too late.
    let s2 = setup().await.expect("second bus");
    let path = update(&s2.client, "hold-switch", HashMap::new())
        .await
        .expect("Update");
    wait_for_phase(&s2.client, phase::SWITCH).await;
    let proxy = update_proxy(&s2.client, &path).await;
    let err = proxy.cancel().await.expect_err("too late");
    assert_eq!(error_name(&err).as_deref(), Some(ERROR_REFUSED));
    let (_, message) = match err {
        zbus::Error::MethodError(name, message, _) => (name, message.unwrap_or_default()),
        other => panic!("{other}"),
    };
    assert!(message.contains("can no longer be cancelled"), "{message}");
    s2.engine.gate.open();
}
