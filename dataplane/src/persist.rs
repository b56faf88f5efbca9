//! Fail static: the last table the sidecar applied, kept on disk so a
//! sidecar that restarts while its control plane is away serves at once
//! from it instead of answering 503 until the control plane returns.
//!
//! The file is written whole and atomically (temporary file, fsync, rename,
//! fsync of the directory), so a crash leaves the old table or the new one,
//! never half of either. It carries a magic line, the table's version, a
//! length and a CRC-32 of the protobuf bytes: a file damaged some other way
//! (a full disk, a bad block, an edit by hand) is refused with the reason,
//! and the sidecar starts without it; it is never fatal.
//!
//! The file's modification time says when the control plane was last known
//! to stand behind the table's weights: the sidecar touches it while its
//! Watch stream is up, and a restarted sidecar ages the weights from it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use prost::Message;
use switchyard_proto::v1 as pb;

const MAGIC: &[u8] = b"switchyard-table 1\n";
/// Version (8) + length (8) + CRC-32 (4), little-endian.
const HEADER: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a saved routing table (bad magic)")]
    Magic,
    #[error("truncated: {0} bytes missing")]
    Truncated(u64),
    #[error("{0} bytes after the table")]
    Trailing(u64),
    #[error("checksum mismatch: the file is damaged")]
    Checksum,
    #[error("the table does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("header says version {header}, table says {table}")]
    Version { header: u64, table: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The file's bytes for `table`. Pure.
pub fn encode(table: &pb::RoutingTable) -> Vec<u8> {
    let body = table.encode_to_vec();
    let mut out = Vec::with_capacity(MAGIC.len() + HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&table.version.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b.get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(a)
}

/// The table in a file's bytes, or why there is none. Pure.
pub fn decode(bytes: &[u8]) -> Result<pb::RoutingTable, PersistError> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(PersistError::Magic)?;
    let (header, body) = rest.split_at_checked(HEADER).ok_or_else(|| {
        PersistError::Truncated((MAGIC.len() + HEADER).saturating_sub(bytes.len()) as u64)
    })?;
    let version = le_u64(header.get(..8).unwrap_or_default());
    let len = le_u64(header.get(8..16).unwrap_or_default());
    let crc = header
        .get(16..20)
        .and_then(|c| <[u8; 4]>::try_from(c).ok())
        .map_or(0, u32::from_le_bytes);
    let have = body.len() as u64;
    if have < len {
        return Err(PersistError::Truncated(len - have));
    }
    if have > len {
        return Err(PersistError::Trailing(have - len));
    }
    if crc32fast::hash(body) != crc {
        return Err(PersistError::Checksum);
    }
    let table = pb::RoutingTable::decode(body)?;
    if table.version != version {
        return Err(PersistError::Version {
            header: version,
            table: table.version,
        });
    }
    Ok(table)
}

/// Where a sidecar keeps its table: one file per listen address, so
/// sidecars sharing a state directory on one machine keep theirs apart.
pub fn file_for(dir: &Path, listen: &str) -> PathBuf {
    sidecar_file(dir, listen, "table")
}

/// A sidecar's own file of kind `suffix` in its state directory, named
/// after its listen address (the one thing that tells sidecars on a host
/// apart and survives their restarts).
pub fn sidecar_file(dir: &Path, listen: &str, suffix: &str) -> PathBuf {
    let safe: String = listen
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    dir.join(format!("sidecar-{safe}.{suffix}"))
}

/// Writes `table` to `path` atomically.
pub fn save(path: &Path, table: &pb::RoutingTable) -> Result<(), PersistError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Per process: during a socket handoff two sidecars on one address
    // save at once, and must not write into each other's temporary file.
    let tmp = path.with_extension(format!("table.tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&encode(table)).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    // The rename is durable only once the directory is.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// The saved table and when the control plane last stood behind it;
/// `Ok(None)` when there is no file.
pub fn load(path: &Path) -> Result<Option<(pb::RoutingTable, SystemTime)>, PersistError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let table = decode(&bytes)?;
    let confirmed = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map_err(io(path))?;
    Ok(Some((table, confirmed)))
}

/// Records that the control plane still stands behind the saved table.
pub fn touch(path: &Path) -> Result<(), PersistError> {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()))
        .map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table(version: u64) -> pb::RoutingTable {
        pb::RoutingTable {
            version,
            endpoints: vec![pb::Endpoint {
                name: "a".into(),
                url: "http://127.0.0.1:1".into(),
                models: vec!["m".into()],
                ..Default::default()
            }],
            default_class: "standard".into(),
            weights_ttl_ms: 5000,
            ..Default::default()
        }
    }

    #[test]
    fn a_table_round_trips() {
        let t = table(42);
        assert_eq!(decode(&encode(&t)).unwrap(), t);
    }

    #[test]
    fn damage_is_refused_with_its_reason() {
        let good = encode(&table(7));
        assert!(matches!(decode(b"hello"), Err(PersistError::Magic)));
        assert!(matches!(
            decode(&good[..good.len() - 3]),
            Err(PersistError::Truncated(3))
        ));
        assert!(matches!(
            decode(&good[..MAGIC.len() + 4]),
            Err(PersistError::Truncated(_))
        ));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(decode(&long), Err(PersistError::Trailing(1))));
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(matches!(decode(&flipped), Err(PersistError::Checksum)));
        let mut other_version = good;
        other_version[MAGIC.len()] ^= 1;
        assert!(matches!(
            decode(&other_version),
            Err(PersistError::Version { .. })
        ));
    }

    #[test]
    fn save_replaces_the_file_whole_and_load_reads_it_back() {
        let dir = std::env::temp_dir().join(format!("sy-persist-{}", std::process::id()));
        let path = file_for(&dir, "127.0.0.1:8080");
        assert!(path.ends_with("sidecar-127_0_0_1_8080.table"));
        assert!(load(&path).unwrap().is_none());
        save(&path, &table(1)).unwrap();
        save(&path, &table(2)).unwrap();
        let (t, _) = load(&path).unwrap().unwrap();
        assert_eq!(t.version, 2);
        assert!(!path
            .with_extension(format!("table.tmp.{}", std::process::id()))
            .exists());
        touch(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        /// Whatever a damaged file holds, reading it is an error or a
        /// table, never a panic.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = decode(&bytes);
            let _ = decode(&with_magic);
        }

        /// Any single flipped bit in a saved table is caught.
        #[test]
        fn one_flipped_bit_never_passes(version in 1u64..u64::MAX, bit in 0usize..4096) {
            let mut b = encode(&table(version));
            let i = (bit / 8) % b.len();
            b[i] ^= 1 << (bit % 8);
            prop_assert!(decode(&b).is_err());
        }
    }
}
