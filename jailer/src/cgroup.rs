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

fn unavailable(controller: &str, why: &str) -> Error {
    Error::Cgroup(format!("Controller {controller} is unavailable ({why})"))
}

/// Where the jail's cgroups go, found (and every controller checked) before
/// anything is created, as Firecracker's jailer does.
pub enum Hierarchies {
    /// cgroup v1 and no --cgroup: nothing to do.
    None,
    /// cgroup v1: each hierarchy the settings need (controllers can share
    /// one), whether it has cpuset, and its settings.
    V1(Vec<(PathBuf, bool, Vec<CgroupSetting>)>),
    /// cgroup v2: the unified hierarchy's root.
    V2(PathBuf),
}

/// Finds the hierarchies `plan` needs; an unknown controller is refused.
pub fn find(plan: &Plan) -> Result<Hierarchies, Error> {
    if plan.cgroup_version == 2 {
        return find_v2(plan);
    }
    if plan.cgroups.is_empty() {
        return Ok(Hierarchies::None);
    }
    let all = mounts("cgroup")?;
    let mut targets: Vec<(PathBuf, bool, Vec<CgroupSetting>)> = Vec::new();
    for s in &plan.cgroups {
        let m = all
            .iter()
            .find(|m| m.controllers.contains(&s.controller))
            .ok_or_else(|| {
                unavailable(
                    &s.controller,
                    "no cgroup v1 hierarchy has it; use a mounted controller or --cgroup-version 2",
                )
            })?;
        match targets.iter_mut().find(|(path, ..)| *path == m.path) {
            Some((.., list)) => list.push(s.clone()),
            None => targets.push((
                m.path.clone(),
                m.controllers.iter().any(|c| c == "cpuset"),
                vec![s.clone()],
            )),
        }
    }
    Ok(Hierarchies::V1(targets))
}

fn find_v2(plan: &Plan) -> Result<Hierarchies, Error> {
    let root = mounts("cgroup2")?
        .into_iter()
        .next()
        .map(|m| m.path)
        .ok_or_else(|| {
            Error::Cgroup(
                "no cgroup v2 hierarchy is mounted; mount one or use --cgroup-version 1".into(),
            )
        })?;
    let available = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    for c in controllers_v2(plan) {
        if !available.split_whitespace().any(|a| a == c) {
            return Err(unavailable(
                c,
                &format!("not in {}", root.join("cgroup.controllers").display()),
            ));
        }
    }
    Ok(Hierarchies::V2(root))
}

/// The v2 controllers the settings need, each once ("cgroup.*" files
/// belong to no controller).
fn controllers_v2(plan: &Plan) -> Vec<&str> {
    let mut list: Vec<&str> = Vec::new();
    for s in &plan.cgroups {
        if s.controller != "cgroup" && !list.contains(&s.controller.as_str()) {
            list.push(&s.controller);
        }
    }
    list
}

/// An existing cgroup `dir` is reused, as Firecracker's jailer does (one a
/// crashed microVM left, say), unless a process is in it (`procs_file`
/// lists one): then another microVM uses the id.
fn refuse_busy(dir: &Path, procs_file: &str) -> Result<(), Error> {
    match fs::read_to_string(dir.join(procs_file)) {
        Ok(procs) if !procs.trim().is_empty() => Err(Error::Cgroup(format!(
            "the cgroup {} exists and has processes in it; give an --id no other microVM uses",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Sets up the cgroups `plan` asks for in `hierarchies` and moves process
/// `pid` into them. On failure, everything created is removed again
/// before the error returns.
pub fn setup(plan: &Plan, hierarchies: &Hierarchies, pid: u32) -> Result<Created, Error> {
    let mut created = Created::default();
    let result = match hierarchies {
        Hierarchies::None => Ok(()),
        Hierarchies::V1(targets) => setup_v1(plan, targets, pid, &mut created),
        Hierarchies::V2(root) => setup_v2(plan, root, pid, &mut created),
    };
    if let Err(e) = result {
        created.remove();
        return Err(e);
    }
    Ok(created)
}

fn setup_v1(
    plan: &Plan,
    targets: &[(PathBuf, bool, Vec<CgroupSetting>)],
    pid: u32,
    created: &mut Created,
) -> Result<(), Error> {
    for (mount, cpuset, settings) in targets {
        let dir = mount.join(&plan.parent_cgroup).join(&plan.id);
        refuse_busy(&dir, "tasks")?;
        created.create_all(&dir)?;
        if *cpuset {
            inherit_cpuset(mount, created)?;
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

fn setup_v2(plan: &Plan, root: &Path, pid: u32, created: &mut Created) -> Result<(), Error> {
    let parent = root.join(&plan.parent_cgroup);
    if plan.cgroups.is_empty() {
        // Firecracker's rule: no settings, no new cgroup; join the parent
        // cgroup if it exists.
        if parent.is_dir() {
            // Firecracker's message (and its errno: EBUSY when the parent
            // has domain controllers enabled for its children).
            fs::write(parent.join("cgroup.procs"), pid.to_string()).map_err(|e| {
                Error::Cgroup(format!(
                    "Failed to move process to cgroup ({}): {e}; to create a child cgroup under it instead, give any --cgroup",
                    parent.display()
                ))
            })?;
        }
        return Ok(());
    }
    let dir = parent.join(&plan.id);
    refuse_busy(&dir, "cgroup.procs")?;
    created.create_all(&dir)?;
    // The controllers, enabled from the root down to the parent.
    for c in controllers_v2(plan) {
        let mut level = root.to_path_buf();
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
