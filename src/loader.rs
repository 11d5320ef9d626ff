//! Loading what the guest boots: the kernel image (ELF vmlinux, with or without a
//! PVH entry note, or bzImage), the initrd and the command line.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use devices::memory::GuestMemoryMmap;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::arch::x86_64::regs::EntryProtocol;

/// The command line the VMM uses when the user gives none: console on COM1, and
/// guest reboots and panics end the VMM through the i8042 reset line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// Kernel parameters that keep a 6.1 kernel clear of the instructions the
/// PVM host's emulator cannot run (docs/TESTING-ON-PVM.md).
pub const PVM_PARAMS: &str = "noxsave nofsgsbase clearcpuid=cx16,popcnt,xsave,smap,bmi1,bmi2,abm,movbe,fsgsbase,rdrand,rdseed,rdpid,invpcid,aes,pclmulqdq,sha_ni,sse4_2,adx,clflushopt,clwb";

/// The command line for a guest whose user gave none: [`DEFAULT_CMDLINE`],
/// plus [`PVM_PARAMS`] on a PVM host (detected, see [`crate::pvm_host`]), so
/// that the default boots there too. A command line the user gives is used
/// as given.
pub fn default_cmdline() -> std::borrow::Cow<'static, str> {
    if crate::pvm_host() {
        format!("{DEFAULT_CMDLINE} {PVM_PARAMS}").into()
    } else {
        DEFAULT_CMDLINE.into()
    }
}
/// x86 `COMMAND_LINE_SIZE` including the NUL: the limit when the image does not say.
const DEFAULT_CMDLINE_LIMIT: usize = 2048;
/// Boot protocol 2.03+ kernels name their highest initrd address; older ones 0x37ffffff.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// xloadflags bit: the bzImage has a 64-bit entry point at offset 0x200.
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry point in the protected-mode part of a bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

/// Errors loading the guest's boot images.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be opened or read.
    #[error("Cannot read {what} '{path}': {err}. Check the path and its permissions.")]
    Open {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    /// The path is a directory.
    #[error("The {what} '{path}' is a directory; give the path of a file.")]
    Directory { what: &'static str, path: PathBuf },
    /// Not a regular file (a FIFO, a device, a socket).
    #[error("The {what} '{path}' is not a regular file; give the path of a file.")]
    NotAFile { what: &'static str, path: PathBuf },
    /// The file is empty.
    #[error("The {what} '{path}' is empty; give a non-empty file.")]
    Empty { what: &'static str, path: PathBuf },
    /// Neither ELF nor bzImage.
    #[error(
        "Kernel image '{0}' is neither an ELF vmlinux nor a bzImage; give a Linux kernel image."
    )]
    NotAKernel(PathBuf),
    /// The image's headers are inconsistent or the file ends early.
    #[error("Kernel image '{path}' is truncated or malformed ({reason}); rebuild it.")]
    Malformed { path: PathBuf, reason: String },
    /// The image does not fit in guest memory.
    #[error("Kernel image '{0}' does not fit in guest memory; give more memory (--memory, or mem_size_mib).")]
    KernelTooBig(PathBuf),
    /// A bzImage without a 64-bit entry point.
    #[error("Kernel image '{0}' is a bzImage without a 64-bit entry point; give a 64-bit kernel.")]
    No64BitEntry(PathBuf),
    /// The initrd does not fit.
    #[error("Initrd '{path}' ({size} bytes) does not fit in guest memory between the kernel's end at {low:#x} and {high:#x}; give more memory (--memory, or mem_size_mib) or a smaller initrd.")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        low: u64,
        high: u64,
    },
    /// The command line is too long.
    #[error("The kernel command line is {len} bytes, longer than the {max} bytes this kernel accepts; shorten --cmdline.")]
    CmdlineTooLong { len: usize, max: usize },
    /// The command line contains a NUL byte.
    #[error("The kernel command line contains a NUL byte; remove it from --cmdline.")]
    CmdlineNul,
    /// Guest memory write failed.
    #[error("Cannot write the {0} into guest memory.")]
    Write(&'static str),
}

/// A kernel placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// First instruction.
    pub entry: u64,
    /// How to enter it.
    pub protocol: EntryProtocol,
    /// bzImage setup header, to pass on in the zero page.
    pub setup_header: Option<setup_header>,
    /// First byte above what the kernel occupies, including the room it needs to
    /// decompress and initialise itself.
    pub end: u64,
    /// Longest command line it accepts, without the NUL.
    pub cmdline_max: usize,
    /// Highest address the initrd may end at.
    pub initrd_addr_max: u64,
}

fn open_file(what: &'static str, path: &Path) -> Result<(File, u64), Error> {
    let open_err = |err| Error::Open {
        what,
        path: path.to_path_buf(),
        err,
    };
    // Non-blocking open: a FIFO given as a kernel must not stall the VMM
    // thread waiting for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if meta.is_dir() {
        return Err(Error::Directory {
            what,
            path: path.to_path_buf(),
        });
    }
    if !meta.is_file() {
        return Err(Error::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    if meta.len() == 0 {
        return Err(Error::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok((file, meta.len()))
}

#[derive(Debug, PartialEq, Eq)]
enum Format {
    Elf,
    BzImage,
}

fn detect_format(file: &mut File, path: &Path) -> Result<Format, Error> {
    let mut head = [0u8; 0x206];
    let mut n = 0;
    // A short file is fine here: what is missing stays zero.
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(err) => {
                return Err(Error::Open {
                    what: "kernel image",
                    path: path.to_path_buf(),
                    err,
                })
            }
        }
    }
    if head.starts_with(b"\x7fELF") {
        Ok(Format::Elf)
    } else if &head[0x202..0x206] == b"HdrS" {
        Ok(Format::BzImage)
    } else {
        Err(Error::NotAKernel(path.to_path_buf()))
    }
}

fn loader_error(path: &Path, e: linux_loader::loader::Error) -> Error {
    use linux_loader::loader::{bzimage, elf, Error as L};
    let path = path.to_path_buf();
    match e {
        L::Elf(elf::Error::ReadKernelImage)
        | L::Bzimage(bzimage::Error::ReadBzImageCompressedKernel) => Error::KernelTooBig(path),
        L::MemoryOverflow => Error::KernelTooBig(path),
        other => Error::Malformed {
            path,
            reason: other
                .to_string()
                .trim_start_matches("Kernel Loader: ")
                .to_string(),
        },
    }
}

/// Loads the kernel at `path` into `mem`, whose RAM ends at `mem_end`.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_end: u64,
) -> Result<LoadedKernel, Error> {
    let (mut file, _) = open_file("kernel image", path)?;
    let format = detect_format(&mut file, path)?;
    file.seek(SeekFrom::Start(0)).map_err(|err| Error::Open {
        what: "kernel image",
        path: path.to_path_buf(),
        err,
    })?;
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        Format::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(|e| loader_error(path, e))?;
            if r.kernel_end > mem_end {
                return Err(Error::KernelTooBig(path.to_path_buf()));
            }
            let (protocol, entry) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (EntryProtocol::Pvh, addr.0),
                _ => (EntryProtocol::Linux64, r.kernel_load.0),
            };
            Ok(LoadedKernel {
                entry,
                protocol,
                setup_header: None,
                end: r.kernel_end,
                cmdline_max: DEFAULT_CMDLINE_LIMIT - 1,
                initrd_addr_max: u64::MAX,
            })
        }
        Format::BzImage => {
            let r =
                BzImage::load(mem, None, &mut file, himem).map_err(|e| loader_error(path, e))?;
            let hdr = r.setup_header.ok_or_else(|| Error::Malformed {
                path: path.to_path_buf(),
                reason: "no setup header".into(),
            })?;
            if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::No64BitEntry(path.to_path_buf()));
            }
            let load = r.kernel_load.0;
            // The kernel decompresses and sets itself up within init_size bytes from
            // the higher of its load and preferred addresses.
            let base = load.max(hdr.pref_address);
            let end = base
                .checked_add(u64::from(hdr.init_size))
                .filter(|&e| e <= mem_end)
                .ok_or_else(|| Error::KernelTooBig(path.to_path_buf()))?;
            let cmdline_max = if hdr.version >= 0x0206 {
                (hdr.cmdline_size as usize).min(CMDLINE_MAX_SIZE - 1)
            } else {
                255
            };
            Ok(LoadedKernel {
                entry: load + BZIMAGE_64BIT_ENTRY_OFFSET,
                protocol: EntryProtocol::Linux64,
                setup_header: Some(hdr),
                end: end.max(r.kernel_end),
                cmdline_max,
                initrd_addr_max: if hdr.version >= 0x0203 {
                    u64::from(hdr.initrd_addr_max)
                } else {
                    DEFAULT_INITRD_ADDR_MAX
                },
            })
        }
    }
}

/// Loads the initrd as high as allowed in low RAM (below `low_ram_end`) and
/// above the kernel. Returns its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    low_ram_end: u64,
) -> Result<(u64, u64), Error> {
    let (mut file, size) = open_file("initrd", path)?;
    let high = low_ram_end.min(kernel.initrd_addr_max.saturating_add(1));
    let low = kernel.end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let too_big = || Error::InitrdTooBig {
        path: path.to_path_buf(),
        size,
        low,
        high,
    };
    let addr = high.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    if addr < low {
        return Err(too_big());
    }
    let mut read = 0u64;
    while read < size {
        let n = mem
            .read_volatile_from(GuestAddress(addr + read), &mut file, (size - read) as usize)
            .map_err(|_| Error::Write("initrd"))?;
        if n == 0 {
            return Err(Error::Open {
                what: "initrd",
                path: path.to_path_buf(),
                err: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        read += n as u64;
    }
    Ok((addr, size))
}

/// The command line the guest gets: the user's (or the default), with the
/// entries the VMM must add after the kernel's part, before a ` -- ` that
/// starts the arguments the kernel hands to init (as Firecracker places them).
pub fn build_cmdline(user: Option<&str>, vmm_entries: &[String]) -> String {
    let default = default_cmdline();
    let user = user.unwrap_or(&default).trim();
    let (kernel, init) = if let Some(rest) = user.strip_prefix("--") {
        if rest.is_empty() || rest.starts_with(' ') {
            ("", Some(rest.trim()))
        } else {
            (user, None)
        }
    } else {
        match user.split_once(" -- ") {
            Some((k, i)) => (k.trim(), Some(i.trim())),
            None => match user.strip_suffix(" --") {
                Some(k) => (k.trim(), Some("")),
                None => (user, None),
            },
        }
    };
    let mut line = kernel.to_string();
    for e in vmm_entries {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(e);
    }
    if let Some(init) = init {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str("--");
        if !init.is_empty() {
            line.push(' ');
            line.push_str(init);
        }
    }
    line
}

/// Writes the command line at its fixed address; returns its address and length.
pub fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    max: usize,
) -> Result<(u64, usize), Error> {
    if cmdline.as_bytes().contains(&0) {
        return Err(Error::CmdlineNul);
    }
    let max = max.min(CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|_| Error::Write("command line"))?;
    Ok((CMDLINE_START, cmdline.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const MIB: u64 = 1 << 20;

    fn mem() -> GuestMemoryMmap {
        devices::memory::anonymous(&[(GuestAddress(0), (64 * MIB) as usize)], false).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-loader-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    /// A minimal ELF64 x86_64 executable with one PT_LOAD segment at `paddr`.
    fn elf(paddr: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 0x78];
        v[..4].copy_from_slice(b"\x7fELF");
        v[4] = 2; // 64-bit
        v[5] = 1; // little endian
        v[6] = 1; // version
        v[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        v[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
        v[20..24].copy_from_slice(&1u32.to_le_bytes());
        v[24..32].copy_from_slice(&paddr.to_le_bytes()); // entry
        v[32..40].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
        v[52..54].copy_from_slice(&0x40u16.to_le_bytes()); // ehsize
        v[54..56].copy_from_slice(&0x38u16.to_le_bytes()); // phentsize
        v[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = &mut v[0x40..0x78];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[8..16].copy_from_slice(&0x78u64.to_le_bytes()); // offset
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn elf_kernel_is_loaded_at_its_physical_address() {
        let m = mem();
        let p = temp_file("ok.elf", &elf(0x200000, b"\xf4\xeb\xfd"));
        let k = load_kernel(&m, &p, 64 * MIB).unwrap();
        assert_eq!(
            (k.entry, k.protocol, k.end),
            (0x200000, EntryProtocol::Linux64, 0x200003)
        );
        let mut b = [0u8; 3];
        m.read_slice(&mut b, GuestAddress(0x200000)).unwrap();
        assert_eq!(&b, b"\xf4\xeb\xfd");
    }

    #[test]
    fn missing_directory_empty_and_garbage_kernels_are_rejected() {
        let m = mem();
        let missing = Path::new("/nonexistent/vmlinux");
        assert!(matches!(
            load_kernel(&m, missing, 64 * MIB),
            Err(Error::Open { .. })
        ));
        assert!(matches!(
            load_kernel(&m, &std::env::temp_dir(), 64 * MIB),
            Err(Error::Directory { .. })
        ));
        let empty = temp_file("empty", b"");
        assert!(matches!(
            load_kernel(&m, &empty, 64 * MIB),
            Err(Error::Empty { .. })
        ));
        let text = temp_file("text", b"#!/bin/sh\necho not a kernel\n");
        assert!(matches!(
            load_kernel(&m, &text, 64 * MIB),
            Err(Error::NotAKernel(_))
        ));
    }

    #[test]
    fn truncated_elf_is_malformed() {
        let m = mem();
        let full = elf(0x200000, &[0x90; 64]);
        let p = temp_file("trunc.elf", &full[..0x50]);
        let e = load_kernel(&m, &p, 64 * MIB).unwrap_err();
        assert!(matches!(e, Error::Malformed { .. }), "{e}");
    }

    #[test]
    fn elf_beyond_memory_does_not_fit() {
        let m = mem();
        let p = temp_file("high.elf", &elf(80 * MIB, &[0x90; 16]));
        let e = load_kernel(&m, &p, 64 * MIB).unwrap_err();
        assert!(matches!(e, Error::KernelTooBig(_)), "{e}");
    }

    #[test]
    fn bzimage_header_without_payload_is_rejected() {
        let m = mem();
        let mut img = vec![0u8; 0x400];
        img[0x1f1] = 1; // setup_sects
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 1; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes());
        let p = temp_file("no64.bz", &img);
        // No 64-bit entry point flagged in xloadflags.
        let e = load_kernel(&m, &p, 64 * MIB).unwrap_err();
        assert!(
            matches!(e, Error::No64BitEntry(_) | Error::Malformed { .. }),
            "{e}"
        );
    }

    fn kernel_ending_at(end: u64) -> LoadedKernel {
        LoadedKernel {
            entry: 0x100000,
            protocol: EntryProtocol::Linux64,
            setup_header: None,
            end,
            cmdline_max: 2047,
            initrd_addr_max: u64::MAX,
        }
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let m = mem();
        let p = temp_file("initrd", &[7u8; 5000]);
        let (addr, size) = load_initrd(&m, &p, &kernel_ending_at(2 * MIB), 64 * MIB).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 * MIB && addr >= 64 * MIB - 3 * 4096);
        let mut b = [0u8; 5000];
        m.read_slice(&mut b, GuestAddress(addr)).unwrap();
        assert!(b.iter().all(|&x| x == 7));
    }

    #[test]
    fn initrd_overlapping_the_kernel_is_rejected() {
        let m = mem();
        let p = temp_file("big-initrd", &vec![1u8; (2 * MIB) as usize]);
        let e = load_initrd(&m, &p, &kernel_ending_at(63 * MIB), 64 * MIB).unwrap_err();
        assert!(matches!(e, Error::InitrdTooBig { .. }), "{e}");
        assert!(e.to_string().contains("give more memory (--memory"));
    }

    #[test]
    fn cmdline_appends_vmm_entries_to_the_users() {
        assert_eq!(build_cmdline(None, &[]), default_cmdline());
        assert_eq!(
            default_cmdline().contains(PVM_PARAMS),
            crate::pvm_host(),
            "the PVM parameters are in the default exactly on a PVM host"
        );
        assert_eq!(
            build_cmdline(Some(" quiet "), &["root=/dev/vda".into()]),
            "quiet root=/dev/vda"
        );
        assert_eq!(build_cmdline(Some(""), &["a=b".into()]), "a=b");
    }

    #[test]
    fn vmm_entries_go_before_the_init_arguments() {
        let e = ["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        assert_eq!(
            build_cmdline(Some("console=ttyS0 init=/bin/sh -- -c ls"), &e),
            "console=ttyS0 init=/bin/sh virtio_mmio.device=4K@0xd0000000:5 -- -c ls"
        );
        assert_eq!(
            build_cmdline(Some("-- single"), &e),
            "virtio_mmio.device=4K@0xd0000000:5 -- single"
        );
        assert_eq!(
            build_cmdline(Some("quiet --"), &e),
            format!("quiet {} --", e[0])
        );
        assert_eq!(
            build_cmdline(Some("a=--b"), &e),
            format!("a=--b {}", e[0]),
            "only a word of its own splits"
        );
    }

    #[test]
    fn cmdline_longer_than_the_kernel_accepts_is_rejected() {
        let m = mem();
        let long = "x".repeat(2048);
        assert!(matches!(
            write_cmdline(&m, &long, 2047),
            Err(Error::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        assert!(matches!(
            write_cmdline(&m, "a\0b", 2047),
            Err(Error::CmdlineNul)
        ));
        let (addr, len) = write_cmdline(&m, "console=ttyS0", 2047).unwrap();
        let mut b = [0xffu8; 14];
        m.read_slice(&mut b, GuestAddress(addr)).unwrap();
        assert_eq!((&b[..13], b[13], len), (&b"console=ttyS0"[..], 0, 13));
    }
}
