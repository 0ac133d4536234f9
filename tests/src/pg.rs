//! [`PgCluster`]: a throwaway PostgreSQL server for tests.
//!
//! Each cluster lives in its own temporary directory (data dir, Unix socket dir,
//! server log) on a free loopback port, is set up for logical replication, and is
//! stopped by its `Drop` guard (`pg_ctl stop -m immediate`, then SIGKILL), even when
//! the test panics. Clients authenticate with SCRAM-SHA-256 over TCP.
//!
//! The server binaries are found through `$RAFTCACHE_PG_BINDIR`, else
//! `pg_config --bindir` if `pg_config` is on `PATH`, else the newest
//! `/usr/lib/postgresql/*/bin` (Debian's layout). PostgreSQL refuses to run as root,
//! so as root the directory is given to the `postgres` user and the server commands
//! run as it (through `runuser`, or by setting the uid when there is no `runuser`).
//!
//! ```text
//! PgCluster::start ─► initdb ─► postgresql.conf + pg_hba.conf ─► pg_ctl start ─► psql: role + db `app`
//! ```

use anyhow::{bail, Context, Result};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The application role: `LOGIN REPLICATION`, owner of database [`APP_DB`].
pub const APP_USER: &str = "app";
/// [`APP_USER`]'s password.
pub const APP_PASSWORD: &str = "secret";
/// The application database.
pub const APP_DB: &str = "app";
/// The bootstrap superuser.
pub const SUPERUSER: &str = "postgres";
/// [`SUPERUSER`]'s password.
pub const SUPERUSER_PASSWORD: &str = "supersecret";

/// How long one `initdb`, `pg_ctl` or `psql` run may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The settings appended to `postgresql.conf` besides port and socket directory.
const SETTINGS: &str = "\
listen_addresses = '127.0.0.1'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
max_connections = 60
fsync = off
full_page_writes = off
shared_buffers = 32MB
log_replication_commands = on
log_line_prefix = '%m [%p] %q%u@%d '
";

/// `pg_hba.conf`: password (SCRAM) authentication everywhere. Logical replication
/// connections match ordinary database lines; the `replication` line is for physical.
const HBA: &str = "\
local all all scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
host replication all 127.0.0.1/32 scram-sha-256
";

/// How server commands are run when this process is root.
#[derive(Debug, Clone)]
enum RunAs {
    /// As the current user (not root).
    Me,
    /// `runuser -u postgres -- ...`; the ids are for `chown`.
    Runuser(PathBuf, u32, u32),
    /// As the `postgres` user's uid/gid.
    Ids(u32, u32),
}

/// A running throwaway PostgreSQL server. Dropping it stops the server and deletes
/// its files.
pub struct PgCluster {
    bindir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    run_as: RunAs,
    /// Whether the server may be running (so `Drop` must stop it).
    running: bool,
    // Last, so it is removed after the server is stopped.
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

impl PgCluster {
    /// Creates, configures and starts a new cluster on a free port, with role and
    /// database `app` (see [`url`](Self::url)).
    ///
    /// # Errors
    /// When no PostgreSQL binaries are found, or a step fails (the error includes the
    /// command's output and the tail of the server log).
    pub fn start() -> Result<PgCluster> {
        let bindir = find_bindir()?;
        let dir = tempfile::Builder::new()
            .prefix("raftcache-pg-")
            .tempdir()
            .context("create a temporary directory for PostgreSQL")?;
        let run_as = run_as()?;
        let mut pg = PgCluster {
            data: dir.path().join("data"),
            log: dir.path().join("server.log"),
            port: free_port()?,
            bindir,
            run_as,
            running: false,
            dir,
        };
        pg.give_to_server_user(pg.dir.path())?;
        let pwfile = pg.dir.path().join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD)?;
        pg.give_to_server_user(&pwfile)?;

        pg.server_cmd(
            "initdb",
            &[
                "-D".as_ref(),
                pg.data.as_os_str(),
                "-U".as_ref(),
                SUPERUSER.as_ref(),
                format!("--pwfile={}", pwfile.display()).as_ref(),
                "-A".as_ref(),
                "scram-sha-256".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        let sock = pg.dir.path().join("sock");
        std::fs::create_dir(&sock)?;
        pg.give_to_server_user(&sock)?;
        let conf = pg.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str(&format!(
            "\n# raftcache test harness\nport = {}\nunix_socket_directories = '{}'\n{SETTINGS}",
            pg.port,
            sock.display()
        ));
        std::fs::write(&conf, text)?;
        std::fs::write(pg.data.join("pg_hba.conf"), HBA)?;

        pg.start_again()?;
        pg.psql(&[
            &format!("CREATE ROLE {APP_USER} LOGIN REPLICATION PASSWORD '{APP_PASSWORD}'"),
            &format!("CREATE DATABASE {APP_DB} OWNER {APP_USER}"),
        ])?;
        tracing::info!(port = pg.port, dir = %pg.dir.path().display(), "PostgreSQL test cluster ready");
        Ok(pg)
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (e.g. to edit `pg_hba.conf`; `SELECT pg_reload_conf()`
    /// makes the server read it again).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// `postgres://app:secret@127.0.0.1:PORT/app`.
    pub fn url(&self) -> String {
        format!(
            "postgres://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{}/{APP_DB}?sslmode=disable",
            self.port
        )
    }

    /// The superuser's URL, to database `postgres`.
    pub fn superuser_url(&self) -> String {
        format!(
            "postgres://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// A `tokio-postgres` client connected as [`APP_USER`] to [`APP_DB`]; its
    /// connection task is spawned on the current runtime.
    ///
    /// # Panics
    /// When it cannot connect (the message includes the server log's tail).
    pub async fn client(&self) -> tokio_postgres::Client {
        match self.try_client(&self.url()).await {
            Ok(c) => c,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// A `tokio-postgres` client connected as the superuser to database `postgres`.
    ///
    /// # Panics
    /// When it cannot connect.
    pub async fn superuser_client(&self) -> tokio_postgres::Client {
        match self.try_client(&self.superuser_url()).await {
            Ok(c) => c,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// A `tokio-postgres` client for `url`.
    ///
    /// # Errors
    /// When it cannot connect within 30 s.
    pub async fn try_client(&self, url: &str) -> Result<tokio_postgres::Client> {
        let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
        let (client, connection) =
            match tokio::time::timeout(Duration::from_secs(30), connect).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => bail!("connect to {url}: {e}{}", self.log_tail_section()),
                Err(_) => bail!("connect to {url}: timed out{}", self.log_tail_section()),
            };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "tokio-postgres connection ended");
            }
        });
        Ok(client)
    }

    /// Stops the server (fast shutdown: clients are disconnected, a checkpoint is
    /// written), keeping its data directory and port.
    ///
    /// # Errors
    /// When `pg_ctl stop` fails.
    pub fn stop(&mut self) -> Result<()> {
        let data = self.data.clone();
        self.server_cmd(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "stop".as_ref(),
            ],
        )?;
        self.running = false;
        Ok(())
    }

    /// Starts the server again on the same data directory and port (also what
    /// [`start`](Self::start) uses the first time).
    ///
    /// # Errors
    /// When `pg_ctl start` fails (e.g. the port was taken meanwhile).
    pub fn start_again(&mut self) -> Result<()> {
        // Set first, so that a half-started server is still stopped by `Drop`.
        self.running = true;
        let (data, log) = (self.data.clone(), self.log.clone());
        self.server_cmd(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ],
        )?;
        Ok(())
    }

    /// [`stop`](Self::stop) then [`start_again`](Self::start_again).
    ///
    /// # Errors
    /// As those.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn log_tail_section(&self) -> String {
        format!(
            "\n--- last lines of the PostgreSQL log ---\n{}",
            self.log_tail(30)
        )
    }

    /// Runs SQL statements through `psql` as the superuser, one `-c` each (so
    /// `CREATE DATABASE` works), stopping at the first error.
    ///
    /// # Errors
    /// When a statement fails.
    pub fn psql(&self, statements: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(self.bindir.join("psql"));
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                "postgres",
            ])
            .env("PGPASSWORD", SUPERUSER_PASSWORD)
            .env("PGCONNECT_TIMEOUT", "30");
        for s in statements {
            cmd.arg("-c").arg(s);
        }
        self.checked(cmd, "psql")
    }

    /// Runs a server binary (as the server user when root) and checks its exit status.
    fn server_cmd(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<Output> {
        let path = self.bindir.join(program);
        let mut cmd = match &self.run_as {
            RunAs::Me => Command::new(&path),
            RunAs::Runuser(runuser, _, _) => {
                let mut c = Command::new(runuser);
                c.args(["-u", SUPERUSER, "--"]).arg(&path);
                c
            }
            RunAs::Ids(uid, gid) => {
                let mut c = Command::new(&path);
                c.uid(*uid).gid(*gid);
                c
            }
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("LC_ALL", "C");
        for var in ["PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGDATABASE"] {
            cmd.env_remove(var);
        }
        self.checked(cmd, program)
    }

    fn checked(&self, mut cmd: Command, what: &str) -> Result<Output> {
        let out = crate::output_within(&mut cmd, COMMAND_TIMEOUT)
            .with_context(|| format!("run {what}{}", self.log_tail_section()))?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tail_section()
            );
        }
        Ok(out)
    }

    /// Hands a path to the server user (when root), so the server can use it.
    fn give_to_server_user(&self, path: &Path) -> Result<()> {
        if let RunAs::Ids(uid, gid) | RunAs::Runuser(_, uid, gid) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        Ok(())
    }

    /// The postmaster's pid, from `postmaster.pid`.
    fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of PostgreSQL log (port {}) ---\n{}",
                self.port,
                self.log_tail(40)
            );
        }
        if !self.running {
            return;
        }
        let data = self.data.clone();
        let stopped = self
            .server_cmd(
                "pg_ctl",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-m".as_ref(),
                    "immediate".as_ref(),
                    "-w".as_ref(),
                    "-t".as_ref(),
                    "20".as_ref(),
                    "stop".as_ref(),
                ],
            )
            .is_ok();
        if !stopped {
            if let Some(pid) = self.postmaster_pid() {
                crate::signal(pid, libc::SIGKILL);
                // Give the children a moment to notice the postmaster is gone.
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        self.running = false;
    }
}

/// Where the PostgreSQL server binaries are.
///
/// # Errors
/// When none are found.
pub fn find_bindir() -> Result<PathBuf> {
    let has_initdb = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(d) = std::env::var_os("RAFTCACHE_PG_BINDIR") {
        let d = PathBuf::from(d);
        if has_initdb(&d) {
            return Ok(d);
        }
        bail!("RAFTCACHE_PG_BINDIR={} has no initdb/pg_ctl", d.display());
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_initdb(&d) {
            return Ok(d);
        }
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((version?, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_initdb(bin))
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "PostgreSQL server binaries not found: no pg_config on PATH with initdb in its \
             --bindir, and no /usr/lib/postgresql/*/bin/initdb. Install the server \
             (e.g. `apt-get install postgresql`) or set RAFTCACHE_PG_BINDIR"
        ),
    }
}

/// How to run server binaries from this process.
fn run_as() -> Result<RunAs> {
    let euid = std::fs::metadata("/proc/self")
        .context("read /proc/self to find out whether this process is root")?
        .uid();
    if euid != 0 {
        return Ok(RunAs::Me);
    }
    let runuser = [
        "/usr/sbin/runuser",
        "/sbin/runuser",
        "/usr/bin/runuser",
        "/bin/runuser",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file());
    let (uid, gid) = postgres_ids()?;
    Ok(match runuser {
        Some(p) => RunAs::Runuser(p, uid, gid),
        None => RunAs::Ids(uid, gid),
    })
}

/// The uid and gid of the `postgres` user, from `/etc/passwd`.
fn postgres_ids() -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.first() == Some(&SUPERUSER) && f.len() >= 4 {
            return Ok((f[2].parse()?, f[3].parse()?));
        }
    }
    bail!(
        "running as root, and there is no user {SUPERUSER:?} to run PostgreSQL as \
         (PostgreSQL refuses to run as root); create one or run the tests as another user"
    )
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(l.local_addr()?.port())
}

/// Runs `sql` and returns `pg_current_wal_lsn()` taken after its commit.
///
/// # Panics
/// When the SQL or the query fails (the message names the SQL).
pub async fn exec(db: &tokio_postgres::Client, sql: &str) -> raftcache_client::Lsn {
    db.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    current_lsn(db).await
}

/// `pg_current_wal_lsn()`.
///
/// # Panics
/// When the query fails or answers something that is not an LSN.
pub async fn current_lsn(db: &tokio_postgres::Client) -> raftcache_client::Lsn {
    let row = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap_or_else(|e| panic!("pg_current_wal_lsn(): {e}"));
    let text = row.get::<_, String>(0);
    text.parse()
        .unwrap_or_else(|e| panic!("pg_current_wal_lsn() answered {text:?}: {e}"))
}
