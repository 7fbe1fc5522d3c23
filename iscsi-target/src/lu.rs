//! Logical unit state shared by every session of a target: unit attentions per initiator port,
//! RESERVE(6) and persistent reservations (SPC-4 §5.12), the caching mode page.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::backend::LuBackend;
use crate::sense::Sense;

/// Logical block size reported to initiators.
pub const BLOCK_BYTES: u32 = 512;
/// Most unit attentions queued per initiator port (older ones are dropped first).
const MAX_PENDING_UA: usize = 16;
/// Most persistent-reservation registrations per logical unit.
pub const MAX_REGISTRATIONS: usize = 256;

/// Persistent reservation types (SPC-4 Table 193): 1 Write Exclusive, 3 Exclusive Access,
/// 5/6 the same for registrants only, 7/8 the same for all registrants.
pub mod pr_type {
    pub fn valid(t: u8) -> bool {
        matches!(t, 1 | 3 | 5 | 6 | 7 | 8)
    }
    /// Registrants-only and all-registrants types: every registrant may access.
    pub fn registrants_access(t: u8) -> bool {
        matches!(t, 5..=8)
    }
    pub fn all_registrants(t: u8) -> bool {
        matches!(t, 7 | 8)
    }
    pub fn exclusive_access(t: u8) -> bool {
        matches!(t, 3 | 6 | 8)
    }
}

/// A persistent reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Initiator port of the holder (for all-registrants types: whoever reserved).
    pub holder: String,
    pub kind: u8,
}

/// Mutable state of a logical unit, behind one lock.
#[derive(Debug, Default)]
pub struct LuState {
    /// Write cache enabled (caching mode page WCE). When off, every write is FUA.
    pub wce: bool,
    /// Initiator port holding a RESERVE(6) reservation.
    pub reserve6: Option<String>,
    pub pr_generation: u32,
    /// Registered initiator ports and their keys, in registration order.
    pub registrations: Vec<(String, u64)>,
    pub reservation: Option<Reservation>,
    /// Pending unit attentions per initiator port.
    pub ua: HashMap<String, VecDeque<Sense>>,
    /// Initiator ports that sent PREVENT ALLOW MEDIUM REMOVAL with PREVENT set.
    pub prevent: HashSet<String>,
    /// Initiator ports with a live session (unit attentions are only queued for them).
    pub nexuses: HashMap<String, usize>,
    /// Block count last seen, to report CAPACITY DATA HAS CHANGED after a resize.
    pub known_blocks: u64,
    /// Results of EXTENDED COPY commands held for RECEIVE COPY RESULTS, by initiator port and
    /// list identifier: segments processed and bytes copied. Dropped once reported, and with
    /// the I_T nexus.
    pub copies: HashMap<(String, u8), (u16, u64)>,
}

impl LuState {
    pub fn key_of(&self, port: &str) -> Option<u64> {
        self.registrations
            .iter()
            .find(|(p, _)| p == port)
            .map(|(_, k)| *k)
    }

    /// Queue `sense` for every live initiator port except `except`.
    pub fn ua_all(&mut self, sense: Sense, except: Option<&str>) {
        let ports: Vec<String> = self.nexuses.keys().cloned().collect();
        for p in ports {
            if Some(p.as_str()) != except {
                self.ua_to(&p, sense);
            }
        }
    }

    pub fn ua_to(&mut self, port: &str, sense: Sense) {
        let q = self.ua.entry(port.to_string()).or_default();
        if q.contains(&sense) {
            return;
        }
        if q.len() >= MAX_PENDING_UA {
            q.pop_front();
        }
        q.push_back(sense);
    }

    /// Whether `port` holds the persistent reservation.
    pub fn is_holder(&self, port: &str) -> bool {
        match &self.reservation {
            Some(r) if pr_type::all_registrants(r.kind) => self.key_of(port).is_some(),
            Some(r) => r.holder == port,
            None => false,
        }
    }
}

/// One logical unit: a volume and its SCSI state.
pub struct Lu {
    pub backend: Arc<dyn LuBackend>,
    /// Unit serial number (VPD 0x80).
    pub serial: String,
    /// NAA IEEE Registered Extended designator (VPD 0x83).
    pub naa: [u8; 16],
    pub state: Mutex<LuState>,
    /// Serialises COMPARE AND WRITE (its read-compare-write must be atomic).
    pub caw_lock: Mutex<()>,
}

impl Lu {
    pub fn new(backend: Arc<dyn LuBackend>) -> Lu {
        let known_blocks = backend.size_bytes() / u64::from(BLOCK_BYTES);
        let h = fnv1a(backend.name().as_bytes());
        let serial = format!("{h:016x}");
        let mut naa = [0u8; 16];
        // NAA 6, a locally chosen OUI-shaped value, then the name hash as vendor identifier.
        naa[0] = 0x60 | 0x0a;
        naa[1] = 0x0b;
        naa[2] = 0x0c;
        naa[3] = 0x00;
        naa[4..12].copy_from_slice(&h.to_be_bytes());
        naa[12..16].copy_from_slice(&((h >> 32) as u32 ^ h as u32).to_be_bytes());
        Lu {
            backend,
            serial,
            naa,
            state: Mutex::new(LuState {
                wce: true,
                known_blocks,
                ..LuState::default()
            }),
            caw_lock: Mutex::new(()),
        }
    }

    /// Whether a write goes to the engine with FUA: when the command asks for it, and for
    /// every write while the caching mode page's WCE bit is off. Every command that writes
    /// (WRITE, COMPARE AND WRITE, OR WRITE, WRITE SAME, UNMAP, EXTENDED COPY) decides here.
    pub fn fua(&self, requested: bool) -> bool {
        requested || !self.state.lock().wce
    }

    /// Number of logical blocks.
    pub fn blocks(&self) -> u64 {
        self.backend.size_bytes() / u64::from(BLOCK_BYTES)
    }

    /// A session of `port` started.
    pub fn attach(&self, port: &str) {
        *self
            .state
            .lock()
            .nexuses
            .entry(port.to_string())
            .or_default() += 1;
    }

    /// A session of `port` ended (I_T nexus loss): RESERVE(6) is released.
    pub fn detach(&self, port: &str) {
        let mut st = self.state.lock();
        if let Some(n) = st.nexuses.get_mut(port) {
            *n -= 1;
            if *n == 0 {
                st.nexuses.remove(port);
                st.ua.remove(port);
                st.prevent.remove(port);
                st.copies.retain(|(p, _), _| p != port);
                if st.reserve6.as_deref() == Some(port) {
                    st.reserve6 = None;
                }
            }
        }
    }

    /// LOGICAL UNIT RESET / TARGET WARM RESET: RESERVE(6) and PREVENT are cleared and every
    /// initiator port gets a unit attention (persistent reservations survive).
    pub fn reset(&self) {
        let mut st = self.state.lock();
        st.reserve6 = None;
        st.prevent.clear();
        st.ua_all(crate::sense::RESET_OCCURRED, None);
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
