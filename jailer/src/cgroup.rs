//! The jail's cgroups, v1 (one hierarchy per controller, found in
//! /proc/mounts) or v2 (the unified hierarchy): created under
//! `<hierarchy>/<parent cgroup>/<id>`, given the requested values, and joined.
//! Everything created is listed so that a failure removes it again.

use std::fs;
use std::path::{Path, PathBuf};

use crate::args::{CgroupSetting, Plan};
use crate::Error;

/// Directories this run created, in creation order.
#[derive(Debug, Default)]
pub struct Created {
    dirs: Vec<PathBuf>,
}

impl Created {
    /// Removes what was created, deepest first (a cgroup with a process in
    /// it cannot be removed; the process must have left it).
    pub fn remove(&mut self) {
        for d in self.dirs.drain(..).rev() {
            let _ = fs::remove_dir(&d);
        }
    }

    /// Creates `dir` and its missing parents, recording each.
    fn create_all(&mut self, dir: &Path) -> Result<(), Error> {
        let mut missing = Vec::new();
        let mut p = dir;
        while !p.exists() {
            missing.push(p.to_path_buf());
            match p.parent() {
                Some(parent) => p = parent,
                None => break,
            }
        }
        for d in missing.into_iter().rev() {
            fs::create_dir(&d).map_err(|e| {
                Error::Cgroup(format!("cannot create the cgroup {}: {e}", d.display()))
            })?;
            self.dirs.push(d);
        }
        Ok(())
    }

    /// The directories created under `root`, top-down.
    fn under<'a>(&'a self, root: &'a Path) -> impl Iterator<Item = &'a PathBuf> {
        self.dirs.iter().filter(move |d| d.starts_with(root))
    }
}

/// A mounted cgroup hierarchy: where, and (v1) which controllers.
struct Mount {
    path: PathBuf,
    controllers: Vec<String>,
}

fn mounts(fstype: &str) -> Result<Vec<Mount>, Error> {
    let text = fs::read_to_string("/proc/mounts")
        .map_err(|e| Error::Cgroup(format!("cannot read /proc/mounts: {e}")))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && f[2] == fstype).then(|| Mount {
                path: PathBuf::from(f[1]),
                controllers: f[3].split(',').map(str::to_string).collect(),
            })
        })
        .collect())
}

fn write(path: &Path, value: &str) -> Result<(), Error> {
    fs::write(path, value)
        .map_err(|e| Error::Cgroup(format!("cannot write '{value}' to {}: {e}", path.display())))
}

/// Sets up the cgroups `plan` asks for and moves process `pid` into them.
/// On failure, everything created is removed again before the error returns.
pub fn setup(plan: &Plan, pid: u32) -> Result<Created, Error> {
    let mut created = Created::default();
    let result = match plan.cgroup_version {
        1 => setup_v1(plan, pid, &mut created),
        _ => setup_v2(plan, pid, &mut created),
    };
    if let Err(e) = result {
        created.remove();
        return Err(e);
    }
    Ok(created)
}

fn setup_v1(plan: &Plan, pid: u32, created: &mut Created) -> Result<(), Error> {
    let all = mounts("cgroup")?;
    // The hierarchies the settings need (controllers can share one).
    let mut targets: Vec<(&Mount, Vec<&CgroupSetting>)> = Vec::new();
    for s in &plan.cgroups {
        let m = all
            .iter()
            .find(|m| m.controllers.contains(&s.controller))
            .ok_or_else(|| {
                Error::Cgroup(format!(
                    "no cgroup v1 hierarchy has the '{}' controller (for --cgroup {}); use a mounted controller or --cgroup-version 2",
                    s.controller, s.file
                ))
            })?;
        match targets.iter_mut().find(|(t, _)| t.path == m.path) {
            Some((_, list)) => list.push(s),
            None => targets.push((m, vec![s])),
        }
    }
    for (m, settings) in targets {
        let dir = m.path.join(&plan.parent_cgroup).join(&plan.id);
        if dir.exists() {
            return Err(Error::Cgroup(format!(
                "the cgroup {} exists already; give an --id no other microVM uses",
                dir.display()
            )));
        }
        created.create_all(&dir)?;
        if m.controllers.iter().any(|c| c == "cpuset") {
            inherit_cpuset(&m.path, created)?;
        }
        for s in settings {
            write(&dir.join(&s.file), &s.value)?;
        }
        write(&dir.join("tasks"), &pid.to_string())?;
    }
    Ok(())
}

/// A new v1 cpuset cgroup has no CPUs or memory nodes; each created level
/// takes its parent's (as a task cannot join an empty cpuset).
fn inherit_cpuset(root: &Path, created: &Created) -> Result<(), Error> {
    for d in created.under(root) {
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let Some(parent) = d.parent() else { continue };
            let value = fs::read_to_string(parent.join(file)).map_err(|e| {
                Error::Cgroup(format!("cannot read {}: {e}", parent.join(file).display()))
            })?;
            write(&d.join(file), value.trim())?;
        }
    }
    Ok(())
}

fn setup_v2(plan: &Plan, pid: u32, created: &mut Created) -> Result<(), Error> {
    let root = mounts("cgroup2")?
        .into_iter()
        .next()
        .map(|m| m.path)
        .ok_or_else(|| {
            Error::Cgroup(
                "no cgroup v2 hierarchy is mounted; mount one or use --cgroup-version 1".into(),
            )
        })?;
    let parent = root.join(&plan.parent_cgroup);
    if plan.cgroups.is_empty() {
        // Firecracker's rule: no settings, no new cgroup; join the parent
        // cgroup if it exists.
        if parent.is_dir() {
            write(&parent.join("cgroup.procs"), &pid.to_string())?;
        }
        return Ok(());
    }
    let dir = parent.join(&plan.id);
    if dir.exists() {
        return Err(Error::Cgroup(format!(
            "the cgroup {} exists already; give an --id no other microVM uses",
            dir.display()
        )));
    }
    created.create_all(&dir)?;
    // Controllers the settings need, enabled from the root down to the
    // parent ("cgroup.*" files belong to no controller).
    let mut controllers: Vec<&str> = plan
        .cgroups
        .iter()
        .map(|s| s.controller.as_str())
        .filter(|c| *c != "cgroup")
        .collect();
    controllers.dedup();
    for c in controllers {
        let mut level = root.clone();
        for part in Path::new(&plan.parent_cgroup).components() {
            write(&level.join("cgroup.subtree_control"), &format!("+{c}"))?;
            level = level.join(part);
        }
        write(&level.join("cgroup.subtree_control"), &format!("+{c}"))?;
    }
    for s in &plan.cgroups {
        write(&dir.join(&s.file), &s.value)?;
    }
    write(&dir.join("cgroup.procs"), &pid.to_string())
}
