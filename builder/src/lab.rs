//! `ncimage lab`: the whole cluster of a spec booted together under QEMU on a private virtual
//! network that exists only inside this process tree. Each VM has one NIC, a QEMU `stream`
//! netdev on a unix socket, plugged into a learning switch run here; nothing reaches the host's
//! network. Each node boots its role's image with its own seed (secrets generated for the lab).
//!
//! `lab up` writes the lab's folder (secrets, seeds, VM work folders), starts a supervisor
//! process (`ncimage lab supervise`: the switch and every QEMU, which die with it, started in
//! boot order with at most `booting` of them booting at once) and waits until every node's
//! serial console says `joined`. `lab status` asks every node;
//! `lab down` stops the supervisor and removes the folder, as does a failed or interrupted `up`.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layer::Project;
use crate::qemu::{Agent, Firmware, Vm, VmConfig};
use crate::rekey;
use crate::spec::Spec;

/// What the supervisor started (the lab folder's state.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub cluster: String,
    pub supervisor_pid: u32,
    pub started: u64,
    pub nodes: Vec<NodeState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub role: String,
    pub address: String,
    pub mac: String,
    pub memory_mib: u32,
    pub qemu_pid: u32,
    pub qga: PathBuf,
    pub serial_log: PathBuf,
}

/// Disk a lab takes at most, roughly: per node, its image's root filesystem (first boot
/// re-encrypts it, so every block lands in the VM's overlay; 2 GiB when the manifest does not
/// say) plus 1 GiB for first boot's writes, the data volumes' contents and the logs.
pub fn disk_needed(spec: &Spec, images: &Path) -> u64 {
    spec.nodes
        .iter()
        .map(|n| {
            let manifest = images.join(&n.role).join("manifest.json");
            let root = std::fs::read_to_string(&manifest)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|m| m["filesystems"]["root"]["size_bytes"].as_u64())
                .unwrap_or(2 << 30);
            root + (1 << 30)
        })
        .sum()
}

/// Refuses to start a lab that would fill its disk.
pub fn enough_space(need: u64, free: u64, dir: &Path) -> Result<()> {
    if free >= need {
        return Ok(());
    }
    Err(Error::invalid(
        format!(
            "the lab needs about {} GiB free under {} and {} GiB are free: each VM's overlay \
             receives its re-encrypted root and first boot's writes, and a full disk pauses \
             every VM",
            need.div_ceil(1 << 30),
            dir.display(),
            free >> 30
        ),
        "free space (old outputs under out/, target/qemu-tests, /var/cache/ncimage/rootfs) or give `--dir` on a larger disk",
    ))
}

/// Bytes available under `path` (or its nearest existing parent).
fn free_bytes(path: &Path) -> Result<u64> {
    let mut p = path;
    while !p.exists() {
        p = p.parent().unwrap_or(Path::new("/"));
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::invalid(format!("{} has a NUL byte", p.display()), "rename it"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io("reading the free space of", p)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The lab's folder: short, because QEMU's socket paths must fit in 107 bytes.
pub fn default_dir(cluster: &str) -> PathBuf {
    PathBuf::from(format!("/var/tmp/ncimage-lab-{cluster}"))
}

/// A stable, locally administered MAC per node (index in the spec).
pub fn mac_of(index: usize) -> String {
    format!(
        "52:54:00:4c:{:02x}:{:02x}",
        (index >> 8) & 0xff,
        index & 0xff
    )
}

fn image_of(images: &Path, role: &str) -> PathBuf {
    images.join(role).join(format!("ncimage-{role}.qcow2"))
}

// ---------------------------------------------------------------------------------------------
// The switch

/// A learning Ethernet switch over QEMU `stream` netdevs (each frame: 4-byte big-endian length,
/// then the frame). Unknown and broadcast destinations are flooded to every other port.
pub fn run_switch(listener: UnixListener) {
    type Ports = Arc<Mutex<HashMap<usize, UnixStream>>>;
    let ports: Ports = Arc::new(Mutex::new(HashMap::new()));
    let macs: Arc<Mutex<HashMap<[u8; 6], usize>>> = Arc::new(Mutex::new(HashMap::new()));
    for (id, conn) in listener.incoming().flatten().enumerate() {
        let Ok(writer) = conn.try_clone() else {
            continue;
        };
        ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, writer);
        let (ports, macs) = (ports.clone(), macs.clone());
        std::thread::spawn(move || {
            let mut conn = conn;
            let mut len = [0u8; 4];
            let mut frame = vec![0u8; 65536 + 4];
            loop {
                if conn.read_exact(&mut len).is_err() {
                    break;
                }
                let n = u32::from_be_bytes(len) as usize;
                if n > 65536 || conn.read_exact(&mut frame[4..4 + n]).is_err() {
                    break;
                }
                frame[..4].copy_from_slice(&len);
                let data = &frame[..4 + n];
                if n < 14 {
                    continue;
                }
                let dst: [u8; 6] = data[4..10].try_into().expect("6 bytes");
                let src: [u8; 6] = data[10..16].try_into().expect("6 bytes");
                let target = {
                    let mut m = macs.lock().unwrap_or_else(|e| e.into_inner());
                    m.insert(src, id);
                    if dst[0] & 1 == 0 {
                        m.get(&dst).copied()
                    } else {
                        None
                    }
                };
                let mut p = ports.lock().unwrap_or_else(|e| e.into_inner());
                let mut dead = Vec::new();
                for (pid, w) in p.iter_mut() {
                    if *pid == id || target.is_some_and(|t| t != *pid) {
                        continue;
                    }
                    if w.write_all(data).is_err() {
                        dead.push(*pid);
                    }
                }
                for d in dead {
                    p.remove(&d);
                }
            }
            ports.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The supervisor (a process of its own, so the lab outlives `lab up`)

pub struct SuperviseOptions {
    pub spec: Spec,
    /// The spec's node indexes in the order to start them (`cluster::boot_order`).
    pub order: Vec<usize>,
    pub dir: PathBuf,
    pub images: PathBuf,
    /// Pause between two VM starts: a host with few cores boots them faster one after the
    /// other than all at once (firmware, kernel and the LUKS key derivation are CPU-bound).
    pub stagger: Duration,
    /// At most this many VMs boot at once (started, their join not yet done); 0: no limit.
    pub booting: usize,
    /// Every VM's firmware (`lab up --firmware`).
    pub firmware: Firmware,
    /// Leave the root's re-encryption to each VM's first boot (`lab up --reencrypt-in-guest`)
    /// instead of [`rekey::own_key_before_boot`] on the host.
    pub reencrypt_in_guest: bool,
}

/// How long the supervisor holds the next VM back for a full set of booting ones: a join line
/// it cannot read (a garbled console) must not stall the lab.
const HOLD_MAX: Duration = Duration::from_secs(300);

/// How many of the started nodes have not joined yet, from their serial consoles.
fn booting_now(nodes: &[NodeState]) -> usize {
    nodes
        .iter()
        .filter(|n| {
            let serial = std::fs::read(&n.serial_log).unwrap_or_default();
            serial_join_line(&n.name, &String::from_utf8_lossy(&serial))
                .is_none_or(|(joined, _)| !joined)
        })
        .count()
}

/// Starts the switch and every VM, writes state.json, then waits for SIGTERM/SIGINT; dropping
/// the VMs kills them.
pub fn supervise(o: &SuperviseOptions) -> Result<()> {
    let cluster = o.spec.cluster.as_ref().expect("checked by lab up");
    let sock = o.dir.join("switch.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(Error::io("listening on", &sock))?;
    std::thread::spawn(move || run_switch(listener));
    let mut vms = Vec::new();
    let mut nodes: Vec<NodeState> = Vec::new();
    let enroll_key = crate::rootfs::cache_dir().join(crate::rootfs::ENROLL_KEY);
    for (k, &i) in o.order.iter().enumerate() {
        let n = &o.spec.nodes[i];
        let t = Instant::now();
        let work = o.dir.join("vms").join(&n.name);
        std::fs::create_dir_all(&work).map_err(Error::io("creating", &work))?;
        // Made while the VMs before it boot (the wait below counts from here).
        let disk = if o.reencrypt_in_guest {
            image_of(&o.images, &n.role)
        } else {
            own_disk(&o.images, &n.role, &work, &enroll_key, &n.name)?
        };
        if k > 0 {
            // The next VM starts `stagger` after the last one, and once fewer than `booting`
            // are still booting: eleven TCG guests booting at once on two cores each run
            // slower per unit of work (caches, timers firing on guest clocks that run on while
            // the host does not schedule them) than a few at a time, and a guest not started
            // yet costs nothing while it would only wait for the ones before it.
            let mut checked: Option<Instant> = None;
            loop {
                crate::interrupt::check()?;
                if t.elapsed() >= o.stagger
                    && checked.is_none_or(|c| c.elapsed() >= Duration::from_secs(2))
                {
                    checked = Some(Instant::now());
                    if o.booting == 0 || t.elapsed() >= HOLD_MAX || booting_now(&nodes) < o.booting
                    {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let mac = mac_of(i + 1);
        let memory = n.memory_mib.unwrap_or(1024);
        // A vTPM (swtpm, state beside the VM) for nodes whose unlock policy asks for one.
        let tpm = o
            .spec
            .unlock_policy(&n.role, n.encryption.as_ref())
            .tpm2
            .then(|| work.join("tpm"));
        let data_disks = data_disks(&image_of(&o.images, &n.role), &work)?;
        let vm = Vm::start(VmConfig {
            name: n.name.clone(),
            disk,
            extra_disks: vec![o.dir.join("seeds").join(format!("{}.img", n.name))],
            firmware: o.firmware,
            memory_mib: memory,
            cpus: 1,
            workdir: work,
            network: false,
            forwards: Vec::new(),
            kernel: None,
            lan: Some((sock.clone(), mac.clone())),
            tpm,
            guest_services: Vec::new(),
            data_disks,
        })?;
        // What others wait for gets the CPU first: the k-th VM in boot order runs at nice
        // 2k (at most 19). On few cores every guest boots at once otherwise, each at a
        // fraction of a core, and the whole critical path (database, storage, first app
        // server) waits behind guests nobody waits for. A booted guest idles, so a late one
        // still gets the CPU when the early ones are done.
        renice(vm.pid(), (2 * k as i32).min(19));
        nodes.push(NodeState {
            name: n.name.clone(),
            role: n.role.clone(),
            address: n.address.clone(),
            mac,
            memory_mib: memory,
            qemu_pid: vm.pid(),
            qga: vm.paths().qga_socket.clone(),
            serial_log: vm.serial_log().to_path_buf(),
        });
        vms.push(vm);
        write_state(&o.dir, &cluster.name, &nodes)?;
    }
    while crate::interrupt::check().is_ok() {
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(vms);
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

/// A node's own disk (`<work>/disk.qcow2`, over its role's image), its root re-encrypted on
/// the host under a fresh volume key ([`rekey::own_key_before_boot`]). The role's image itself
/// when the enrollment key here does not open it (built on another machine): that VM's first
/// boot re-encrypts, as a cloud instance's does.
fn own_disk(
    images: &Path,
    role: &str,
    work: &Path,
    enroll_key: &Path,
    node: &str,
) -> Result<PathBuf> {
    let image = image_of(images, role);
    let extent = rekey::RootExtent::from_manifest(&image.with_file_name("manifest.json"))?;
    let disk = work.join("disk.qcow2");
    if !enroll_key.exists() {
        println!(
            "{node}: no enrollment key at {}: the first boot re-encrypts the root",
            enroll_key.display()
        );
        return Ok(image);
    }
    match rekey::own_key_before_boot(&image, "qcow2", &extent, enroll_key, &disk)? {
        rekey::BeforeBoot::Done { bytes, seconds } => {
            println!(
                "{node}: root re-encrypted on the host under its own volume key ({} MiB in {seconds:.1} s)",
                bytes >> 20
            );
            Ok(disk)
        }
        rekey::BeforeBoot::KeyDoesNotOpen => {
            println!(
                "{node}: {} does not open {} (built on another machine): the first boot re-encrypts the root",
                enroll_key.display(),
                image.display()
            );
            Ok(image)
        }
    }
}

/// Sets the nice value of every thread of process `pid` (Linux's nice is per thread; threads
/// made later inherit it from the main thread). Best effort: a failure leaves the priority.
fn renice(pid: u32, nice: i32) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
            // SAFETY: setpriority has no memory effects.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
        }
    }
}

fn write_state(dir: &Path, cluster: &str, nodes: &[NodeState]) -> Result<()> {
    let state = State {
        cluster: cluster.to_string(),
        supervisor_pid: std::process::id(),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        nodes: nodes.to_vec(),
    };
    let p = dir.join("state.json");
    let tmp = dir.join("state.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&state).expect("serialisable"),
    )
    .map_err(Error::io("writing", &tmp))?;
    std::fs::rename(&tmp, &p).map_err(Error::io("writing", &p))
}

// ---------------------------------------------------------------------------------------------
// up / status / down

pub struct UpOptions {
    pub spec: Spec,
    pub spec_path: PathBuf,
    pub project: Project,
    pub dir: PathBuf,
    pub images: PathBuf,
    pub timeout: Duration,
    pub stagger: Duration,
    /// At most this many VMs boot at once (see `SuperviseOptions::booting`).
    pub booting: usize,
    pub firmware: Firmware,
    /// See [`SuperviseOptions::reencrypt_in_guest`].
    pub reencrypt_in_guest: bool,
    /// Keep the lab when `up` fails (to look inside).
    pub keep_on_failure: bool,
}

pub fn read_state(dir: &Path) -> Result<State> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| {
        Error::invalid(
            format!("no lab at {} ({e})", dir.display()),
            "start one with `ncimage lab up --spec S`",
        )
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::invalid(format!("{}: {e}", p.display()), "run `ncimage lab down`"))
}

fn alive(pid: u32) -> bool {
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

const PANIC: &str = "kernel panic";

/// The panic message of the last boot in a serial log (after its last kernel banner), if any:
/// a guest that panics before its pvpanic driver loads would otherwise look like a slow boot.
pub fn kernel_panic(serial: &str) -> Option<String> {
    let last_boot = serial.rfind("Linux version").unwrap_or(0);
    let tail = &serial[last_boot..];
    let at = tail.find("Kernel panic - not syncing:")?;
    let line = tail[at..].lines().next().unwrap_or("");
    Some(line.trim_end_matches(" ]---").trim().to_string())
}

/// A node's join line as its serial console shows it: the last `ncimage join` line of the
/// last boot (the join prints one as each step starts, and its outcome), and whether it says
/// joined. Reading the log costs the guest nothing, unlike running `ncimage status` in a guest
/// that shares the host's CPU with every other one still booting.
pub fn serial_join_line(name: &str, serial: &str) -> Option<(bool, String)> {
    let last_boot = serial.rfind("Linux version").unwrap_or(0);
    let prefix = format!("ncimage: {name} (");
    let line = serial[last_boot..]
        .lines()
        .filter_map(|l| l.find(&prefix).map(|at| l[at..].trim_end()))
        .next_back()?;
    Some((line.contains(": joined in"), line.to_string()))
}

/// A node's join line from /run/ncimage/join.json, read by its guest agent (guest-file-read:
/// no process runs in the guest).
fn agent_join_line(n: &NodeState) -> (bool, String) {
    let agent = Agent::new(&n.name, &n.qga);
    match agent.read_file(
        &format!("/{}", crate::join::status_path(Path::new("")).display()),
        Duration::from_secs(5),
    ) {
        Ok(json) => match serde_json::from_slice::<crate::join::Status>(&json) {
            Ok(s) => (s.state == crate::join::State::Joined, s.line()),
            Err(e) => (false, format!("{}: unreadable join status ({e})", n.name)),
        },
        Err(_) => (
            false,
            format!(
                "{}: booting (join not started, or no guest agent yet)",
                n.name
            ),
        ),
    }
}

/// What `lab up` shows of a node while it waits: a dead QEMU, a kernel panic, or the last join
/// line on the serial console. `ask_agent` also reads the join's status file through the guest
/// agent (a console line can be garbled by kernel messages written at the same time). None:
/// nothing to show yet but "booting", or nothing new.
fn watch_status(n: &NodeState, ask_agent: bool) -> Option<(bool, String)> {
    if !alive(n.qemu_pid) {
        return Some(node_status(n));
    }
    let serial = std::fs::read(&n.serial_log).unwrap_or_default();
    let serial = String::from_utf8_lossy(&serial);
    if let Some(panic) = kernel_panic(&serial) {
        return Some((
            false,
            format!(
                "{}: {PANIC} at boot: {panic} (serial log: {})",
                n.name,
                n.serial_log.display()
            ),
        ));
    }
    match serial_join_line(&n.name, &serial) {
        Some((true, line)) => Some((true, line)),
        _ if ask_agent => Some(agent_join_line(n)),
        other => other,
    }
}

/// One node's status line, from `ncimage status` in the guest (or why there is none).
pub fn node_status(n: &NodeState) -> (bool, String) {
    if !alive(n.qemu_pid) {
        return (
            false,
            format!(
                "{}: QEMU is not running (serial log: {})",
                n.name,
                n.serial_log.display()
            ),
        );
    }
    let agent = Agent::new(&n.name, &n.qga);
    if agent
        .call("guest-ping", serde_json::json!({}), Duration::from_secs(3))
        .is_err()
    {
        if let Some(panic) = std::fs::read(&n.serial_log)
            .ok()
            .and_then(|log| kernel_panic(&String::from_utf8_lossy(&log)))
        {
            return (
                false,
                format!(
                    "{}: {PANIC} at boot: {panic} (serial log: {})",
                    n.name,
                    n.serial_log.display()
                ),
            );
        }
        return (false, format!("{}: booting (no guest agent yet)", n.name));
    }
    match agent.exec(
        &["/usr/local/sbin/ncimage", "status"],
        None,
        Duration::from_secs(20),
    ) {
        Ok(o) if o.code == 0 => {
            // `ncimage status` prints the node's line and the encryption's: show the node's.
            let out = o.stdout.trim();
            let own = format!("ncimage: {} (", n.name);
            let line = out.lines().find(|l| l.starts_with(&own)).unwrap_or(out);
            (line.contains(": joined in"), line.to_string())
        }
        // `ncimage status` fails until the join has started (first boot still running).
        Ok(o) if o.stderr.contains("no join status") => (
            false,
            format!("{}: first boot running (join not started yet)", n.name),
        ),
        Ok(o) => (
            false,
            format!(
                "{}: `ncimage status` failed: {}",
                n.name,
                o.stderr.lines().last().unwrap_or("").trim()
            ),
        ),
        Err(_) => (false, format!("{}: booting (no guest agent yet)", n.name)),
    }
}

/// Runs a bash script in a node through its guest agent.
pub fn exec(n: &NodeState, script: &str, timeout: Duration) -> Result<crate::qemu::ExecOutput> {
    Agent::new(&n.name, &n.qga).exec(&["/bin/bash", "-c", script], None, timeout)
}

/// CPU time (user + system) a process has used, in seconds, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    stat_cpu_seconds(&stat, hz as f64)
}

/// Field `n` (numbered as in proc(5): 3 is the state) of a `/proc/<pid>/stat` line. The
/// process name (field 2, in parentheses) may hold spaces and parentheses: fields count from
/// its end.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(n.checked_sub(3)?)
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line in seconds (`hz` ticks a
/// second).
pub fn stat_cpu_seconds(stat: &str, hz: f64) -> Option<f64> {
    let utime: f64 = stat_field(stat, 14)?.parse().ok()?;
    let stime: f64 = stat_field(stat, 15)?.parse().ok()?;
    (hz > 0.0).then(|| (utime + stime) / hz)
}

/// What `lab up` measured: when each node's console said `joined` (seconds after `lab up`
/// started) and the CPU its QEMU process had used by then; every QEMU's CPU when the last
/// node joined. Under TCG a guest's work is host CPU: these say whether a lab was bound by the
/// host's cores (their sum against cores × seconds) and compare runs on a host whose speed
/// varies.
#[derive(Debug, Clone, Default)]
pub struct UpFigures {
    pub seconds: f64,
    /// Node name → (seconds after `lab up` started, QEMU CPU-seconds by then).
    pub joins: BTreeMap<String, (f64, f64)>,
    /// Every QEMU's CPU-seconds when the last node joined.
    pub cpu_all: f64,
}

impl UpFigures {
    /// CPU-seconds the QEMU processes used by their own joins.
    pub fn cpu_by_joins(&self) -> f64 {
        self.joins.values().map(|j| j.1).sum()
    }

    /// One line: the CPU figures against what the host's cores could give in that time.
    pub fn summary(&self, cores: usize) -> String {
        format!(
            "QEMU CPU: {:.0} s by the joins, {:.0} s in all when the last node joined: {:.2} of {} cores busy on average over {:.0} s",
            self.cpu_by_joins(),
            self.cpu_all,
            if self.seconds > 0.0 { self.cpu_all / self.seconds } else { 0.0 },
            cores,
            self.seconds
        )
    }
}

/// Memory the node's QEMU process holds on the host (VmRSS), MiB.
pub fn rss_mib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024)
}

pub fn up(o: &UpOptions, say: &dyn Fn(&str)) -> Result<(State, UpFigures)> {
    crate::cluster::check_roles(&o.spec, &o.project)?;
    let order = crate::cluster::boot_order(&o.spec, &o.project)?;
    let cluster = o.spec.cluster.as_ref().expect("checked");
    if o.dir.join("state.json").exists() {
        if let Ok(s) = read_state(&o.dir) {
            if alive(s.supervisor_pid) {
                return Err(Error::invalid(
                    format!("a lab of `{}` is up in {}", s.cluster, o.dir.display()),
                    "`ncimage lab down` first, or use `ncimage lab status`",
                ));
            }
        }
    }
    let mut missing = Vec::new();
    for n in &o.spec.nodes {
        let img = image_of(&o.images, &n.role);
        if !img.is_file() && !missing.contains(&n.role) {
            missing.push(n.role.clone());
        }
    }
    if !missing.is_empty() {
        return Err(Error::invalid(
            format!("no image for role(s) {} under {}", missing.join(", "), o.images.display()),
            "build them first: `ncimage build --all` (app and collabora from a spec with their archives, e.g. `just fixtures`)",
        ));
    }
    let _ = std::fs::remove_dir_all(&o.dir);
    enough_space(disk_needed(&o.spec, &o.images), free_bytes(&o.dir)?, &o.dir)?;
    std::fs::create_dir_all(o.dir.join("seeds")).map_err(Error::io("creating", &o.dir))?;
    say(&format!(
        "boot order (what others wait for first): {}",
        order
            .iter()
            .map(|&i| o.spec.nodes[i].name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let r = up_inner(o, cluster, say);
    if r.is_err() && !o.keep_on_failure {
        let _ = down(&o.dir);
    }
    r
}

fn up_inner(
    o: &UpOptions,
    cluster: &crate::cluster::ClusterSettings,
    say: &dyn Fn(&str),
) -> Result<(State, UpFigures)> {
    let t = Instant::now();
    let secrets_file = o.dir.join("secrets.toml");
    crate::secrets::init(&o.spec, &o.project, &secrets_file)?;
    for (i, n) in o.spec.nodes.iter().enumerate() {
        crate::seed::write_node(
            &o.spec,
            &o.project,
            &n.name,
            &secrets_file,
            Some(mac_of(i + 1)),
            crate::seed::Format::Vfat,
            &o.dir.join("seeds").join(format!("{}.img", n.name)),
        )?;
    }
    say(&format!(
        "lab {}: {} nodes, seeds written; starting the switch and the VMs",
        cluster.name,
        o.spec.nodes.len()
    ));
    let log = o.dir.join("supervisor.log");
    let logf = std::fs::File::create(&log).map_err(Error::io("creating", &log))?;
    let exe = std::env::current_exe().map_err(Error::io("locating", "ncimage"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["lab", "supervise", "--dir"])
        .arg(&o.dir)
        .arg("--spec")
        .arg(&o.spec_path)
        .arg("--images")
        .arg(&o.images)
        .arg("--stagger")
        .arg(o.stagger.as_secs().to_string())
        .arg("--booting")
        .arg(o.booting.to_string())
        .arg("--firmware")
        .arg(
            clap::ValueEnum::to_possible_value(&o.firmware)
                .map(|v| v.get_name().to_string())
                .unwrap_or_default(),
        )
        .args(o.reencrypt_in_guest.then_some("--reencrypt-in-guest"))
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone().map_err(Error::io("opening", &log))?)
        .stderr(logf);
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(Error::io("starting", "ncimage lab supervise"))?;
    // The supervisor writes state.json once every QEMU runs.
    let first = loop {
        crate::interrupt::check()?;
        if let Ok(s) = read_state(&o.dir) {
            break s;
        }
        // try_wait, not kill(pid, 0): a supervisor that exited is a zombie until reaped.
        if !matches!(child.try_wait(), Ok(None)) {
            return Err(Error::Vm(format!(
                "the lab's supervisor stopped: {}",
                std::fs::read_to_string(&log).unwrap_or_default().trim()
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    say(&format!(
        "first VM ({}) running after {:.0} s; the others follow in boot order, {} s apart and at most {} booting at once; waiting for every node to join",
        first.nodes[0].name,
        t.elapsed().as_secs_f64(),
        o.stagger.as_secs(),
        o.booting
    ));
    let mut last: HashMap<String, String> = HashMap::new();
    // Nodes that reported `joined` are not looked at again: only their QEMU is watched. The
    // others are read from their serial consoles, and once a minute from their join status
    // file through the guest agent. Nothing runs in a guest: a process started there (such as
    // `ncimage status`) costs a second of CPU shared with every guest still booting.
    let mut joined_nodes: std::collections::HashSet<String> = Default::default();
    let mut asked: HashMap<String, Instant> = HashMap::new();
    let mut figures = UpFigures::default();
    loop {
        crate::interrupt::check()?;
        let state = read_state(&o.dir)?;
        let mut all = state.nodes.len() == o.spec.nodes.len();
        // One agent per round (a round is a few seconds), each at most once a minute.
        let ask = state
            .nodes
            .iter()
            .filter(|n| !joined_nodes.contains(&n.name))
            .filter(|n| {
                asked
                    .get(&n.name)
                    .is_none_or(|a| a.elapsed() >= Duration::from_secs(60))
            })
            .min_by_key(|n| asked.get(&n.name).copied())
            .map(|n| n.name.clone());
        if let Some(a) = &ask {
            asked.insert(a.clone(), Instant::now());
        }
        for n in &state.nodes {
            let (joined, line) = if joined_nodes.contains(&n.name) && alive(n.qemu_pid) {
                (true, last.get(&n.name).cloned().unwrap_or_default())
            } else {
                match watch_status(n, ask.as_ref() == Some(&n.name)) {
                    Some(s) => s,
                    // Nothing new: the line shown last stands.
                    None => {
                        all = false;
                        continue;
                    }
                }
            };
            if joined && joined_nodes.insert(n.name.clone()) {
                figures.joins.insert(
                    n.name.clone(),
                    (
                        t.elapsed().as_secs_f64(),
                        cpu_seconds(n.qemu_pid).unwrap_or(0.0),
                    ),
                );
            }
            all &= joined;
            if last.get(&n.name) != Some(&line) {
                say(&format!("{:>6.0} s  {line}", t.elapsed().as_secs_f64()));
                // A failed join is tried again by its unit (Restart=on-failure): only a dead
                // VM ends the wait early.
                if line.contains("QEMU is not running") || line.contains(PANIC) {
                    return Err(Error::Vm(format!("lab {}: {line}", cluster.name)));
                }
                last.insert(n.name.clone(), line);
            }
        }
        if all {
            figures.seconds = t.elapsed().as_secs_f64();
            figures.cpu_all = state
                .nodes
                .iter()
                .filter_map(|n| cpu_seconds(n.qemu_pid))
                .sum();
            say(&format!(
                "lab {}: every node joined after {:.0} s",
                cluster.name, figures.seconds
            ));
            return Ok((state, figures));
        }
        if t.elapsed() > o.timeout {
            return Err(Error::Vm(format!(
                "lab {}: not every node joined within {} s (see `ncimage lab status`, serial logs under {})",
                cluster.name,
                o.timeout.as_secs(),
                o.dir.join("vms").display()
            )));
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// Stops the supervisor (and with it every VM and the switch) and removes the lab's folder.
pub fn down(dir: &Path) -> Result<()> {
    if let Ok(s) = read_state(dir) {
        let pids: Vec<u32> = std::iter::once(s.supervisor_pid)
            .chain(s.nodes.iter().map(|n| n.qemu_pid))
            .collect();
        unsafe { libc::kill(s.supervisor_pid as i32, libc::SIGTERM) };
        let t = Instant::now();
        while pids.iter().any(|p| alive(*p)) && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(200));
        }
        for p in pids.iter().filter(|p| alive(**p)) {
            unsafe { libc::kill(*p as i32, libc::SIGKILL) };
        }
    } else {
        // A supervisor that never wrote its state: find it by its folder argument.
        let me = dir.to_string_lossy().to_string();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let args: Vec<String> = cmdline
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).to_string())
                    .collect();
                if args.iter().any(|a| a == "supervise") && args.contains(&me) {
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(Error::io("removing", dir))?;
    }
    Ok(())
}

/// A sparse data disk per volume the image declares (its manifest's `volumes`), in the VM's
/// folder.
fn data_disks(image: &Path, work: &Path) -> Result<Vec<(PathBuf, String)>> {
    let manifest = image.with_file_name("manifest.json");
    let volumes: Vec<crate::layer::VolumeDecl> = std::fs::read_to_string(&manifest)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|m| serde_json::from_value(m.get("volumes")?.clone()).ok())
        .unwrap_or_default();
    crate::vmtest::data_disks(&volumes, work)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_from_proc_stat_even_with_odd_process_names() {
        // A QEMU guest name can put spaces and parentheses into the process name.
        let line = "4242 (qemu (lab) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 2500 730 0 0 20 0 5 0 1000 0 0";
        assert_eq!(stat_cpu_seconds(line, 100.0), Some(32.3));
        assert_eq!(stat_cpu_seconds(line, 0.0), None);
        assert_eq!(stat_cpu_seconds("4242 (qemu) S 1 2", 100.0), None);
        assert_eq!(stat_cpu_seconds("no name here", 100.0), None);
        assert_eq!(stat_field(line, 3), Some("S"));
        assert_eq!(stat_field(line, 2), None);
        // This process: its CPU time grows with work done (however busy the machine is, a
        // tenth of a second of CPU comes within a minute).
        let before = cpu_seconds(std::process::id()).unwrap();
        let t = Instant::now();
        let mut x = 0u64;
        let mut after = before;
        while after - before < 0.1 && t.elapsed() < Duration::from_secs(60) {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            after = cpu_seconds(std::process::id()).unwrap();
        }
        assert!(after - before >= 0.1, "{before} -> {after}");
        assert_eq!(cpu_seconds(u32::MAX), None);
    }

    #[test]
    fn up_figures_say_how_busy_the_cores_were() {
        let mut f = UpFigures {
            seconds: 1000.0,
            cpu_all: 1900.0,
            ..Default::default()
        };
        f.joins.insert("db-1".into(), (200.0, 180.0));
        f.joins.insert("lb-1".into(), (1000.0, 160.5));
        assert_eq!(f.cpu_by_joins(), 340.5);
        assert_eq!(
            f.summary(2),
            "QEMU CPU: 340 s by the joins, 1900 s in all when the last node joined: 1.90 of 2 cores busy on average over 1000 s"
        );
        assert!(UpFigures::default().summary(2).contains("0.00 of 2 cores"));
    }

    #[test]
    fn a_panic_of_the_last_boot_is_found_in_the_serial_log() {
        let panic = "[    0.000000] Linux version 6.12\n[    0.116000] ---[ end Kernel panic - not syncing: IO-APIC + timer doesn't work!  Boot with apic=debug and send a report.  Then try booting with the 'noapic' option. ]---\n";
        let found = kernel_panic(panic).unwrap();
        assert!(
            found.starts_with("Kernel panic - not syncing: IO-APIC + timer"),
            "{found}"
        );
        assert!(found.ends_with("option."), "{found}");
        // Rebooted since (the lab's reset): the new boot has no panic.
        let rebooted = format!("{panic}[    0.000000] Linux version 6.12\nWelcome to Debian\n");
        assert_eq!(kernel_panic(&rebooted), None);
        assert_eq!(kernel_panic("Linux version 6.12\nlogin:"), None);
    }

    #[test]
    fn a_check_that_needs_a_failed_checks_output_is_not_run() {
        let missing = vec![("db2_boot".to_string(), "record db-2's boot id".to_string())];
        let run = "test \"$(cat /proc/sys/kernel/random/boot_id)\" != '{{ saved.db2_boot }}'";
        assert_eq!(
            blocked_by(run, &missing).map(|m| m.1.as_str()),
            Some("record db-2's boot id")
        );
        // Another key with the same beginning is not that output.
        assert_eq!(blocked_by("echo {{ saved.db2_boot_time }}", &missing), None);
        assert_eq!(blocked_by("echo {{ saved.app2_boot }}", &missing), None);
    }

    #[test]
    fn the_join_line_is_read_from_the_last_boot_on_the_serial_console() {
        let first = "[    0.000000] Linux version 6.12\r\nncimage: app-1 (app) of lab: joining (1/3: app/10-wait.sh)\r\n[   40.1] random: crng init done\r\n";
        assert_eq!(
            serial_join_line("app-1", first),
            Some((
                false,
                "ncimage: app-1 (app) of lab: joining (1/3: app/10-wait.sh)".to_string()
            ))
        );
        // Another node's line and a line behind a kernel message's text are told apart.
        let joined = format!("{first}ncimage: app-2 (app) of lab: joined in 3 s\r\n[ 90.2] eth0: up ncimage: app-1 (app) of lab: joined in 51 s\r\n");
        assert_eq!(
            serial_join_line("app-1", &joined),
            Some((
                true,
                "ncimage: app-1 (app) of lab: joined in 51 s".to_string()
            ))
        );
        assert_eq!(
            serial_join_line("app-10", &joined),
            None,
            "app-10 is not app-1"
        );
        // A failed step is shown but is not joined (its unit tries again).
        let failed = format!("{first}ncimage: app-1 (app) of lab: join failed at app/10-wait.sh: waited 300 s for db-1:3306\r\n");
        assert!(!serial_join_line("app-1", &failed).unwrap().0);
        // After a reboot, the earlier boot's lines do not count.
        let rebooted = format!("{joined}[    0.000000] Linux version 6.12\r\n");
        assert_eq!(serial_join_line("app-1", &rebooted), None);
    }

    #[test]
    fn a_node_boots_until_its_console_says_joined() {
        let dir = tempfile::tempdir().unwrap();
        let node = |name: &str, serial: &str| {
            let log = dir.path().join(format!("{name}.log"));
            std::fs::write(&log, serial).unwrap();
            NodeState {
                name: name.into(),
                role: "db".into(),
                address: "10.0.0.1".into(),
                mac: mac_of(1),
                memory_mib: 512,
                qemu_pid: 0,
                qga: dir.path().join("qga.sock"),
                serial_log: log,
            }
        };
        let boot = "[    0.000000] Linux version 6.12\r\n";
        let nodes = vec![
            node(
                "db-1",
                &format!("{boot}ncimage: db-1 (db) of lab: joined in 63 s\r\n"),
            ),
            node(
                "db-2",
                &format!("{boot}ncimage: db-2 (db) of lab: joining (1/2: db/10-replica.sh)\r\n"),
            ),
            // Started, nothing on its console yet.
            node("nfs-1", boot),
        ];
        assert_eq!(booting_now(&nodes), 2);
        assert_eq!(booting_now(&nodes[..1]), 0);
    }

    #[test]
    fn a_lab_that_would_fill_its_disk_is_refused() {
        let spec = Spec::parse("lab.toml", include_str!("../../image-specs/lab.toml")).unwrap();
        let images = tempfile::tempdir().unwrap();
        // No manifests: 2 GiB per root; one manifest says its root is 1 GiB.
        let without = disk_needed(&spec, images.path());
        assert_eq!(without, spec.nodes.len() as u64 * (3 << 30));
        std::fs::create_dir_all(images.path().join("db")).unwrap();
        std::fs::write(
            images.path().join("db/manifest.json"),
            r#"{"filesystems": {"root": {"size_bytes": 1073741824}}}"#,
        )
        .unwrap();
        let dbs = spec.nodes.iter().filter(|n| n.role == "db").count() as u64;
        assert!(dbs > 0);
        assert_eq!(disk_needed(&spec, images.path()), without - dbs * (1 << 30));

        let dir = Path::new("/var/tmp/ncimage-lab-x");
        assert!(enough_space(20 << 30, 20 << 30, dir).is_ok());
        let e = enough_space(25 << 30, 9 << 30, dir)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs about 25 GiB free under /var/tmp/ncimage-lab-x and 9 GiB are free"),
            "{e}"
        );
        assert!(free_bytes(&dir.join("not/yet")).unwrap() > 0);
    }

    #[test]
    fn renice_sets_every_thread() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        renice(child.id(), 7);
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let nice: i32 = stat_field(&stat, 19).unwrap().parse().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(nice, 7, "{stat}");
    }

    fn frame(dst: [u8; 6], src: [u8; 6], body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(body);
        let mut out = (f.len() as u32).to_be_bytes().to_vec();
        out.extend(f);
        out
    }

    fn read_frame(s: &mut UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut f).unwrap();
        f
    }

    #[test]
    fn the_switch_floods_then_learns() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("s.sock");
        let l = UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || run_switch(l));
        let mut a = UnixStream::connect(&sock).unwrap();
        let mut b = UnixStream::connect(&sock).unwrap();
        let mut c = UnixStream::connect(&sock).unwrap();
        for s in [&a, &b, &c] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        let (ma, mb) = ([2, 0, 0, 0, 0, 0xa], [2, 0, 0, 0, 0, 0xb]);
        // Broadcast from a reaches b and c.
        a.write_all(&frame([0xff; 6], ma, b"hello")).unwrap();
        assert!(read_frame(&mut b).ends_with(b"hello"));
        assert!(read_frame(&mut c).ends_with(b"hello"));
        // b answers a by unicast: only a gets it (the switch learnt a's MAC).
        b.write_all(&frame(ma, mb, b"to-a")).unwrap();
        assert!(read_frame(&mut a).ends_with(b"to-a"));
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 1];
        assert!(c.read(&mut buf).is_err(), "c saw a unicast frame for a");
    }

    #[test]
    fn macs_are_stable_and_local() {
        assert_eq!(mac_of(1), "52:54:00:4c:00:01");
        assert_eq!(mac_of(300), "52:54:00:4c:01:2c");
    }
}

// ---------------------------------------------------------------------------------------------
// lab test: cluster-level checks (data: qemu-tests/lab/checks.toml)

/// One cluster-level check: a script run on one node (Tera over `cluster` and `saved`), its
/// expected output, retried until it passes or `retry_for` seconds are over; `save` keeps its
/// trimmed stdout for later checks (`saved.<name>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabCheck {
    pub name: String,
    /// Node name.
    pub on: String,
    pub run: String,
    #[serde(default)]
    pub exit: i32,
    pub stdout: Option<String>,
    #[serde(default)]
    pub contains: Vec<String>,
    #[serde(default)]
    pub not_contains: Vec<String>,
    #[serde(default = "d_timeout")]
    pub timeout: u64,
    #[serde(default)]
    pub retry_for: u64,
    pub save: Option<String>,
}
fn d_timeout() -> u64 {
    120
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabChecks {
    check: Vec<LabCheck>,
}

pub fn load_checks(path: &Path) -> Result<Vec<LabCheck>> {
    let text = std::fs::read_to_string(path).map_err(Error::io("reading", path))?;
    let f: LabChecks = toml::from_str(&text).map_err(|e| {
        Error::toml(
            &path.display().to_string(),
            &text,
            &e,
            "each [[check]] has name, on, run and what to expect",
        )
    })?;
    Ok(f.check)
}

/// Runs the checks in order; returns (passed, failed). Output is redacted with the lab's
/// secrets before it is printed.
/// The first output a check's script uses (`saved.<key>`) that an earlier, failed check did not
/// save: (key, that check's name).
fn blocked_by<'a>(run: &str, missing: &'a [(String, String)]) -> Option<&'a (String, String)> {
    missing.iter().find(|(k, _)| {
        run.match_indices(&format!("saved.{k}")).any(|(at, m)| {
            !run[at + m.len()..].starts_with(|ch: char| ch.is_ascii_alphanumeric() || ch == '_')
        })
    })
}

pub fn test(
    dir: &Path,
    spec: &Spec,
    checks: &[LabCheck],
    say: &dyn Fn(&str),
) -> Result<(usize, usize)> {
    let state = read_state(dir)?;
    let cluster = spec
        .cluster
        .as_ref()
        .map(|c| c.name.clone())
        .unwrap_or_default();
    let secrets =
        crate::secrets::Secrets(crate::secrets::load(&dir.join("secrets.toml"), &cluster)?);
    let mut saved = serde_json::Map::new();
    // Outputs that failed checks would have saved: (key, check name).
    let mut missing: Vec<(String, String)> = Vec::new();
    let (mut passed, mut failed) = (0, 0);
    for c in checks {
        crate::interrupt::check()?;
        let node = state.nodes.iter().find(|n| n.name == c.on).ok_or_else(|| {
            Error::invalid(
                format!(
                    "check `{}` runs on `{}`, which is not in the lab",
                    c.name, c.on
                ),
                "use a node name of the spec",
            )
        })?;
        // A check that uses the output of one that failed is not run: it fails, naming why.
        if let Some((k, by)) = blocked_by(&c.run, &missing) {
            failed += 1;
            say(&format!(
                "FAIL {} / {}\n     not run: it uses `saved.{k}`, which the failed check `{by}` did not save",
                c.on, c.name
            ));
            if let Some(k) = &c.save {
                missing.push((k.clone(), c.name.clone()));
            }
            continue;
        }
        let ctx = serde_json::json!({ "cluster": crate::cluster::topology(spec), "saved": saved });
        let script = crate::template::render(&c.name, &c.run, &ctx)?;
        let as_check = crate::layer::Check {
            name: c.name.clone(),
            run: c.run.clone(),
            exit: c.exit,
            stdout: c.stdout.clone(),
            contains: c.contains.clone(),
            not_contains: c.not_contains.clone(),
            timeout: c.timeout,
        };
        let t = Instant::now();
        let verdict = loop {
            let v = match exec(node, &script, Duration::from_secs(c.timeout)) {
                Ok(o) => crate::vmtest::judge(&as_check, &ctx, o.code, &o.stdout, &o.stderr)?
                    .map(Err)
                    .unwrap_or(Ok(o.stdout.trim().to_string())),
                Err(e) => Err(e.to_string()),
            };
            if v.is_ok() || t.elapsed().as_secs() >= c.retry_for {
                break v;
            }
            crate::interrupt::check()?;
            std::thread::sleep(Duration::from_secs(3));
        };
        match verdict {
            Ok(out) => {
                passed += 1;
                say(&format!(
                    "ok   {} / {} ({:.0} s)",
                    c.on,
                    c.name,
                    t.elapsed().as_secs_f64()
                ));
                if let Some(k) = &c.save {
                    saved.insert(k.clone(), serde_json::Value::String(out));
                }
            }
            Err(why) => {
                failed += 1;
                if let Some(k) = &c.save {
                    missing.push((k.clone(), c.name.clone()));
                }
                say(&format!(
                    "FAIL {} / {}\n     {}",
                    c.on,
                    c.name,
                    secrets.redact(&why)
                ));
            }
        }
    }
    say(&format!("{passed} passed, {failed} failed"));
    Ok((passed, failed))
}
