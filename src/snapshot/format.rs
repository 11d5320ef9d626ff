//! The snapshot file container: a fixed header (magic, format version, payload
//! length), the payload (the VM state, serialized with serde as JSON), and a
//! CRC-32 over header and payload. Reading checks each of them before the
//! payload is decoded, so a truncated, corrupt or foreign file is refused with
//! an error that says which, and nothing is started from it.
//!
//! Layout (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `VMMSNAP\0` |
//! | 8 | 2 | format major version |
//! | 10 | 2 | format minor version |
//! | 12 | 4 | reserved, 0 |
//! | 16 | 8 | payload length N |
//! | 24 | N | payload (JSON) |
//! | 24+N | 4 | CRC-32 (IEEE) of bytes 0..24+N |
//!
//! A reader accepts its own major version and any minor version up to its own
//! (minor versions only add fields that have defaults).

use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The magic bytes a snapshot file starts with.
pub const MAGIC: [u8; 8] = *b"VMMSNAP\0";
/// The format major version this VMM writes and reads.
pub const VERSION_MAJOR: u16 = 1;
/// The format minor version this VMM writes (and the newest it reads).
pub const VERSION_MINOR: u16 = 3;
/// Size of the fixed header.
pub const HEADER_SIZE: usize = 24;
/// Largest payload accepted (the VM state, not guest memory: that is a
/// separate file).
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Errors reading or writing a snapshot file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read or written.
    #[error("Cannot {what} the snapshot file '{path}': {err}.")]
    Io {
        what: &'static str,
        path: String,
        err: std::io::Error,
    },
    /// Too short for what its header announces.
    #[error("IO Error: File too short to contain CRC: the snapshot file '{0}' is truncated; take the snapshot again.")]
    Truncated(String),
    /// Not a snapshot of this VMM.
    #[error("'{0}' is not a vmm snapshot file (bad magic); give a file written by PUT /snapshot/create.")]
    BadMagic(String),
    /// A format version this VMM cannot read.
    #[error("The snapshot file '{path}' has format version {major}.{minor}; this vmm reads {VERSION_MAJOR}.0 to {VERSION_MAJOR}.{VERSION_MINOR}; restore it with the vmm that took it.")]
    Version {
        path: String,
        major: u16,
        minor: u16,
    },
    /// The payload is larger than any state this VMM writes.
    #[error("The snapshot file '{path}' announces a {len}-byte state, more than the {MAX_PAYLOAD} this vmm accepts; the file is corrupt.")]
    TooLarge { path: String, len: u64 },
    /// The checksum does not match.
    #[error("The snapshot file '{0}' is corrupt (checksum mismatch); take the snapshot again.")]
    Checksum(String),
    /// The payload does not decode as the expected state.
    #[error("The snapshot file '{path}' holds a state this vmm cannot decode: {err}.")]
    Decode { path: String, err: String },
    /// The state cannot be encoded.
    #[error("Cannot encode the VM state: {0}.")]
    Encode(String),
}

/// What a snapshot file's container says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format major version.
    pub major: u16,
    /// Format minor version.
    pub minor: u16,
    /// Payload length in bytes.
    pub payload_len: u64,
}

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it).
pub fn crc32(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    static TABLE: [u32; 256] = table();
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Encodes `state` into a complete snapshot file image.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, Error> {
    let payload = serde_json::to_vec(state).map_err(|e| Error::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_SIZE + payload.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
    out.extend_from_slice(&VERSION_MINOR.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Checks a file image's container (magic, version, length, checksum) and
/// returns its header and payload. `path` names the file in errors.
pub fn check<'a>(path: &str, bytes: &'a [u8]) -> Result<(Header, &'a [u8]), Error> {
    let truncated = || Error::Truncated(path.to_string());
    let header = bytes.get(..HEADER_SIZE).ok_or_else(|| {
        if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
            Error::BadMagic(path.to_string())
        } else {
            truncated()
        }
    })?;
    if header[..8] != MAGIC {
        return Err(Error::BadMagic(path.to_string()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([header[o], header[o + 1]]);
    let (major, minor) = (u16_at(8), u16_at(10));
    if major != VERSION_MAJOR || minor > VERSION_MINOR {
        return Err(Error::Version {
            path: path.to_string(),
            major,
            minor,
        });
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&header[16..24]);
    let payload_len = u64::from_le_bytes(len_bytes);
    if payload_len > MAX_PAYLOAD {
        return Err(Error::TooLarge {
            path: path.to_string(),
            len: payload_len,
        });
    }
    // Bounded by MAX_PAYLOAD: fits a usize.
    let end = HEADER_SIZE + payload_len as usize;
    let crc_bytes = bytes.get(end..end + 4).ok_or_else(truncated)?;
    if bytes.len() != end + 4 {
        return Err(Error::Checksum(path.to_string()));
    }
    let stored = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
    if crc32(&bytes[..end]) != stored {
        return Err(Error::Checksum(path.to_string()));
    }
    Ok((
        Header {
            major,
            minor,
            payload_len,
        },
        &bytes[HEADER_SIZE..end],
    ))
}

/// Decodes a checked file image into `T`.
pub fn decode<T: DeserializeOwned>(path: &str, bytes: &[u8]) -> Result<(Header, T), Error> {
    let (header, payload) = check(path, bytes)?;
    let state = serde_json::from_slice(payload).map_err(|e| Error::Decode {
        path: path.to_string(),
        err: e.to_string(),
    })?;
    Ok((header, state))
}

/// A snapshot file being written: a temporary file (owner-only: a snapshot
/// holds the guest's memory and secrets) in the target's directory, renamed
/// over the target only once complete. A VM whose memory is mapped from the
/// old file keeps the old file (a rename never truncates it), and a failed
/// write leaves the old file as it was.
pub struct PendingFile {
    tmp: std::path::PathBuf,
    target: std::path::PathBuf,
    file: std::fs::File,
}

impl PendingFile {
    /// Creates the temporary file next to `target`.
    pub fn create(target: &Path) -> std::io::Result<PendingFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut name = target
            .file_name()
            .ok_or_else(|| std::io::Error::other("the path names no file"))?
            .to_os_string();
        name.push(format!(".vmm-{}.tmp", std::process::id()));
        let tmp = target.with_file_name(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        Ok(PendingFile {
            tmp,
            target: target.to_path_buf(),
            file,
        })
    }

    /// The file to write.
    pub fn file(&mut self) -> &mut std::fs::File {
        &mut self.file
    }

    /// Flushes the data to disk and renames the file over its target.
    pub fn commit(self) -> std::io::Result<()> {
        self.file.sync_data()?;
        std::fs::rename(&self.tmp, &self.target)
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        // Not committed (or committed: then the temporary name is gone).
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Writes `state` to `path` (owner-only, replacing it whole, see [`PendingFile`]).
pub fn write<T: Serialize>(path: &Path, state: &T) -> Result<(), Error> {
    let io = |err| Error::Io {
        what: "write",
        path: path.display().to_string(),
        err,
    };
    prepare(path, state)?.commit().map_err(io)
}

/// Writes `state` under a temporary name next to `path`: committing the
/// returned file puts it in place.
pub fn prepare<T: Serialize>(path: &Path, state: &T) -> Result<PendingFile, Error> {
    let io = |err| Error::Io {
        what: "write",
        path: path.display().to_string(),
        err,
    };
    let image = encode(state)?;
    let mut f = PendingFile::create(path).map_err(io)?;
    f.file().write_all(&image).map_err(io)?;
    Ok(f)
}

/// Opens an existing regular file for reading without blocking (a FIFO or a
/// device given as a snapshot must not stall the VMM thread).
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("it is not a regular file"));
    }
    Ok(file)
}

/// Reads and decodes the snapshot file at `path`.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<(Header, T), Error> {
    use std::io::Read;
    let shown = path.display().to_string();
    let io = |err| Error::Io {
        what: "read",
        path: shown.clone(),
        err,
    };
    let file = open_regular(path).map_err(io)?;
    // Never more than the largest snapshot: a longer file is refused, not read.
    let limit = MAX_PAYLOAD + HEADER_SIZE as u64 + 4;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(Error::TooLarge {
            path: shown,
            len: bytes.len() as u64,
        });
    }
    decode(&shown, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct State {
        regs: Vec<u64>,
        name: String,
    }

    fn state() -> State {
        State {
            regs: vec![1, 2, u64::MAX],
            name: "vcpu0".into(),
        }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn a_state_round_trips_and_encodes_identically() {
        let image = encode(&state()).unwrap();
        let (h, s): (Header, State) = decode("x", &image).unwrap();
        assert_eq!((h.major, h.minor), (VERSION_MAJOR, VERSION_MINOR));
        assert_eq!(s, state());
        assert_eq!(
            encode(&s).unwrap(),
            image,
            "save -> restore -> save is stable"
        );
    }

    #[test]
    fn every_truncation_is_refused() {
        let image = encode(&state()).unwrap();
        for len in 0..image.len() {
            let e = decode::<State>("snap", &image[..len]).unwrap_err();
            assert!(
                matches!(e, Error::Truncated(_) | Error::Checksum(_)),
                "{len}: {e}"
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let image = encode(&state()).unwrap();
        for i in 0..image.len() {
            for bit in 0..8 {
                let mut bad = image.clone();
                bad[i] ^= 1 << bit;
                assert!(decode::<State>("snap", &bad).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn wrong_magic_version_size_and_trailing_bytes_name_the_problem() {
        let image = encode(&state()).unwrap();
        let mut v = image.clone();
        v[8] = 2;
        v[10] = 0;
        let e = decode::<State>("vm.snap", &v).unwrap_err().to_string();
        assert!(
            e.contains("format version 2.0") && e.contains("vm.snap"),
            "{e}"
        );
        let mut v = image.clone();
        v[10] = (VERSION_MINOR + 1) as u8;
        assert!(matches!(
            decode::<State>("s", &v),
            Err(Error::Version { .. })
        ));
        let e = decode::<State>("k", b"\x7fELF not a snapshot at all, longer than a header")
            .unwrap_err();
        assert!(matches!(e, Error::BadMagic(_)), "{e}");
        let mut v = image.clone();
        v[16..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            decode::<State>("s", &v),
            Err(Error::TooLarge { .. })
        ));
        let mut v = image.clone();
        v.push(0);
        assert!(matches!(decode::<State>("s", &v), Err(Error::Checksum(_))));
    }

    #[test]
    fn a_valid_container_with_the_wrong_state_is_a_decode_error() {
        let image = encode(&vec![1u8, 2, 3]).unwrap();
        let e = decode::<State>("s", &image).unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "{e}");
    }

    #[test]
    fn files_are_written_and_read_back() {
        let path = std::env::temp_dir().join(format!("vmm-snap-{}", std::process::id()));
        write(&path, &state()).unwrap();
        let (_, s): (Header, State) = read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(s, state());
        let e = read::<State>(Path::new("/nonexistent/vm.snap")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vm.snap"), "{e}");
    }
}
