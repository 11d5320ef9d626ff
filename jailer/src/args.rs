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

/// Checks an id as Firecracker does: 1 to 64 letters, digits and '-'.
pub fn check_id(id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(Error::Usage(format!(
            "--id '{id}' is not 1 to 64 letters, digits and '-'; give e.g. --id vm-1."
        )));
    }
    Ok(())
}

fn parse_id_number(flag: &str, v: &str) -> Result<u32, Error> {
    v.parse::<u32>().map_err(|_| {
        Error::Usage(format!(
            "--{flag} '{v}' is not a number from 0 to 4294967295; give a numeric {flag}."
        ))
    })
}

/// Parses FILE=VALUE.
pub fn parse_cgroup(spec: &str) -> Result<CgroupSetting, Error> {
    let bad = || {
        Error::Usage(format!(
            "--cgroup '{spec}' is not FILE=VALUE with FILE named CONTROLLER.SETTING; give e.g. cpuset.cpus=0."
        ))
    };
    let (file, value) = spec.split_once('=').ok_or_else(bad)?;
    let (controller, setting) = file.split_once('.').ok_or_else(bad)?;
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    };
    if !name_ok(controller) || !name_ok(setting) || value.is_empty() || value.contains('\n') {
        return Err(bad());
    }
    Ok(CgroupSetting {
        controller: controller.to_string(),
        file: file.to_string(),
        value: value.to_string(),
    })
}

/// Parses RESOURCE=VALUE.
pub fn parse_limit(spec: &str) -> Result<Limit, Error> {
    let bad = || {
        Error::Usage(format!(
            "--resource-limit '{spec}' is not fsize=BYTES or no-file=N; give e.g. no-file=1024."
        ))
    };
    let (name, value) = spec.split_once('=').ok_or_else(bad)?;
    let value: u64 = value.parse().map_err(|_| bad())?;
    match name {
        "fsize" => Ok(Limit::Fsize(value)),
        "no-file" => Ok(Limit::NoFile(value)),
        _ => Err(bad()),
    }
}

/// A relative cgroup path without '..' (it goes under each hierarchy).
fn check_parent_cgroup(p: &str) -> Result<String, Error> {
    let trimmed = p.trim_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\n'))
    {
        return Err(Error::Usage(format!(
            "--parent-cgroup '{p}' is not a path of names inside the cgroup hierarchy; give e.g. vmm/tenants."
        )));
    }
    Ok(trimmed.to_string())
}

impl Cli {
    /// Validates every flag; touches nothing.
    pub fn plan(self) -> Result<Plan, Error> {
        check_id(&self.id)?;
        let meta = std::fs::metadata(&self.exec_file).map_err(|e| {
            Error::Usage(format!(
                "--exec-file '{}': {e}; give the path of the vmm binary.",
                self.exec_file.display()
            ))
        })?;
        if !meta.is_file() {
            return Err(Error::Usage(format!(
                "--exec-file '{}' is not a regular file; give the path of the vmm binary.",
                self.exec_file.display()
            )));
        }
        let exec_name = self
            .exec_file
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "--exec-file '{}' has no usable file name.",
                    self.exec_file.display()
                ))
            })?;
        let uid = parse_id_number("uid", &self.uid)?;
        let gid = parse_id_number("gid", &self.gid)?;
        if let Ok(m) = std::fs::metadata(&self.chroot_base_dir) {
            if !m.is_dir() {
                return Err(Error::Usage(format!(
                    "--chroot-base-dir '{}' exists and is not a directory; give a directory.",
                    self.chroot_base_dir.display()
                )));
            }
        }
        if !self.chroot_base_dir.is_absolute() {
            return Err(Error::Usage(format!(
                "--chroot-base-dir '{}' is not an absolute path; give one.",
                self.chroot_base_dir.display()
            )));
        }
        if let Some(ns) = &self.netns {
            std::fs::metadata(ns).map_err(|e| {
                Error::Usage(format!(
                    "--netns '{}': {e}; give a network namespace file such as /var/run/netns/NAME.",
                    ns.display()
                ))
            })?;
        }
        let cgroup_version = match self.cgroup_version.as_str() {
            "1" => 1,
            "2" => 2,
            v => {
                return Err(Error::Usage(format!(
                    "--cgroup-version '{v}' is not 1 or 2."
                )))
            }
        };
        let cgroups = self
            .cgroup
            .iter()
            .map(|c| parse_cgroup(c))
            .collect::<Result<Vec<_>, _>>()?;
        let parent_cgroup =
            check_parent_cgroup(self.parent_cgroup.as_deref().unwrap_or(&exec_name))?;
        let limits = self
            .resource_limit
            .iter()
            .map(|l| parse_limit(l))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Plan {
            id: self.id,
            exec_file: self.exec_file,
            exec_name,
            uid,
            gid,
            chroot_base: self.chroot_base_dir,
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

    fn cli(args: &[&str]) -> Result<Plan, Error> {
        let mut v = vec!["vmm-jailer"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)
            .map_err(|e| Error::Usage(e.to_string()))?
            .plan()
    }

    const OK: [&str; 8] = [
        "--id",
        "vm-1",
        "--exec-file",
        "/bin/sh",
        "--uid",
        "123",
        "--gid",
        "456",
    ];

    #[test]
    fn a_good_command_line_plans_the_jail() {
        let mut args = OK.to_vec();
        args.extend([
            "--cgroup",
            "cpuset.cpus=0",
            "--resource-limit",
            "no-file=100",
            "--",
            "--level",
            "Debug",
        ]);
        let p = cli(&args).unwrap();
        assert_eq!((p.uid, p.gid, p.exec_name.as_str()), (123, 456, "sh"));
        assert_eq!(p.jail_root(), Path::new("/srv/jailer/sh/vm-1/root"));
        assert_eq!(p.parent_cgroup, "sh");
        assert_eq!(p.limits, vec![Limit::NoFile(100)]);
        assert_eq!(p.cgroups[0].controller, "cpuset");
        assert_eq!(p.extra, vec!["--level", "Debug"]);
    }

    #[test]
    fn bad_ids_numbers_and_specs_are_refused() {
        for (flag_at, bad) in [
            (1, "a/b"),
            (1, ""),
            (1, "x".repeat(65).leak() as &str),
            (1, "a_b"),
            (5, "4294967296"),
            (5, "-1"),
            (7, "abc"),
            (3, "/nonexistent/vmm"),
            (3, "/"),
        ] {
            let mut args = OK.to_vec();
            args[flag_at] = bad;
            let e = cli(&args).err().unwrap().to_string();
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
        for (flag, bad) in [
            ("--cgroup", "nodot=1"),
            ("--cgroup", "memory.limit_in_bytes"),
            ("--cgroup", "../x.y=1"),
            ("--resource-limit", "nproc=1"),
            ("--resource-limit", "fsize=big"),
            ("--cgroup-version", "3"),
            ("--parent-cgroup", "../up"),
            ("--chroot-base-dir", "relative/dir"),
            ("--chroot-base-dir", "/etc/hostname"),
            ("--netns", "/nonexistent/netns"),
        ] {
            let mut args = OK.to_vec();
            args.extend([flag, bad]);
            assert!(cli(&args).is_err(), "{flag} {bad} accepted");
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
        assert_eq!(check_parent_cgroup("/a/b/").unwrap(), "a/b");
    }
}
