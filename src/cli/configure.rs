//! `agentfense-runc configure docker|containerd|podman`: register the runtime (SPEC §7).
//!
//! Edits the engine's configuration file in place: merges one runtime entry into what is there
//! (every other setting is kept, with its formatting and comments where the format has them),
//! refuses a file it cannot parse and leaves it untouched, keeps a backup of the previous
//! version, writes atomically, and changes nothing when the entry is already as asked.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;
use toml_edit::{Array, DocumentMut, Item, Table, TableLike, Value};

/// The engine to configure.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Docker,
    Containerd,
    Podman,
}

impl Engine {
    /// The engine's usual configuration file.
    pub fn default_config(self) -> &'static Path {
        Path::new(match self {
            Engine::Docker => "/etc/docker/daemon.json",
            Engine::Containerd => "/etc/containerd/config.toml",
            Engine::Podman => "/etc/containers/containers.conf",
        })
    }

    fn title(self) -> &'static str {
        match self {
            Engine::Docker => "Docker",
            Engine::Containerd => "containerd",
            Engine::Podman => "podman",
        }
    }
}

/// `configure ENGINE [--config FILE] [--name NAME] [--runtime-path PATH] [--runtime-arg ARG]...
/// [--default] [--replace] [--dry-run]`
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigureArgs {
    #[arg(value_enum)]
    pub engine: Engine,
    /// The engine's configuration file (default: /etc/docker/daemon.json,
    /// /etc/containerd/config.toml, /etc/containers/containers.conf).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The runtime's name in the engine's configuration (`docker run --runtime NAME`, the
    /// Kubernetes RuntimeClass handler, `podman --runtime NAME`).
    #[arg(long, default_value = "agentfense")]
    pub name: String,
    /// The runtime binary the engine runs (default: this binary's file on disk).
    #[arg(long, value_name = "PATH")]
    pub runtime_path: Option<PathBuf>,
    /// An argument Docker passes to the runtime before its own (`runtimeArgs`; repeatable), e.g.
    /// `--runtime-arg=--agentfense-config --runtime-arg=/etc/agentfense/config.json`.
    /// Docker only: containerd's runc shim and podman pass none.
    #[arg(long = "runtime-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub runtime_args: Vec<String>,
    /// Also make it the engine's default runtime (Docker `default-runtime`, containerd
    /// `default_runtime_name`, podman `[engine] runtime`).
    #[arg(long)]
    pub default: bool,
    /// Replace an existing runtime entry of that name even when it runs another program.
    #[arg(long)]
    pub replace: bool,
    /// Print the new configuration; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// What to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The runtime's name in the engine's configuration.
    pub name: String,
    /// The runtime binary, an absolute path.
    pub path: String,
    /// Docker's `runtimeArgs`.
    pub runtime_args: Vec<String>,
    /// Make it the engine's default runtime.
    pub make_default: bool,
    /// Replace an existing entry of that name that runs another program.
    pub replace: bool,
}

impl Registration {
    /// A registration of `path` as `name`, nothing else.
    pub fn new(name: &str, path: &str) -> Registration {
        Registration {
            name: name.to_string(),
            path: path.to_string(),
            runtime_args: Vec::new(),
            make_default: false,
            replace: false,
        }
    }
}

/// The result of editing a configuration's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    /// The new text (the original when nothing changes).
    pub text: String,
    /// What changed, one line each; empty when the runtime is already configured.
    pub changes: Vec<String>,
}

impl Edit {
    /// Whether the file is already as asked.
    pub fn unchanged(&self) -> bool {
        self.changes.is_empty()
    }
}

/// What [`configure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The file edited (a symlink's target).
    pub file: PathBuf,
    /// What changed; empty when already configured.
    pub changes: Vec<String>,
    /// Where the previous version was saved, when there was one and it changed.
    pub backup: Option<PathBuf>,
}

/// Edits the engine's configuration; returns the exit code.
pub fn run(args: ConfigureArgs) -> Result<i32> {
    let path = match &args.runtime_path {
        Some(p) => p.clone(),
        None => installed_binary()?,
    };
    if !path.is_absolute() {
        bail!(
            "--runtime-path {}: must be an absolute path",
            path.display()
        );
    }
    let path_str = path
        .to_str()
        .ok_or_else(|| anyhow!("--runtime-path {}: not UTF-8", path.display()))?
        .to_string();
    match fs::metadata(&path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
        _ => eprintln!(
            "warning: {path_str} is not an executable file (yet); the engine will fail to run it"
        ),
    }
    let reg = Registration {
        name: args.name.clone(),
        path: path_str,
        runtime_args: args.runtime_args.clone(),
        make_default: args.default,
        replace: args.replace,
    };
    let file = args
        .config
        .clone()
        .unwrap_or_else(|| args.engine.default_config().to_path_buf());
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let outcome = configure(args.engine, &file, &reg, args.dry_run, &mut out)?;
    if args.dry_run {
        for c in &outcome.changes {
            eprintln!("would change: {c}");
        }
        if outcome.changes.is_empty() {
            eprintln!(
                "{}: runtime {:?} is already configured; nothing would change",
                outcome.file.display(),
                reg.name
            );
        }
        return Ok(0);
    }
    if outcome.changes.is_empty() {
        writeln!(
            out,
            "{}: runtime {:?} is already configured; nothing changed",
            outcome.file.display(),
            reg.name
        )?;
        return Ok(0);
    }
    writeln!(out, "{}:", outcome.file.display())?;
    for c in &outcome.changes {
        writeln!(out, "  {c}")?;
    }
    match &outcome.backup {
        Some(b) => writeln!(out, "  previous version saved as {}", b.display())?,
        None => writeln!(out, "  (new file)")?,
    }
    for line in next_steps(args.engine, &reg) {
        writeln!(out, "{line}")?;
    }
    Ok(0)
}

/// What to do after a change: which daemon to reload or restart, and how to use the runtime.
fn next_steps(engine: Engine, reg: &Registration) -> Vec<String> {
    let n = &reg.name;
    match engine {
        Engine::Docker => vec![
            "reload dockerd: kill -HUP $(pidof dockerd) or systemctl reload docker".into(),
            format!(
                "then: docker run --runtime {n} --annotation agentfense.io/preset=agent-safe IMAGE ..."
            ),
        ],
        Engine::Containerd => vec![
            "restart containerd: systemctl restart containerd (running containers keep running)"
                .into(),
            format!(
                "then: a Kubernetes RuntimeClass with handler: {n} (config-examples/runtimeclass.yaml); \
                 pods may set agentfense.io/* annotations"
            ),
        ],
        Engine::Podman => vec![
            "podman reads containers.conf at every run (restart podman.service if you use its API)"
                .into(),
            format!(
                "then: podman --runtime {n} run --annotation agentfense.io/preset=agent-safe IMAGE ..."
            ),
        ],
    }
}

/// The runtime's own file on disk: the running binary is a sealed copy in memory, so its path
/// comes from what `main` recorded before sealing.
fn installed_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(crate::sys::EXE_ENV).map(PathBuf::from) {
        if p.is_absolute() {
            return Ok(p);
        }
    }
    if !crate::sys::is_sealed() {
        if let Ok(p) = std::env::current_exe() {
            return Ok(p);
        }
    }
    bail!("cannot tell where this binary is installed: pass --runtime-path PATH")
}

/// Registers `reg` in the engine's configuration `file`: edits, backs up and writes it (or,
/// with `dry_run`, prints the new text on `out` and writes nothing).
pub fn configure(
    engine: Engine,
    file: &Path,
    reg: &Registration,
    dry_run: bool,
    out: &mut dyn Write,
) -> Result<Outcome> {
    // Edit a symlink's target, not the link.
    let file = fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let original = match fs::read(&file) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let text = match &original {
        Some(b) => std::str::from_utf8(b)
            .map_err(|_| anyhow!("{} is not UTF-8; nothing was changed", file.display()))?,
        None => "",
    };
    let edit = edit(engine, text, reg)
        .with_context(|| format!("{}: nothing was changed", file.display()))?;
    if dry_run {
        out.write_all(edit.text.as_bytes())?;
        return Ok(Outcome {
            file,
            changes: edit.changes,
            backup: None,
        });
    }
    if edit.unchanged() {
        return Ok(Outcome {
            file,
            changes: Vec::new(),
            backup: None,
        });
    }
    let meta = match &original {
        Some(_) => Some(fs::metadata(&file)?),
        None => None,
    };
    let backup = match &original {
        Some(bytes) => Some(write_backup(&file, bytes, meta.as_ref())?),
        None => None,
    };
    write_atomically(
        &file,
        edit.text.as_bytes(),
        meta.as_ref(),
        original.as_deref(),
    )?;
    Ok(Outcome {
        file,
        changes: edit.changes,
        backup,
    })
}

/// Edits a configuration's text (empty for a missing file).
pub fn edit(engine: Engine, text: &str, reg: &Registration) -> Result<Edit> {
    check_name(&reg.name)?;
    if !reg.path.starts_with('/') {
        bail!("runtime path {:?} is not absolute", reg.path);
    }
    if engine != Engine::Docker && !reg.runtime_args.is_empty() {
        bail!(
            "{} cannot pass arguments to a runtime (--runtime-arg is for Docker); \
             set defaults in /etc/agentfense/config.json instead",
            engine.title()
        );
    }
    match engine {
        Engine::Docker => edit_docker(text, reg),
        Engine::Containerd => edit_containerd(text, reg),
        Engine::Podman => edit_podman(text, reg),
    }
}

/// Names are what the engines accept everywhere (CLI flags, TOML bare keys, Kubernetes
/// handlers): a letter or digit, then letters, digits, `.`, `_`, `-`; at most 63. `runc` is the
/// engines' own.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        bail!(
            "invalid runtime name {name:?}: use letters, digits, '.', '_' and '-' \
             (starting with a letter or digit, at most 63)"
        );
    }
    if name == "runc" {
        bail!("the name \"runc\" belongs to the engine's own runtime: choose another --name");
    }
    Ok(())
}

/// Whether an existing entry's program is agentfense-runc (so updating it clobbers nothing).
fn is_ours(program: &str) -> bool {
    Path::new(program)
        .file_name()
        .and_then(|f| f.to_str())
        .is_some_and(|f| f.contains("agentfense"))
}

fn refuse_foreign(reg: &Registration, what: &str, program: Option<&str>) -> Result<()> {
    if reg.replace || program.is_some_and(is_ours) {
        return Ok(());
    }
    bail!(
        "{what} already exists and runs {}; choose another --name, or pass --replace",
        program.map_or("something else".to_string(), |p| format!("{p:?}"))
    )
}

// ------------------------------------------------------------------------------------ Docker

/// A JSON value kept as written, or a new one.
enum Json {
    Raw(Box<RawValue>),
    Object(Object),
    New(serde_json::Value),
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Raw(r) => r.serialize(s),
            Json::Object(o) => o.serialize(s),
            Json::New(v) => v.serialize(s),
        }
    }
}

/// A JSON object in its original order, its values as written.
struct Object(Vec<(String, Json)>);

impl Object {
    fn get(&self, key: &str) -> Option<&Json> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn set(&mut self, key: &str, value: Json) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.0.push((key.to_string(), value)),
        }
    }
}

impl Serialize for Object {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object, A::Error> {
                let mut entries: Vec<(String, Json)> = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    let v: Box<RawValue> = map.next_value()?;
                    if entries.iter().any(|(e, _)| *e == k) {
                        return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
                    }
                    entries.push((k, Json::Raw(v)));
                }
                Ok(Object(entries))
            }
        }
        d.deserialize_map(V)
    }
}

fn parse_object(text: &str, what: &str) -> Result<Object> {
    let v: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("{what} is not valid JSON"))?;
    if !v.is_object() {
        bail!("{what} is not a JSON object");
    }
    serde_json::from_str(text).with_context(|| format!("{what} is not valid JSON"))
}

/// The indentation the file uses (that of its first indented line), so that the values kept
/// as written line up with the new ones.
fn json_indent(text: &str) -> String {
    text.lines()
        .skip(1)
        .find(|l| !l.trim().is_empty())
        .map(|l| {
            l.chars()
                .take_while(|c| *c == ' ' || *c == '\t')
                .collect::<String>()
        })
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| "  ".to_string())
}

fn edit_docker(text: &str, reg: &Registration) -> Result<Edit> {
    let mut top = if text.trim().is_empty() {
        Object(Vec::new())
    } else {
        parse_object(text, "the file")?
    };
    let mut runtimes = match top.get("runtimes") {
        Some(Json::Raw(r)) => parse_object(r.get(), "\"runtimes\"")?,
        _ => Object(Vec::new()),
    };
    let mut want = serde_json::json!({ "path": reg.path });
    if !reg.runtime_args.is_empty() {
        want["runtimeArgs"] = serde_json::json!(reg.runtime_args);
    }
    let mut changes = Vec::new();
    let mut runtimes_changed = false;
    match runtimes.get(&reg.name) {
        Some(Json::Raw(r)) => {
            let mut have: serde_json::Value = serde_json::from_str(r.get())?;
            if let Some(o) = have.as_object_mut() {
                if o.get("runtimeArgs")
                    .and_then(|a| a.as_array())
                    .is_some_and(|a| a.is_empty())
                {
                    o.remove("runtimeArgs");
                }
            }
            if have != want {
                refuse_foreign(
                    reg,
                    &format!("Docker runtime {:?}", reg.name),
                    have.get("path").and_then(|p| p.as_str()),
                )?;
                changes.push(format!(
                    "runtimes.{}: replaced {} with {}",
                    reg.name,
                    r.get().split_whitespace().collect::<Vec<_>>().join(" "),
                    want
                ));
                runtimes_changed = true;
            }
        }
        _ => {
            changes.push(format!("runtimes.{}: added {}", reg.name, want));
            runtimes_changed = true;
        }
    }
    if runtimes_changed {
        runtimes.set(&reg.name, Json::New(want));
        top.set("runtimes", Json::Object(runtimes));
    }
    if reg.make_default {
        let have = match top.get("default-runtime") {
            Some(Json::Raw(r)) => serde_json::from_str::<serde_json::Value>(r.get())?,
            _ => serde_json::Value::Null,
        };
        if have.as_str() != Some(reg.name.as_str()) {
            changes.push(format!(
                "default-runtime: {} (was {})",
                reg.name,
                have.as_str().unwrap_or("runc")
            ));
            top.set("default-runtime", Json::New(serde_json::json!(reg.name)));
        }
    }
    if changes.is_empty() {
        return Ok(Edit {
            text: text.to_string(),
            changes,
        });
    }
    let indent = json_indent(text);
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    top.serialize(&mut ser)?;
    buf.push(b'\n');
    Ok(Edit {
        text: String::from_utf8(buf)?,
        changes,
    })
}

// -------------------------------------------------------------------------------------- TOML

fn parse_toml(text: &str) -> Result<DocumentMut> {
    text.parse::<DocumentMut>().map_err(|e| {
        let at = e.span().map_or(String::new(), |span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!(" at line {line}, column {column}")
        });
        anyhow!("the file is not valid TOML{at}: {}", e.message().trim_end())
    })
}

/// The table at `key` under `t`, created when missing (as an implicit table: it prints no
/// header of its own unless it holds keys, and then `header_prefix` before its header); an
/// error when `key` holds something else.
fn child<'a>(
    t: &'a mut dyn TableLike,
    key: &str,
    shown: &str,
    header_prefix: &str,
) -> Result<&'a mut dyn TableLike> {
    if t.get(key).is_none() {
        let mut nt = Table::new();
        nt.set_implicit(true);
        // After every table already there (toml_edit prints tables by position).
        nt.set_position(Some(isize::MAX / 2));
        nt.decor_mut().set_prefix(header_prefix);
        t.insert(key, Item::Table(nt));
    }
    let item = t.get_mut(key).expect("just inserted");
    let tn = item.type_name();
    item.as_table_like_mut()
        .ok_or_else(|| anyhow!("{shown} is {tn}, not a table"))
}

/// Walks `path` from the document's root, creating what is missing.
fn table_at<'a>(doc: &'a mut DocumentMut, path: &[&str]) -> Result<&'a mut dyn TableLike> {
    let mut t: &mut dyn TableLike = doc.as_table_mut();
    for (i, k) in path.iter().enumerate() {
        t = child(t, k, &show_path(&path[..=i]), "\n")?;
    }
    Ok(t)
}

/// A table path as TOML writes it: `plugins."io.containerd.grpc.v1.cri".containerd`.
fn show_path(path: &[&str]) -> String {
    path.iter()
        .map(|k| {
            if k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                k.to_string()
            } else {
                format!("{k:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Sets `key` to `v` (keeping the old value's surrounding formatting) unless it is already
/// equal; notes the change. A new key is indented as its siblings are, or by `indent`.
fn set_value(
    t: &mut dyn TableLike,
    key: &str,
    v: Value,
    shown: &str,
    indent: &str,
    changes: &mut Vec<String>,
) {
    match t.get_mut(key) {
        Some(Item::Value(old)) if same(old, &v) => {}
        Some(Item::Value(old)) => {
            changes.push(format!(
                "{shown} = {} (was {})",
                v.to_string().trim(),
                old.to_string().trim()
            ));
            let decor = old.decor().clone();
            *old = v;
            *old.decor_mut() = decor;
        }
        _ => {
            changes.push(format!("{shown} = {}", v.to_string().trim()));
            let indent = sibling_indent(t).unwrap_or_else(|| indent.to_string());
            t.insert(key, Item::Value(v));
            if let Some(mut k) = t.key_mut(key) {
                k.leaf_decor_mut().set_prefix(indent);
            }
        }
    }
}

/// How the keys already in a table are indented.
fn sibling_indent(t: &dyn TableLike) -> Option<String> {
    t.iter()
        .filter(|(_, v)| v.is_value())
        .find_map(|(k, _)| {
            t.key(k)?
                .leaf_decor()
                .prefix()?
                .as_str()
                .map(str::to_string)
        })
        .filter(|p| p.chars().all(|c| c == ' ' || c == '\t'))
}

/// TOML values equal in content (formatting aside).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => x.value() == y.value(),
        (Value::Integer(x), Value::Integer(y)) => x.value() == y.value(),
        (Value::Boolean(x), Value::Boolean(y)) => x.value() == y.value(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(p, q)| same(p, q))
        }
        _ => false,
    }
}

fn str_array(items: &[&str]) -> Value {
    Value::Array(items.iter().copied().collect::<Array>())
}

fn get_str<'a>(t: &'a dyn TableLike, key: &str) -> Option<&'a str> {
    t.get(key).and_then(|i| i.as_str())
}

// -------------------------------------------------------------------------------- containerd

/// The CRI plugin's id in each config version containerd reads.
const CRI_V2: &str = "io.containerd.grpc.v1.cri";
const CRI_V3: &str = "io.containerd.cri.v1.runtime";

fn edit_containerd(text: &str, reg: &Registration) -> Result<Edit> {
    let mut doc = parse_toml(text)?;
    let mut changes = Vec::new();
    let version = match doc.get("version") {
        None => None,
        Some(v) => Some(
            v.as_integer()
                .ok_or_else(|| anyhow!("`version` is {}, not an integer", v.type_name()))?,
        ),
    };
    let plugin = match version {
        Some(2) => CRI_V2,
        Some(3) => CRI_V3,
        Some(1) => bail!(
            "config version 1 (containerd 1.0-1.2 layout): migrate it first \
             (`containerd config migrate` on containerd 2, or rewrite it as version 2)"
        ),
        Some(v) => bail!("unknown config version {v} (this knows 2 and 3)"),
        None if doc.contains_key("plugins") => bail!(
            "the file has plugins but no `version`: containerd reads it as version 1; \
             add `version = 2` (containerd 1.x) or migrate it, then run again"
        ),
        None => {
            doc.insert("version", toml_edit::value(2));
            changes.push("version = 2 (the layout containerd 1.5+ reads; 2.x migrates it)".into());
            CRI_V2
        }
    };
    let runtimes_path = ["plugins", plugin, "containerd", "runtimes"];
    let shown = |rest: &[&str]| {
        let mut p: Vec<&str> = runtimes_path.to_vec();
        p.extend_from_slice(rest);
        show_path(&p)
    };
    // A new entry takes runc's cgroup driver (kubelet's must match either way).
    let systemd_cgroup = {
        let runtimes = table_at(&mut doc, &runtimes_path)?;
        runtimes
            .get("runc")
            .and_then(|r| r.as_table_like())
            .and_then(|r| r.get("options"))
            .and_then(|o| o.as_table_like())
            .and_then(|o| o.get("SystemdCgroup"))
            .and_then(|s| s.as_bool())
    };
    let default_runtime = table_at(&mut doc, &["plugins", plugin, "containerd"])?
        .get("default_runtime_name")
        .and_then(|d| d.as_str())
        .unwrap_or("runc")
        .to_string();
    let runtimes = table_at(&mut doc, &runtimes_path)?;
    // Once the file lists any runtime, containerd forgets its built-in `runc` (the map is
    // replaced, not merged) and refuses a default runtime that is not listed: keep it.
    if default_runtime == "runc" && !runtimes.contains_key("runc") {
        let runc = child(runtimes, "runc", &shown(&["runc"]), "\n")?;
        set_value(
            runc,
            "runtime_type",
            Value::from("io.containerd.runc.v2"),
            &shown(&["runc", "runtime_type"]),
            "  ",
            &mut changes,
        );
        if let Some(c) = changes.last_mut() {
            c.push_str(" (containerd's default runtime, which listing another would hide)");
        }
    }
    let existed = runtimes.contains_key(&reg.name);
    if existed {
        let binary = runtimes
            .get(&reg.name)
            .and_then(|r| r.as_table_like())
            .and_then(|r| r.get("options"))
            .and_then(|o| o.as_table_like())
            .and_then(|o| get_str(o, "BinaryName"))
            .filter(|b| !b.is_empty());
        if binary != Some(reg.path.as_str()) {
            refuse_foreign(
                reg,
                &format!("containerd runtime {:?}", reg.name),
                Some(binary.unwrap_or("runc")),
            )?;
        }
    }
    let entry = child(runtimes, &reg.name, &shown(&[&reg.name]), "\n")?;
    set_value(
        entry,
        "runtime_type",
        Value::from("io.containerd.runc.v2"),
        &shown(&[&reg.name, "runtime_type"]),
        "  ",
        &mut changes,
    );
    // Let the pods' fencing annotations through to the runtime; keep what else is let through.
    let annotations_shown = shown(&[&reg.name, "pod_annotations"]);
    match entry.get_mut("pod_annotations") {
        Some(Item::Value(Value::Array(a))) => {
            if !a.iter().any(|v| v.as_str() == Some("agentfense.io/*")) {
                a.push("agentfense.io/*");
                changes.push(format!("{annotations_shown}: added \"agentfense.io/*\""));
            }
        }
        _ => set_value(
            entry,
            "pod_annotations",
            str_array(&["agentfense.io/*"]),
            &annotations_shown,
            "  ",
            &mut changes,
        ),
    }
    let options_existed = entry.contains_key("options");
    let options_shown = shown(&[&reg.name, "options"]);
    let options = child(entry, "options", &options_shown, "  ")?;
    set_value(
        options,
        "BinaryName",
        Value::from(reg.path.as_str()),
        &shown(&[&reg.name, "options", "BinaryName"]),
        "    ",
        &mut changes,
    );
    if !options_existed {
        if let Some(s) = systemd_cgroup {
            set_value(
                options,
                "SystemdCgroup",
                Value::from(s),
                &shown(&[&reg.name, "options", "SystemdCgroup"]),
                "    ",
                &mut changes,
            );
        }
    }
    if reg.make_default {
        let cri = table_at(&mut doc, &["plugins", plugin, "containerd"])?;
        set_value(
            cri,
            "default_runtime_name",
            Value::from(reg.name.as_str()),
            &show_path(&["plugins", plugin, "containerd", "default_runtime_name"]),
            "",
            &mut changes,
        );
    }
    finish_toml(text, doc, changes)
}

fn finish_toml(text: &str, doc: DocumentMut, changes: Vec<String>) -> Result<Edit> {
    if changes.is_empty() {
        return Ok(Edit {
            text: text.to_string(),
            changes,
        });
    }
    let mut out = doc.to_string();
    if !text.starts_with('\n') {
        // A new table's blank line, at the top of a file.
        out = out.trim_start_matches('\n').to_string();
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    // What we write must read back.
    parse_toml(&out).context("internal error: the edited file does not parse")?;
    Ok(Edit { text: out, changes })
}

// ------------------------------------------------------------------------------------ podman

fn edit_podman(text: &str, reg: &Registration) -> Result<Edit> {
    let mut doc = parse_toml(text)?;
    let mut changes = Vec::new();
    let runtimes = table_at(&mut doc, &["engine", "runtimes"])?;
    let existed = runtimes.contains_key(&reg.name);
    if existed {
        let first = match runtimes.get(&reg.name) {
            Some(Item::Value(Value::Array(a))) => a.iter().next().and_then(|v| v.as_str()),
            _ => None,
        };
        if first != Some(reg.path.as_str()) {
            refuse_foreign(reg, &format!("podman runtime {:?}", reg.name), first)?;
        }
    }
    set_value(
        runtimes,
        &reg.name,
        str_array(&[&reg.path]),
        &format!("engine.runtimes.{}", reg.name),
        "",
        &mut changes,
    );
    if reg.make_default {
        let engine = table_at(&mut doc, &["engine"])?;
        set_value(
            engine,
            "runtime",
            Value::from(reg.name.as_str()),
            "engine.runtime",
            "",
            &mut changes,
        );
    }
    finish_toml(text, doc, changes)
}

// ----------------------------------------------------------------------------------- writing

/// Saves the previous version next to the file as `FILE.agentfense-backup.TIMESTAMP`, with the
/// original's mode; never overwrites an earlier backup.
fn write_backup(file: &Path, bytes: &[u8], meta: Option<&fs::Metadata>) -> Result<PathBuf> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let mode = meta.map_or(0o644, |m| m.permissions().mode() & 0o7777);
    for i in 0..1000 {
        let mut name = file.as_os_str().to_owned();
        name.push(format!(".agentfense-backup.{stamp}"));
        if i > 0 {
            name.push(format!(".{i}"));
        }
        let path = PathBuf::from(name);
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path);
        match f {
            Ok(mut f) => {
                f.write_all(bytes)
                    .and_then(|()| f.sync_all())
                    .with_context(|| format!("writing the backup {}", path.display()))?;
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("writing the backup {}", path.display()))
            }
        }
    }
    bail!("too many backups of {} this second", file.display())
}

/// Replaces `file` with `bytes` atomically (a temporary file in the same directory, renamed
/// over it), keeping the original's mode and owner; refuses if the file changed since it was
/// read.
fn write_atomically(
    file: &Path,
    bytes: &[u8],
    meta: Option<&fs::Metadata>,
    read: Option<&[u8]>,
) -> Result<()> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let base = file
        .file_name()
        .ok_or_else(|| anyhow!("{} names no file", file.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(base);
    tmp_name.push(format!(".agentfense-tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let mode = meta.map_or(0o644, |m| m.permissions().mode() & 0o7777);
    let result = (|| -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        // The umask may have taken bits away.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some(m) = meta {
            // Only root can give a file away; anyone else writes their own files.
            let _ = std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()));
        }
        f.sync_all()?;
        let now = match fs::read(file) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        if now.as_deref() != read {
            bail!("the file changed while it was being edited; run again");
        }
        fs::rename(&tmp, file).with_context(|| format!("replacing {}", file.display()))?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("{}: not changed", file.display()))
}
