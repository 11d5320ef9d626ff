//! The jailer's flags (Firecracker's names and semantics) and their
//! validation, which happens before anything on the host changes.

use std::path::{Path, PathBuf};

use clap::Parser;

use crate::Error;

/// Starts an executable (the vmm binary) in a jail: its own chroot, mount
/// namespace (and optionally PID and network namespaces), cgroups and
/// resource limits, as an unprivileged user with no capabilities.
#[derive(Parser, Debug)]
#[command(name = "vmm-jailer", version, about)]
pub struct Cli {
    /// The microVM's id: 1 to 64 letters, digits and '-'; names the jail
    /// and the cgroups, and is passed on as --id.
    #[arg(long)]
    pub id: String,
    /// The binary to jail (copied into the jail; must be statically linked).
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,
    /// The user id the binary runs as.
    #[arg(long, value_name = "UID", allow_hyphen_values = true)]
    pub uid: String,
    /// The group id the binary runs as.
    #[arg(long, value_name = "GID", allow_hyphen_values = true)]
    pub gid: String,
    /// Where jails are built: <DIR>/<exec file name>/<id>/root.
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// A network namespace to join (e.g. /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Detaches: a new session, standard input and output on /dev/null.
    #[arg(long)]
    pub daemonize: bool,
    /// Runs the binary as PID 1 of a new PID namespace; its pid (as the
    /// host sees it) is written to <exec file name>.pid in the jail.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// FILE=VALUE written to the jail's cgroup (e.g. cpuset.cpus=0,
    /// memory.limit_in_bytes=268435456); the controller is FILE's prefix.
    /// Repeatable.
    #[arg(long, value_name = "FILE=VALUE")]
    pub cgroup: Vec<String>,
    /// The cgroup hierarchy version: 1 or 2.
    #[arg(long, value_name = "1|2", default_value = "1")]
    pub cgroup_version: String,
    /// Where in each hierarchy the jail's cgroup <id> goes (default: the
    /// exec file's name).
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<String>,
    /// fsize=BYTES or no-file=N (default no-file=2048). Repeatable.
    #[arg(long, value_name = "RESOURCE=VALUE")]
    pub resource_limit: Vec<String>,
    /// Arguments for the binary, after --.
    #[arg(last = true, value_name = "ARGS")]
    pub extra: Vec<String>,
}

/// A cgroup file and the value written to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupSetting {
    /// The controller (the file name's first dot-separated part).
    pub controller: String,
    /// The file, e.g. memory.limit_in_bytes.
    pub file: String,
    /// What is written.
    pub value: String,
}

/// A resource limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// RLIMIT_FSIZE.
    Fsize(u64),
    /// RLIMIT_NOFILE.
    NoFile(u64),
}

/// Everything the jailer will do, checked.
#[derive(Debug)]
pub struct Plan {
    pub id: String,
    pub exec_file: PathBuf,
    pub exec_name: String,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: PathBuf,
    pub netns: Option<PathBuf>,
    pub daemonize: bool,
    pub new_pid_ns: bool,
    pub cgroups: Vec<CgroupSetting>,
    pub cgroup_version: u8,
    pub parent_cgroup: String,
    pub limits: Vec<Limit>,
    pub extra: Vec<String>,
}

/// Checks an id as Firecracker does: 1 to 64 letters, digits and '-', with
/// Firecracker's messages.
pub fn check_id(id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > 64 {
        return Err(Error::Usage(format!(
            "Invalid instance ID: Invalid len ({});  the length must be between 1 and 64",
            id.len()
        )));
    }
    if let Some((at, c)) = id
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(Error::Usage(format!(
            "Invalid instance ID: Invalid char ({c}) at position {at}"
        )));
    }
    Ok(())
}

fn parse_id_number(flag: &str, v: &str) -> Result<u32, Error> {
    v.parse::<u32>()
        .map_err(|_| Error::Usage(format!("Invalid {flag}: {v}")))
}

/// Parses FILE=VALUE (Firecracker's messages).
pub fn parse_cgroup(spec: &str) -> Result<CgroupSetting, Error> {
    let (file, value) = spec
        .split_once('=')
        .filter(|(_, v)| !v.is_empty() && !v.contains('\n'))
        .ok_or_else(|| Error::Usage(format!("Invalid format for cgroups: {spec}")))?;
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    };
    match file.split_once('.') {
        Some((controller, setting)) if name_ok(controller) && name_ok(setting) => {
            Ok(CgroupSetting {
                controller: controller.to_string(),
                file: file.to_string(),
                value: value.to_string(),
            })
        }
        _ => Err(Error::Usage(format!("Cgroup invalid file: {file}"))),
    }
}

/// Parses RESOURCE=VALUE (Firecracker's messages).
pub fn parse_limit(spec: &str) -> Result<Limit, Error> {
    let (name, value) = spec
        .split_once('=')
        .ok_or_else(|| Error::Usage(format!("Invalid format for resources limits: {spec}")))?;
    let limit: fn(u64) -> Limit = match name {
        "fsize" => Limit::Fsize,
        "no-file" => Limit::NoFile,
        _ => return Err(Error::Usage(format!("Invalid resource argument: {name}"))),
    };
    value
        .parse()
        .map(limit)
        .map_err(|e| Error::Usage(format!("Invalid limit value for resource: {value}: {e}")))
}

/// A relative cgroup path without '..' or '.' (it goes under each
/// hierarchy), as Firecracker checks it; returned with its components
/// joined by '/'.
fn check_parent_cgroup(p: &str) -> Result<String, Error> {
    use std::path::Component;
    let path = Path::new(p);
    let parts: Vec<&str> = path
        .components()
        .map(|c| match c {
            Component::Normal(n) => n.to_str().filter(|n| !n.contains('\n')),
            _ => None,
        })
        .collect::<Option<_>>()
        .unwrap_or_default();
    if parts.is_empty() {
        return Err(Error::Usage(
            "Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'"
                .into(),
        ));
    }
    Ok(parts.join("/"))
}

/// `path` with every symlink resolved, as Firecracker's jailer wants its
/// exec file and chroot base (with its message when it does not exist).
fn canonical(path: &Path) -> Result<PathBuf, Error> {
    std::fs::canonicalize(path).map_err(|e| {
        Error::Usage(format!(
            "Failed to canonicalize path {}: {e}",
            path.display()
        ))
    })
}

impl Cli {
    /// Validates every flag, in Firecracker's order and with its messages;
    /// touches nothing.
    pub fn plan(self) -> Result<Plan, Error> {
        check_id(&self.id)?;
        let exec_file = canonical(&self.exec_file)?;
        if !exec_file.is_file() {
            return Err(Error::Usage(format!(
                "{} is not a file",
                exec_file.display()
            )));
        }
        // The name of the file itself (a symlink's target), as Firecracker.
        let exec_name = exec_file
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "Failed to extract filename from path {}",
                    exec_file.display()
                ))
            })?;
        let chroot_base = canonical(&self.chroot_base_dir)?;
        if !chroot_base.is_dir() {
            return Err(Error::Usage(format!(
                "{} is not a directory",
                chroot_base.display()
            )));
        }
        let uid = parse_id_number("uid", &self.uid)?;
        let gid = parse_id_number("gid", &self.gid)?;
        let parent_cgroup =
            check_parent_cgroup(self.parent_cgroup.as_deref().unwrap_or(&exec_name))?;
        let cgroup_version = match self.cgroup_version.as_str() {
            "1" => 1,
            "2" => 2,
            v => {
                return Err(Error::Usage(format!(
                    "{v} is an invalid cgroup version specifier"
                )))
            }
        };
        let cgroups = self
            .cgroup
            .iter()
            .map(|c| parse_cgroup(c))
            .collect::<Result<Vec<_>, _>>()?;
        let limits = self
            .resource_limit
            .iter()
            .map(|l| parse_limit(l))
            .collect::<Result<Vec<_>, _>>()?;
        // Firecracker's jailer opens it only when it joins it; this checks
        // it before anything is made.
        if let Some(ns) = &self.netns {
            std::fs::File::open(ns)
                .map_err(|e| Error::Usage(format!("Failed to open file {}: {e}", ns.display())))?;
        }
        Ok(Plan {
            id: self.id,
            exec_file,
            exec_name,
            uid,
            gid,
            chroot_base,
            netns: self.netns,
            daemonize: self.daemonize,
            new_pid_ns: self.new_pid_ns,
            cgroups,
            cgroup_version,
            parent_cgroup,
            limits,
            extra: self.extra,
        })
    }
}

impl Plan {
    /// `<base>/<exec name>/<id>/root`.
    pub fn jail_root(&self) -> PathBuf {
        self.chroot_base
            .join(&self.exec_name)
            .join(&self.id)
            .join("root")
    }
}

/// Whether `p` exists (without following a final symlink).
pub fn exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory holding an exec file named `firecracker-x`
    /// (through a symlink `link`), removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let d =
                std::env::temp_dir().join(format!("vmm-jailer-args-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(d.join("base")).unwrap();
            std::fs::write(d.join("firecracker-x"), b"binary").unwrap();
            std::os::unix::fs::symlink(d.join("firecracker-x"), d.join("link")).unwrap();
            Scratch(d)
        }

        fn path(&self, name: &str) -> String {
            self.0.join(name).to_str().unwrap().to_string()
        }

        /// Plans with the common flags (`--exec-file link`), those in
        /// `set` replacing them, then `extra`.
        fn plan_with(&self, set: &[(&str, &str)], extra: &[&str]) -> Result<Plan, Error> {
            let (exec, base) = (self.path("link"), self.path("base"));
            let mut flags = vec![
                ("--id", "vm-1"),
                ("--exec-file", exec.as_str()),
                ("--uid", "123"),
                ("--gid", "456"),
                ("--chroot-base-dir", base.as_str()),
            ];
            for (flag, value) in set {
                flags.iter_mut().find(|(f, _)| f == flag).unwrap().1 = value;
            }
            let mut v = vec!["vmm-jailer"];
            for (flag, value) in flags {
                v.extend([flag, value]);
            }
            v.extend_from_slice(extra);
            Cli::try_parse_from(v)
                .map_err(|e| Error::Usage(e.to_string()))?
                .plan()
        }

        fn plan(&self, extra: &[&str]) -> Result<Plan, Error> {
            self.plan_with(&[], extra)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_good_command_line_plans_the_jail() {
        let s = Scratch::new("good");
        let p = s
            .plan(&[
                "--cgroup",
                "cpuset.cpus=0",
                "--resource-limit",
                "no-file=100",
                "--",
                "--level",
                "Debug",
            ])
            .unwrap();
        // The exec file's own name (the symlink resolved), as Firecracker.
        assert_eq!(
            (p.uid, p.gid, p.exec_name.as_str()),
            (123, 456, "firecracker-x")
        );
        let base = std::fs::canonicalize(s.path("base")).unwrap();
        assert_eq!(p.jail_root(), base.join("firecracker-x/vm-1/root"));
        assert_eq!(p.parent_cgroup, "firecracker-x");
        assert_eq!(p.limits, vec![Limit::NoFile(100)]);
        assert_eq!(p.cgroups[0].controller, "cpuset");
        assert_eq!(p.extra, vec!["--level", "Debug"]);
    }

    /// Firecracker's messages, compared with its jailer on the same flags.
    #[test]
    fn bad_flags_get_firecracker_s_messages() {
        let s = Scratch::new("bad");
        let err = |extra: &[&str]| s.plan(extra).err().unwrap().to_string();
        let err_with = |flag: &str, value: &str| {
            s.plan_with(&[(flag, value)], &[])
                .err()
                .unwrap()
                .to_string()
        };
        for (flag, value, want) in [
            (
                "--id",
                "",
                "Invalid instance ID: Invalid len (0);  the length must be between 1 and 64",
            ),
            (
                "--id",
                &"x".repeat(65),
                "Invalid instance ID: Invalid len (65);  the length must be between 1 and 64",
            ),
            (
                "--id",
                "a/b",
                "Invalid instance ID: Invalid char (/) at position 1",
            ),
            (
                "--id",
                "a_b",
                "Invalid instance ID: Invalid char (_) at position 1",
            ),
            ("--uid", "4294967296", "Invalid uid: 4294967296"),
            ("--gid", "-1", "Invalid gid: -1"),
            (
                "--chroot-base-dir",
                "/nonexistent/base",
                "Failed to canonicalize path /nonexistent/base: No such file or directory (os error 2)",
            ),
            (
                "--chroot-base-dir",
                "/etc/hostname",
                "/etc/hostname is not a directory",
            ),
        ] {
            assert_eq!(err_with(flag, value), want, "{flag} {value}");
        }
        let missing = s.path("nonexistent");
        assert_eq!(
            err_with("--exec-file", &missing),
            format!(
                "Failed to canonicalize path {missing}: No such file or directory (os error 2)"
            )
        );
        // The path resolved, as Firecracker's message gives it.
        let dir = std::fs::canonicalize(s.path("base")).unwrap();
        assert_eq!(
            err_with("--exec-file", &s.path("base")),
            format!("{} is not a file", dir.display())
        );
        for (extra, want) in [
            (&["--cgroup", "nodot=1"][..], "Cgroup invalid file: nodot"),
            (&["--cgroup", "=1"], "Cgroup invalid file: "),
            (
                &["--cgroup", "memory.limit_in_bytes"],
                "Invalid format for cgroups: memory.limit_in_bytes",
            ),
            (
                &["--cgroup", "cpu.shares="],
                "Invalid format for cgroups: cpu.shares=",
            ),
            (
                &["--resource-limit", "nproc=1"],
                "Invalid resource argument: nproc",
            ),
            (
                &["--resource-limit", "fsize=big"],
                "Invalid limit value for resource: big: invalid digit found in string",
            ),
            (
                &["--resource-limit", "fsize"],
                "Invalid format for resources limits: fsize",
            ),
            (
                &["--cgroup-version", "3"],
                "3 is an invalid cgroup version specifier",
            ),
            (
                &["--netns", "/nonexistent/netns"],
                "Failed to open file /nonexistent/netns: No such file or directory (os error 2)",
            ),
        ] {
            assert_eq!(err(extra), want, "{extra:?}");
        }
        for parent in ["../up", "/abs", "./a", "a/../b", ""] {
            assert_eq!(
                err(&["--parent-cgroup", parent]),
                "Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'",
                "{parent}"
            );
        }
    }

    #[test]
    fn cgroup_and_limit_specs_parse() {
        assert_eq!(
            parse_cgroup("memory.limit_in_bytes=1048576").unwrap(),
            CgroupSetting {
                controller: "memory".into(),
                file: "memory.limit_in_bytes".into(),
                value: "1048576".into()
            }
        );
        assert_eq!(parse_limit("fsize=10").unwrap(), Limit::Fsize(10));
        assert_eq!(parse_limit("no-file=3").unwrap(), Limit::NoFile(3));
        assert_eq!(check_parent_cgroup("a/b/").unwrap(), "a/b");
        // As Firecracker (Path::components): inner '.' and '//' vanish.
        assert_eq!(check_parent_cgroup("a/./b").unwrap(), "a/b");
        assert_eq!(check_parent_cgroup("a//b").unwrap(), "a/b");
    }
}
