//! The attribution records on disk: one redb file per UTC day (`flows-YYYY-MM-DD.redb`
//! under `state_dir/attribution/`, owner-only), by the day a flow started; a day's file is
//! deleted whole once it is older than the days kept.
//!
//! A flow is 77 bytes before redb's own overhead: its key (egress IP, egress port,
//! protocol, first time, conntrack id; 31 bytes, so one B-tree range finds every flow of
//! an egress IP and port) and a fixed-width value (destination, last time, bytes each
//! way, the lease's number in the file's `leases` table; 46 bytes). A lease is written
//! once per file, as JSON.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::event::Proto;
use super::time::{day, day_name, day_of_name, rfc3339};
use super::{AttributionError, FlowRecord, LeaseInfo};

const FLOWS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("flows");
const LEASES: TableDefinition<u32, &[u8]> = TableDefinition::new("leases");
const KEY_LEN: usize = 31;
const VALUE_LEN: usize = 46;
/// "None" in a stored number: no lease, no byte count, not ended.
const NONE32: u32 = u32::MAX;
const NONE64: u64 = u64::MAX;

/// Where a flow's mapping is found: its egress address and port, and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mapping {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

/// What the recorder writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A flow began at `first`.
    Open {
        mapping: Mapping,
        first: u64,
        id: u32,
        destination: (IpAddr, u16),
        lease: Option<LeaseInfo>,
    },
    /// A flow ended at `last`. Its start is looked up; when it was never recorded, it is
    /// recorded now, without a first time, with `lease` as it is at its end.
    Close {
        mapping: Mapping,
        last: u64,
        id: u32,
        destination: (IpAddr, u16),
        bytes: (Option<u64>, Option<u64>),
        lease: Option<LeaseInfo>,
    },
}

/// One stored flow, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stored {
    mapping: Mapping,
    first: u64,
    id: u32,
    destination: (IpAddr, u16),
    last: Option<u64>,
    bytes: (Option<u64>, Option<u64>),
    lease: u32,
}

fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn ip_of(bytes: &[u8]) -> IpAddr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&bytes[..16]);
    Ipv6Addr::from(octets).to_canonical()
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// The first 19 bytes of a key: every flow of one mapping.
fn prefix(m: &Mapping) -> Vec<u8> {
    let mut k = Vec::with_capacity(KEY_LEN);
    k.extend_from_slice(&ip16(m.ip));
    k.extend_from_slice(&m.port.to_be_bytes());
    k.push(m.proto.code());
    k
}

impl Stored {
    fn key(&self) -> Vec<u8> {
        let mut k = prefix(&self.mapping);
        k.extend_from_slice(&self.first.to_be_bytes());
        k.extend_from_slice(&self.id.to_be_bytes());
        k
    }

    fn value(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(VALUE_LEN);
        v.extend_from_slice(&ip16(self.destination.0));
        v.extend_from_slice(&self.destination.1.to_be_bytes());
        v.extend_from_slice(&self.last.unwrap_or(NONE64).to_be_bytes());
        v.extend_from_slice(&self.bytes.0.unwrap_or(NONE64).to_be_bytes());
        v.extend_from_slice(&self.bytes.1.unwrap_or(NONE64).to_be_bytes());
        v.extend_from_slice(&self.lease.to_be_bytes());
        v
    }

    fn decode(key: &[u8], value: &[u8]) -> Option<Stored> {
        if key.len() != KEY_LEN || value.len() != VALUE_LEN {
            return None;
        }
        let some = |n: u64| (n != NONE64).then_some(n);
        Some(Stored {
            mapping: Mapping {
                ip: ip_of(key),
                port: be16(&key[16..]),
                proto: Proto::from_code(key[18]),
            },
            first: be64(&key[19..]),
            id: be32(&key[27..]),
            destination: (ip_of(value), be16(&value[16..])),
            last: some(be64(&value[18..])),
            bytes: (some(be64(&value[26..])), some(be64(&value[34..]))),
            lease: be32(&value[42..]),
        })
    }

    /// Whether the flow held its mapping at `at`.
    fn held_at(&self, at: u64) -> bool {
        self.first <= at && self.last.is_none_or(|last| last >= at)
    }
}

/// One day's file and its leases by number, both ways.
struct DayFile {
    db: Arc<Database>,
    /// Compacted since its day ended.
    compacted: bool,
    numbers: HashMap<LeaseInfo, u32>,
    leases: HashMap<u32, LeaseInfo>,
}

pub struct FlowStore {
    dir: PathBuf,
    days_kept: u32,
    files: Mutex<BTreeMap<u32, DayFile>>,
    /// Where the start of each flow opened since the store was opened was written, so its
    /// end finds it with one lookup rather than a scan of every flow of its mapping (an
    /// egress port busy all day holds thousands).
    open: Mutex<OpenFlows>,
}

/// Flows started and not yet ended: (mapping, conntrack id) → (day, first time). Bounded:
/// past [`OPEN_FLOWS_MAX`] (ends lost, say) it starts over, and ends it no longer knows are
/// found by a scan, as are those of flows opened before the store was.
type OpenFlows = HashMap<(Mapping, u32), (u32, u64)>;

/// Conntrack's default table size on a large host is 262,144; four times that.
const OPEN_FLOWS_MAX: usize = 1 << 20;

fn file_name(day: u32) -> String {
    format!("flows-{}.redb", day_name(day))
}

fn day_of_file(name: &str) -> Option<u32> {
    day_of_name(name.strip_prefix("flows-")?.strip_suffix(".redb")?)
}

impl FlowStore {
    /// Opens (making it, owner-only) `dir` and the day files in it that are still kept.
    pub fn open(dir: &Path, days_kept: u32, today: u32) -> Result<FlowStore, AttributionError> {
        let err = |e: std::io::Error| store_err(dir, e);
        wgexit::fsutil::private_dir(dir).map_err(err)?;
        let store = FlowStore {
            dir: dir.to_path_buf(),
            days_kept,
            files: Mutex::new(BTreeMap::new()),
            open: Mutex::new(HashMap::new()),
        };
        for entry in std::fs::read_dir(dir).map_err(err)? {
            let name = entry.map_err(err)?.file_name();
            if let Some(d) = name.to_str().and_then(day_of_file) {
                if store.kept(d, today) {
                    store.file(&mut store.lock(), d)?;
                } else {
                    wgexit::fsutil::remove_if_exists(&dir.join(file_name(d))).map_err(err)?;
                }
            }
        }
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, DayFile>> {
        match self.files.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn kept(&self, d: u32, today: u32) -> bool {
        d + self.days_kept >= today
    }

    fn err(&self, e: impl std::fmt::Display) -> AttributionError {
        store_err(&self.dir, e)
    }

    /// The day's file, opened (or made) when not yet.
    fn file<'f>(
        &self,
        files: &'f mut BTreeMap<u32, DayFile>,
        d: u32,
    ) -> Result<&'f mut DayFile, AttributionError> {
        if let std::collections::btree_map::Entry::Vacant(slot) = files.entry(d) {
            let path = self.dir.join(file_name(d));
            let db = crate::redb_file::create(&path).map_err(|e| self.err(e))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| self.err(e))?;
            let leases = read_leases(&db).map_err(|e| self.err(e))?;
            let numbers = leases.iter().map(|(n, l)| (l.clone(), *n)).collect();
            slot.insert(DayFile {
                db: Arc::new(db),
                compacted: false,
                numbers,
                leases,
            });
        }
        files
            .get_mut(&d)
            .ok_or_else(|| self.err("day file vanished"))
    }

    /// Deletes the day files older than the days kept.
    pub fn prune(&self, today: u32) -> Result<Vec<u32>, AttributionError> {
        let mut files = self.lock();
        let old: Vec<u32> = files
            .keys()
            .copied()
            .filter(|d| !self.kept(*d, today))
            .collect();
        for d in &old {
            files.remove(d);
            wgexit::fsutil::remove_if_exists(&self.dir.join(file_name(*d)))
                .map_err(|e| self.err(e))?;
        }
        Ok(old)
    }

    /// Compacts the files of the days before `today`, once each: their flows are written,
    /// and redb keeps the pages their ends' updates freed until it is compacted (about
    /// halves a day's file). A file a query is reading is left for the next time.
    pub fn compact_before(&self, today: u32) -> Result<usize, AttributionError> {
        let mut files = self.lock();
        let mut compacted = 0;
        for (_, file) in files.range_mut(..today) {
            if file.compacted {
                continue;
            }
            if let Some(db) = Arc::get_mut(&mut file.db) {
                while db.compact().map_err(|e| self.err(e))? {}
                file.compacted = true;
                compacted += 1;
            }
        }
        Ok(compacted)
    }

    /// Bytes on disk, every day file together.
    pub fn disk_bytes(&self) -> u64 {
        let files = self.lock();
        files
            .keys()
            .filter_map(|d| std::fs::metadata(self.dir.join(file_name(*d))).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Writes `changes` in order, one transaction per day file touched; returns how many
    /// flows were opened or closed.
    pub fn apply(&self, changes: &[Change]) -> Result<usize, AttributionError> {
        let mut files = self.lock();
        let mut txns: BTreeMap<u32, WriteTransaction> = BTreeMap::new();
        for change in changes {
            self.apply_one(&mut files, &mut txns, change)?;
        }
        for (_, txn) in txns {
            txn.commit().map_err(|e| self.err(e))?;
        }
        Ok(changes.len())
    }

    fn txn<'t>(
        &self,
        files: &mut BTreeMap<u32, DayFile>,
        txns: &'t mut BTreeMap<u32, WriteTransaction>,
        d: u32,
    ) -> Result<&'t mut WriteTransaction, AttributionError> {
        if let std::collections::btree_map::Entry::Vacant(slot) = txns.entry(d) {
            let db = self.file(files, d)?.db.clone();
            slot.insert(db.begin_write().map_err(|e| self.err(e))?);
        }
        txns.get_mut(&d)
            .ok_or_else(|| self.err("transaction vanished"))
    }

    fn apply_one(
        &self,
        files: &mut BTreeMap<u32, DayFile>,
        txns: &mut BTreeMap<u32, WriteTransaction>,
        change: &Change,
    ) -> Result<(), AttributionError> {
        match change {
            Change::Open {
                mapping,
                first,
                id,
                destination,
                lease,
            } => {
                let stored = Stored {
                    mapping: *mapping,
                    first: *first,
                    id: *id,
                    destination: *destination,
                    last: None,
                    bytes: (None, None),
                    lease: NONE32,
                };
                self.insert(files, txns, day(*first), stored, lease.as_ref())?;
                let mut open = self.open_flows();
                if open.len() >= OPEN_FLOWS_MAX {
                    open.clear();
                }
                open.insert((*mapping, *id), (day(*first), *first));
                Ok(())
            }
            Change::Close {
                mapping,
                last,
                id,
                destination,
                bytes,
                lease,
            } => {
                if let Some((d, mut stored)) = self.find_open(files, txns, mapping, *id)? {
                    stored.last = Some(*last);
                    stored.bytes = *bytes;
                    return self.put(txns, d, &stored);
                }
                let stored = Stored {
                    mapping: *mapping,
                    first: 0,
                    id: *id,
                    destination: *destination,
                    last: Some(*last),
                    bytes: *bytes,
                    lease: NONE32,
                };
                self.insert(files, txns, day(*last), stored, lease.as_ref())
            }
        }
    }

    /// Writes a new flow into day `d`'s file, its lease numbered there.
    fn insert(
        &self,
        files: &mut BTreeMap<u32, DayFile>,
        txns: &mut BTreeMap<u32, WriteTransaction>,
        d: u32,
        mut stored: Stored,
        lease: Option<&LeaseInfo>,
    ) -> Result<(), AttributionError> {
        if let Some(lease) = lease {
            let file = self.file(files, d)?;
            let number = match file.numbers.get(lease) {
                Some(n) => *n,
                None => {
                    let n = file.leases.len() as u32;
                    let json = serde_json::to_vec(lease).map_err(|e| self.err(e))?;
                    let txn = self.txn(files, txns, d)?;
                    let mut table = txn.open_table(LEASES).map_err(|e| self.err(e))?;
                    table.insert(n, json.as_slice()).map_err(|e| self.err(e))?;
                    let file = self.file(files, d)?;
                    file.numbers.insert(lease.clone(), n);
                    file.leases.insert(n, lease.clone());
                    n
                }
            };
            stored.lease = number;
        }
        self.txn(files, txns, d)?;
        self.put(txns, d, &stored)
    }

    fn put(
        &self,
        txns: &mut BTreeMap<u32, WriteTransaction>,
        d: u32,
        stored: &Stored,
    ) -> Result<(), AttributionError> {
        let txn = txns.get_mut(&d).ok_or_else(|| self.err("no transaction"))?;
        let mut table = txn.open_table(FLOWS).map_err(|e| self.err(e))?;
        table
            .insert(stored.key().as_slice(), stored.value().as_slice())
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

fn store_err(dir: &Path, e: impl std::fmt::Display) -> AttributionError {
    AttributionError::Store {
        path: dir.display().to_string(),
        detail: e.to_string(),
    }
}

fn read_leases(db: &Database) -> Result<HashMap<u32, LeaseInfo>, redb::Error> {
    let mut leases = HashMap::new();
    let txn = db.begin_read()?;
    let table = match txn.open_table(LEASES) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(leases),
        Err(e) => return Err(e.into()),
    };
    for row in table.iter()? {
        let (n, json) = row?;
        if let Ok(lease) = serde_json::from_slice(json.value()) {
            leases.insert(n.value(), lease);
        }
    }
    Ok(leases)
}

/// The key range of every flow of one mapping.
fn range_of(m: &Mapping) -> (Vec<u8>, Vec<u8>) {
    let p = prefix(m);
    let (mut lo, mut hi) = (p.clone(), p);
    lo.resize(KEY_LEN, 0);
    hi.resize(KEY_LEN, 0xff);
    (lo, hi)
}

/// The flows of `m` in `table`, newest first.
fn flows_of(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    m: &Mapping,
) -> Result<Vec<Stored>, redb::Error> {
    let (lo, hi) = range_of(m);
    let mut out = Vec::new();
    for row in table.range(lo.as_slice()..=hi.as_slice())?.rev() {
        let (k, v) = row?;
        if let Some(s) = Stored::decode(k.value(), v.value()) {
            out.push(s);
        }
    }
    Ok(out)
}

/// The flows of `m` in one day's file, as committed.
fn committed_flows(db: &Database, m: &Mapping) -> Result<Vec<Stored>, redb::Error> {
    let txn = db.begin_read()?;
    match txn.open_table(FLOWS) {
        Ok(t) => flows_of(&t, m),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

impl FlowStore {
    /// The open flow `id` of `m` and its day, newest file first (this batch's writes
    /// included).
    fn find_open(
        &self,
        files: &mut BTreeMap<u32, DayFile>,
        txns: &mut BTreeMap<u32, WriteTransaction>,
        m: &Mapping,
        id: u32,
    ) -> Result<Option<(u32, Stored)>, AttributionError> {
        if let Some(found) = self.indexed_open(files, txns, m, id)? {
            return Ok(Some(found));
        }
        let days: Vec<u32> = files.keys().rev().copied().collect();
        for d in days {
            let flows = match txns.get(&d) {
                Some(txn) => {
                    let table = txn.open_table(FLOWS).map_err(|e| self.err(e))?;
                    flows_of(&table, m).map_err(|e| self.err(e))?
                }
                None => {
                    let db = self.file(files, d)?.db.clone();
                    committed_flows(&db, m).map_err(|e| self.err(e))?
                }
            };
            if let Some(s) = flows.into_iter().find(|s| s.id == id && s.last.is_none()) {
                self.txn(files, txns, d)?;
                return Ok(Some((d, s)));
            }
        }
        Ok(None)
    }

    fn open_flows(&self) -> MutexGuard<'_, OpenFlows> {
        match self.open.lock() {
            Ok(o) => o,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The open flow `id` of `m`, if its start was written since the store was opened:
    /// one lookup in its day's file.
    fn indexed_open(
        &self,
        files: &mut BTreeMap<u32, DayFile>,
        txns: &mut BTreeMap<u32, WriteTransaction>,
        m: &Mapping,
        id: u32,
    ) -> Result<Option<(u32, Stored)>, AttributionError> {
        let Some((d, first)) = self.open_flows().remove(&(*m, id)) else {
            return Ok(None);
        };
        if !files.contains_key(&d) {
            return Ok(None);
        }
        let probe = Stored {
            mapping: *m,
            first,
            id,
            destination: (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            last: None,
            bytes: (None, None),
            lease: NONE32,
        };
        let key = probe.key();
        let txn = self.txn(files, txns, d)?;
        let table = txn.open_table(FLOWS).map_err(|e| self.err(e))?;
        let stored = match table.get(key.as_slice()).map_err(|e| self.err(e))? {
            Some(v) => Stored::decode(&key, v.value()),
            None => None,
        };
        Ok(stored.filter(|s| s.last.is_none()).map(|s| (d, s)))
    }

    /// Every flow that held `ip:port` (in one of `protos`) at `at`, in every file kept.
    pub fn who(
        &self,
        ip: IpAddr,
        port: u16,
        protos: &[Proto],
        at: u64,
    ) -> Result<Vec<FlowRecord>, AttributionError> {
        let files: Vec<(Arc<Database>, HashMap<u32, LeaseInfo>)> = self
            .lock()
            .values()
            .map(|f| (f.db.clone(), f.leases.clone()))
            .collect();
        let mut found = Vec::new();
        for (db, leases) in &files {
            for proto in protos {
                let m = Mapping {
                    ip,
                    port,
                    proto: *proto,
                };
                for s in committed_flows(db, &m).map_err(|e| self.err(e))? {
                    if s.held_at(at) {
                        found.push(record(&s, leases));
                    }
                }
            }
        }
        Ok(found)
    }

    /// Every flow that started at or after `since`, oldest day first, to `each` (which
    /// returns false to stop).
    pub fn since(
        &self,
        since: u64,
        mut each: impl FnMut(FlowRecord) -> bool,
    ) -> Result<(), AttributionError> {
        let files: Vec<(Arc<Database>, HashMap<u32, LeaseInfo>)> = self
            .lock()
            .range(day(since)..)
            .map(|(_, f)| (f.db.clone(), f.leases.clone()))
            .collect();
        for (db, leases) in &files {
            let txn = db.begin_read().map_err(|e| self.err(e))?;
            let table = match txn.open_table(FLOWS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => continue,
                Err(e) => return Err(self.err(e)),
            };
            for row in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                let Some(s) = Stored::decode(k.value(), v.value()) else {
                    continue;
                };
                let started = if s.first == 0 { s.last } else { Some(s.first) };
                if started.is_some_and(|t| t >= since) && !each(record(&s, leases)) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

fn record(s: &Stored, leases: &HashMap<u32, LeaseInfo>) -> FlowRecord {
    FlowRecord {
        egress_ip: s.mapping.ip,
        egress_port: s.mapping.port,
        proto: s.mapping.proto,
        destination: s.destination.0,
        destination_port: s.destination.1,
        first: (s.first != 0).then(|| rfc3339(s.first)),
        last: s.last.map(rfc3339),
        bytes_out: s.bytes.0,
        bytes_in: s.bytes.1,
        lease: leases.get(&s.lease).cloned(),
        node: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000_000;

    fn lease(container: &str) -> LeaseInfo {
        LeaseInfo {
            egress: "acme".into(),
            container_id: container.into(),
            host: "host-1".into(),
            owner: "@ci".into(),
            overlay: "100.96.0.2".parse().unwrap(),
        }
    }

    fn mapping(port: u16, proto: Proto) -> Mapping {
        Mapping {
            ip: "203.0.113.77".parse().unwrap(),
            port,
            proto,
        }
    }

    fn open(m: Mapping, first: u64, id: u32, who: &str) -> Change {
        Change::Open {
            mapping: m,
            first,
            id,
            destination: ("198.18.0.10".parse().unwrap(), 8080),
            lease: Some(lease(who)),
        }
    }

    fn close(m: Mapping, last: u64, id: u32) -> Change {
        Change::Close {
            mapping: m,
            last,
            id,
            destination: ("198.18.0.10".parse().unwrap(), 8080),
            bytes: (Some(100), Some(2000)),
            lease: None,
        }
    }

    fn who_at(s: &FlowStore, port: u16, at: u64) -> Vec<String> {
        s.who(
            "203.0.113.77".parse().unwrap(),
            port,
            &[Proto::Tcp, Proto::Udp],
            at,
        )
        .unwrap()
        .into_iter()
        .map(|f| f.lease.map(|l| l.container_id).unwrap_or_default())
        .collect()
    }

    #[test]
    fn a_port_is_named_for_the_lease_that_held_it_then_and_nobody_before() {
        let dir = tempfile::tempdir().unwrap();
        let t = 20_000 * DAY + 1_000_000;
        let s = FlowStore::open(dir.path(), 30, day(t)).unwrap();
        let (tcp, udp) = (mapping(40000, Proto::Tcp), mapping(40000, Proto::Udp));
        s.apply(&[open(tcp, t, 1, "a"), open(udp, t + 5, 2, "b")])
            .unwrap();
        s.apply(&[close(tcp, t + 10, 1), open(tcp, t + 20, 3, "c")])
            .unwrap();
        assert_eq!(who_at(&s, 40000, t - 1), Vec::<String>::new());
        assert_eq!(who_at(&s, 40000, t + 6), vec!["a", "b"]);
        assert_eq!(who_at(&s, 40000, t + 15), vec!["b"]);
        assert_eq!(who_at(&s, 40000, t + 25), vec!["c", "b"]);
        let udp_only = s.who(tcp.ip, 40000, &[Proto::Udp], t + 25).unwrap();
        assert_eq!(udp_only.len(), 1);
        assert_eq!(udp_only[0].proto, Proto::Udp);
        // Compacting the day leaves every flow readable and the file no bigger.
        let size = s.disk_bytes();
        assert_eq!(s.compact_before(day(t) + 1).unwrap(), 1);
        assert_eq!(s.compact_before(day(t) + 1).unwrap(), 0, "once");
        assert!(s.disk_bytes() <= size);
        assert_eq!(who_at(&s, 40000, t + 25), vec!["c", "b"]);
        let closed = s.who(tcp.ip, 40000, &[Proto::Tcp], t + 10).unwrap();
        assert_eq!(closed[0].bytes_in, Some(2000));
        assert!(closed[0].last.is_some());
        let mut exported = Vec::new();
        s.since(t + 1, |f| {
            exported.push(f.first.clone());
            true
        })
        .unwrap();
        assert_eq!(exported.len(), 2, "flows starting at or after t+1");
    }

    #[test]
    fn records_survive_reopening_and_old_days_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let t = 20_000 * DAY;
        let m = mapping(1234, Proto::Tcp);
        {
            let s = FlowStore::open(dir.path(), 2, day(t)).unwrap();
            s.apply(&[open(m, t, 1, "old")]).unwrap();
            s.apply(&[open(m, t + 3 * DAY, 2, "new")]).unwrap();
        }
        let s = FlowStore::open(dir.path(), 2, day(t + 3 * DAY)).unwrap();
        assert_eq!(who_at(&s, 1234, t + 3 * DAY + 1), vec!["new"]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A flow whose start was not seen is kept from its end, by the lease then.
        s.apply(&[Change::Close {
            mapping: mapping(999, Proto::Udp),
            last: t + 3 * DAY + 50,
            id: 9,
            destination: ("198.18.0.10".parse().unwrap(), 53),
            bytes: (None, None),
            lease: Some(lease("late")),
        }])
        .unwrap();
        let late = s.who(m.ip, 999, &[Proto::Udp], t + 3 * DAY + 10).unwrap();
        assert_eq!(late[0].first, None);
        assert_eq!(late[0].lease.as_ref().unwrap().container_id, "late");
    }

    #[test]
    fn each_end_closes_its_own_start_on_a_busy_port_and_across_a_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let t = 20_000 * DAY;
        let m = mapping(5000, Proto::Udp);
        {
            let s = FlowStore::open(dir.path(), 30, day(t)).unwrap();
            let starts: Vec<Change> = (0..2000)
                .map(|n| open(m, t + u64::from(n) * 10, n, &format!("c{n}")))
                .collect();
            s.apply(&starts).unwrap();
            // Ends out of order, one of them in the batch of a new start.
            s.apply(&[
                close(m, t + 30_000, 1500),
                open(m, t + 30_001, 7777, "late"),
            ])
            .unwrap();
            s.apply(&[close(m, t + 30_002, 3), close(m, t + 30_003, 7777)])
                .unwrap();
        }
        // Reopened: the starts written before are found by their mapping.
        let s = FlowStore::open(dir.path(), 30, day(t)).unwrap();
        s.apply(&[close(m, t + 40_000, 1999)]).unwrap();
        let held = |at: u64| who_at(&s, 5000, at);
        let after_ends = held(t + 40_001);
        assert_eq!(after_ends.len(), 1997, "2001 flows, 4 ended");
        for gone in ["c3", "c1500", "c1999", "late"] {
            assert!(!after_ends.iter().any(|c| c == gone), "{gone} ended");
        }
        assert!(held(t + 30_005).iter().any(|c| c == "c1999"));
        // Each end updated its start: no flow was recorded from its end alone.
        let mut flows = 0;
        s.since(t, |f| {
            assert!(f.first.is_some());
            flows += 1;
            true
        })
        .unwrap();
        assert_eq!(flows, 2001);
    }
}
