//! The commands the README and docs/ show, checked against the code:
//! - every `vmm` and `vmm run` command line is parsed with the real parsers;
//! - every shell example (a fenced block marked `sh`) is run, in order, one
//!   Markdown file at a time, in a directory where `vmlinux`, `disk.img`,
//!   `my.ext4`, `data.img`, `bigger.img` and `vm.json` are the project's
//!   kernel and root disk and small stand-ins, inside a network and PID
//!   namespace of its own holding the TAP devices the prose says exist.
//!   Each command must exit 0 unless its comment says `exits N` (with
//!   `(M on a PVM host ...)` where that host differs), and what the file's
//!   examples print is checked below.
//!
//! Blocks are marked with their fence's info string: `sh` (run in that
//! directory), `sh repo` (run from the repository's root: build, install,
//! the README's set-up), `sh ci` (the README's test command: `.ci/run` runs
//! exactly it), `sh long` (benchmarks and fuzzing, minutes to hours each:
//! their arguments and prerequisites are checked, not the full run);
//! `text`, `json`, `rust` are not commands.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use common::Host;

/// The lines of the indented and fenced code blocks of a Markdown file,
/// with backslash continuations joined.
fn code_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let code = if fenced {
            Some(line)
        } else {
            line.strip_prefix("    ")
        };
        let Some(code) = code else { continue };
        let code = code.trim();
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head.trim_end());
            pending.push(' ');
            continue;
        }
        pending.push_str(code);
        out.push(std::mem::take(&mut pending));
    }
    out
}

/// Splits a shell command line into words (quotes, no expansions); stops at
/// an unquoted `#`, `|`, `;`, `&` or `>`.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut in_word = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '#' | '|' | ';' | '&' | '>') if !in_word => break,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

#[test]
fn every_vmm_command_the_docs_show_parses() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for file in &doc_files() {
        let text = std::fs::read_to_string(file).unwrap();
        // Inline code names flags as often as it shows commands: a span is
        // taken for a command when it has an argument after `vmm` or
        // `vmm run` and does not end in a flag.
        let inline = inline_code(&text).into_iter().filter(|c| {
            let w = words(c);
            w.len() >= 3 && w.last().is_some_and(|l| !l.starts_with('-'))
        });
        for line in code_lines(&text).into_iter().chain(inline) {
            // The command may follow a pipe or `VAR=value`s: from `vmm` on.
            let Some(start) = line.find("vmm ") else {
                continue;
            };
            let before = &line[..start];
            if !(before.is_empty() || before.ends_with("| ") || before.ends_with("&& ")) {
                continue;
            }
            let cmd = &line[start..];
            if cmd.contains('[') || cmd.contains("...") {
                continue; // a synopsis
            }
            let w = words(cmd);
            let parsed = if w.get(1).map(String::as_str) == Some("snapshot") {
                vmm::snapshot::tool::check_args(w[2..].to_vec())
            } else if w.get(1).map(String::as_str) == Some("run") {
                let args = std::iter::once("vmm run".to_string()).chain(w[2..].iter().cloned());
                vmm::run::RunCli::try_parse_from(args)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                vmm::cli::Cli::try_parse_from(&w)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            };
            checked += 1;
            if let Err(e) = parsed {
                let first = e.lines().next().unwrap_or_default().to_string();
                failures.push(format!("{}: `{cmd}`: {first}", file.display()));
            }
        }
    }
    eprintln!(
        "asserting: the {checked} vmm command lines in README.md and docs/ (code and inline) parse"
    );
    assert!(
        checked >= 10,
        "only {checked} commands found: the extraction broke"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_splitter_takes_quotes_and_stops_at_comments_and_pipes() {
    assert_eq!(
        words("vmm run -- sh -c 'echo hello; exit 7'     # prints hello"),
        ["vmm", "run", "--", "sh", "-c", "echo hello; exit 7"]
    );
    assert_eq!(
        words("vmm run --memory 256 -- wc -c | cat"),
        ["vmm", "run", "--memory", "256", "--", "wc", "-c"]
    );
    assert_eq!(
        code_lines("text\n\n    vmm --kernel k \\\n        --rootfs d\n"),
        ["vmm --kernel k --rootfs d"]
    );
}

/// README.md, then docs/*.md in name order.
fn doc_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs: Vec<_> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    let mut files = vec![root.join("README.md")];
    files.extend(docs);
    files
}

/// The inline code spans of a Markdown text (outside fenced blocks).
fn inline_code(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let (Some(code), Some(_)) = (parts.next(), parts.next()) {
            out.push(code.to_string());
        }
    }
    out
}

/// A fenced code block: its file, the line of its opening fence (1-based),
/// the words of its info string and its lines.
#[derive(Debug)]
struct Block {
    line: usize,
    info: Vec<String>,
    body: Vec<String>,
}

fn fenced_blocks(file: &str, text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut cur: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        if let Some(info) = line.trim_start().strip_prefix("```") {
            match cur.take() {
                Some(b) => out.push(b),
                None => {
                    cur = Some(Block {
                        line: i + 1,
                        info: info.split_whitespace().map(String::from).collect(),
                        body: Vec::new(),
                    })
                }
            }
        } else if let Some(b) = cur.as_mut() {
            b.body.push(line.to_string());
        }
    }
    assert!(cur.is_none(), "{file}: a code block is not closed");
    out
}

/// The commands of a shell block, as (first line, last line, text) with
/// 0-based line indices: lines joined while a backslash continues them or a
/// single quote is open.
fn shell_commands(body: &[String]) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    let mut start = None;
    let mut text = String::new();
    let mut quoted = false;
    for (i, line) in body.iter().enumerate() {
        if start.is_none() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            start = Some(i);
        }
        let mut prev = ' ';
        for c in line.chars() {
            match c {
                '\'' => quoted = !quoted,
                // An unquoted comment: its apostrophes quote nothing.
                '#' if !quoted && prev.is_whitespace() => break,
                _ => {}
            }
            prev = c;
        }
        text.push_str(line);
        text.push('\n');
        if quoted || line.trim_end().ends_with('\\') {
            continue;
        }
        out.push((start.take().unwrap(), i, std::mem::take(&mut text)));
    }
    assert!(start.is_none(), "an unfinished command: {text}");
    out
}

/// The exit status a command's comment declares for `host` (`exits N`, and
/// `(M on a PVM host` where it differs); 0 when it declares none. The
/// comment is on the command's last line, or on a comment line right after.
fn declared_status(comment: &str, host: Host) -> i32 {
    let Some(pos) = comment.find("exits ") else {
        return 0;
    };
    let rest = &comment[pos + 6..];
    let num = |s: &str| -> i32 {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or_else(|_| panic!("`exits` without a number in {comment:?}"))
    };
    let status = num(rest);
    if host == Host::Pvm {
        if let Some(p) = rest.find(" on a PVM host") {
            let open = rest[..p].rfind('(').expect("a PVM status in parentheses");
            return num(&rest[open + 1..]);
        }
    }
    status
}

/// What the examples of one file must have printed (`line:` asks for a
/// whole line) or left in the stage directory (`file:NAME:` for text in
/// that file), on either host or on one only.
fn expectations(file: &str, host: Host) -> Vec<&'static str> {
    let mut e: Vec<&'static str> = match file {
        "README.md" => vec![
            "VMM-TEST: rootfs init up",
            "run-guest: building vmm",
            "install: vmm, vmm-jailer and vmm-agent are in",
            "file:home/.local/bin/vmm-agent:",
            "line:hello",
            "line:app test ran",
            "file:boot.json:\"verdict\": \"pass\"",
        ],
        "docs/AGENT.md" => vec!["test result: ok"],
        // The guest is stopped right after the calls: how far it got
        // depends on the host, so only the API's own answers are asserted.
        "docs/API.md" => vec!["\"state\":\"Running\""],
        "docs/EMBEDDING.md" => vec!["line:42"],
        "docs/FUZZING.md" => vec![
            "fuzz target virtio_blk_requests exists",
            "fuzz target snapshot_state exists",
        ],
        "docs/PERFORMANCE.md" => vec![
            "dry run: bench-boot.py",
            "dry run: bench-net.py",
            "dry run: bench-jail.py",
        ],
        "docs/RUN.md" => vec![
            "line:hello",
            "line:5",
            "line:V in /tmp",
            "line:app test ran",
            "1 packets received",
            "line:1048576",
        ],
        "docs/SMOKE.md" => vec![
            "file:boot.json:\"verdict\": \"pass\"",
            "file:console.txt:VMM-TEST: rootfs init up",
        ],
        "docs/SNAPSHOTS.md" => vec!["\"state\":\"Running\"", "Linux version", "checksum ok"],
        _ => vec![],
    };
    match (file, host) {
        ("docs/CLI.md", Host::Pvm) => e.push("this host's /dev/kvm is PVM"),
        ("docs/CLI.md", Host::Hardware) => e.push("VMM-TEST: rootfs init up"),
        _ => {}
    }
    e
}

/// Whether a file's examples leave a VM running that the runner stops when
/// they are done: the README's bare API socket, and docs/API.md's guest,
/// whose boot the sequence does not wait for (a minute on a PVM host).
fn kill_background(file: &str) -> bool {
    matches!(file, "README.md" | "docs/API.md")
}

/// TAP devices the prose of a file says exist before its examples.
fn taps(file: &str) -> &'static [&'static str] {
    match file {
        "docs/API.md" | "docs/RUN.md" => &["tap0"],
        "docs/SNAPSHOTS.md" => &["tap0", "tap7"],
        _ => &[],
    }
}

/// Text blocks hold synopses, diagrams and protocol sketches, not commands:
/// a `vmm` line there without `[`, `...` or `<` would escape the runner.
#[test]
fn every_block_says_what_it_is_and_commands_are_in_shell_blocks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut bad = Vec::new();
    for path in doc_files() {
        let name = path.strip_prefix(root).unwrap().display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        for b in fenced_blocks(&name, &text) {
            let kind = b.info.join(" ");
            match kind.as_str() {
                "sh" | "sh repo" | "sh ci" | "sh long" | "json" | "json vm.json" | "rust" => {}
                "text" => {
                    let joined = b.body.join("\n").replace("\\\n", " ");
                    for l in joined.lines() {
                        let l = l.trim();
                        if (l.starts_with("vmm ") || l.starts_with("vmm-jailer "))
                            && !(l.contains('[') || l.contains("...") || l.contains('<'))
                        {
                            bad.push(format!("{name}:{}: a command in a text block: {l}", b.line));
                        }
                    }
                }
                other => bad.push(format!(
                    "{name}:{}: a code block marked {other:?}: mark it sh, sh repo, sh ci, sh long, text, json or rust",
                    b.line
                )),
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// Runs `script` with bash under `dir`, in new PID and mount namespaces (and
/// a network namespace with `taps` when `net`): nothing it starts outlives
/// it. Returns the merged output, the `(status, line)` pairs of the
/// commands that failed, and whether it finished in time.
struct How<'a> {
    /// The working directory.
    dir: &'a Path,
    env: &'a [(&'a str, String)],
    /// TAP devices to make (with a network namespace when `net`).
    taps: &'a [&'a str],
    net: bool,
    /// Type `poweroff -f` on a console shell.
    type_poweroff: bool,
    /// Stop background jobs at the end instead of waiting for them.
    kill_background: bool,
    timeout: Duration,
}

fn run_script(script: &str, how: &How) -> (String, Vec<(i32, usize)>, bool) {
    let How {
        dir,
        env,
        taps,
        net,
        type_poweroff,
        kill_background,
        timeout,
    } = *how;
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docs-examples-run");
    std::fs::create_dir_all(&work).unwrap();
    let body = work.join("script.sh");
    let status_file = work.join("status");
    let out_file = work.join("output");
    std::fs::write(
        &body,
        // The ERR trap records each failing top-level command's status and
        // line; background jobs still running at the end are waited for.
        format!(
            "exec 3>>'{status}'\ntrap 'echo \"$? $LINENO\" >&3' ERR\n{script}\n{kill}for p in $(jobs -p); do wait \"$p\"; s=$?; [ \"$s\" = 0 ] || [ \"$s\" = 143 ] || echo \"$s bg\" >&3; done\n",
            status = status_file.display(),
            kill = if kill_background { "trap - ERR; kill $(jobs -p) 2>/dev/null\n" } else { "" }
        ),
    )
    .unwrap();
    let _ = std::fs::remove_file(&status_file);
    let mut setup = String::from("set -e\nrm -f /tmp/vm.sock /tmp/clone.sock\n");
    if net {
        setup += "ip link set lo up\n";
        for t in taps {
            setup += &format!("ip tuntap add dev {t} mode tap\nip link set {t} up\n");
        }
        if taps.contains(&"tap0") {
            setup += "ip addr add 172.16.0.1/24 dev tap0\n";
        }
    }
    setup += &format!(
        "cd '{}'\nset +e\nexec bash '{}'\n",
        dir.display(),
        body.display()
    );
    let mut ns = vec!["--pid", "--fork", "--mount", "--mount-proc", "--kill-child"];
    if net {
        ns.push("--net");
    }
    let out = std::fs::File::create(&out_file).unwrap();
    let mut child = Command::new("unshare")
        .args(&ns)
        .args(["bash", "-c", &setup])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("unshare (util-linux) runs");
    let mut stdin = child.stdin.take();
    if !type_poweroff {
        drop(stdin.take());
    }
    let start = Instant::now();
    let mut last_typed = None::<Instant>;
    let finished = loop {
        if child.try_wait().unwrap().is_some() {
            break true;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        // A console shell (the README's set-up script ends in one): once the
        // guest's init is up, type `poweroff -f` now and then until it ends.
        if let Some(s) = stdin.as_mut() {
            let up = std::fs::read_to_string(&out_file)
                .unwrap_or_default()
                .contains("VMM-TEST: rootfs init up");
            if up && last_typed.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                let _ = s.write_all(b"poweroff -f\n");
                last_typed = Some(Instant::now());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut output = String::new();
    std::fs::File::open(&out_file)
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    let fails = std::fs::read_to_string(&status_file)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let (s, line) = l.split_once(' ').unwrap();
            // A background job's failure is reported at "line" 0.
            (s.parse().unwrap(), line.parse().unwrap_or(0))
        })
        .collect();
    (output, fails, finished)
}

/// The stand-ins the examples name, made once in `dir`.
fn stage(dir: &Path, vm_json: &str) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("home")).unwrap();
    let link = dir.join("vmlinux");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(common::kernel("vmlinux"), &link).unwrap();
    let rootfs = common::resource("build-rootfs.sh");
    std::fs::copy(&rootfs, dir.join("disk.img")).unwrap();
    std::fs::copy(&rootfs, dir.join("bigger.img")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("bigger.img"))
        .unwrap();
    f.set_len(std::fs::metadata(&rootfs).unwrap().len() + (64 << 20))
        .unwrap();
    // 1 MiB of data for `--disk path=data.img`.
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join("data.img"), data).unwrap();
    std::fs::write(dir.join("vm.json"), vm_json).unwrap();
    // my.ext4: the user's root file system for `vmm run --rootfs`, a static
    // busybox and /app/test.
    let tree = dir.join("my-root");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("app")).unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is installed");
    std::fs::copy(busybox, tree.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).unwrap();
    std::fs::write(tree.join("app/test"), "#!/bin/sh\necho app test ran\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        tree.join("app/test"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let _ = std::fs::remove_file(dir.join("my.ext4"));
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(dir.join("my.ext4"))
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4 made my.ext4");
    // Run as root without sudo installed: `sudo CMD` is CMD.
    if Command::new("sh")
        .args(["-c", "command -v sudo"])
        .output()
        .is_ok_and(|o| !o.status.success())
    {
        let shim = dir.join("bin/sudo");
        std::fs::write(&shim, "#!/bin/sh\nexec \"$@\"\n").unwrap();
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// Checks a `sh long` command without its full run.
fn check_long(cmd: &str, root: &Path, env: &[(&str, String)]) -> Result<String, String> {
    let cmd = cmd.split(" #").next().unwrap().trim();
    let cmd = cmd.strip_prefix("sudo ").unwrap_or(cmd);
    let shell = |c: &str, extra: &[(&str, &str)]| -> Result<String, String> {
        let out = Command::new("bash")
            .args(["-c", c])
            .current_dir(root)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .envs(extra.iter().copied())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("`{c}`: {}\n{text}", out.status))
        }
    };
    if cmd.starts_with("cargo build") {
        return shell(cmd, &[]);
    }
    if cmd.starts_with("python3 tools/") {
        return shell(cmd, &[("VMM_BENCH_DRY_RUN", "1")]);
    }
    if let Some(rest) = cmd.strip_prefix("git worktree add ") {
        let rev = rest.split_whitespace().nth(1).ok_or("no revision")?;
        let shallow = shell("git rev-parse --is-shallow-repository", &[])?;
        if shallow.trim() == "true" {
            return Ok(format!("{rev}: a shallow clone, not checked"));
        }
        return shell(&format!("git rev-parse --verify {rev}^{{commit}}"), &[]);
    }
    let (dir, rest) = match cmd.strip_prefix("cd ") {
        Some(r) => {
            let (d, r) = r.split_once(" && ").ok_or("cd without &&")?;
            (root.join(d), r)
        }
        None => (root.to_path_buf(), cmd),
    };
    if let Some(r) = rest.strip_prefix("cargo +nightly fuzz run ") {
        let target = r.split_whitespace().next().ok_or("no fuzz target")?;
        let manifest =
            std::fs::read_to_string(dir.join("fuzz/Cargo.toml")).map_err(|e| e.to_string())?;
        if manifest.contains(&format!("name = \"{target}\"")) {
            return Ok(format!("fuzz target {target} exists"));
        }
        return Err(format!(
            "no fuzz target {target} in {}",
            dir.join("fuzz/Cargo.toml").display()
        ));
    }
    Err(format!(
        "no check for the long-running command `{cmd}`: add one to check_long"
    ))
}

#[test]
fn every_shell_example_runs() {
    let host = common::host();
    // SAFETY: getuid has no preconditions.
    let root_user = unsafe { libc::getuid() } == 0;
    assert!(
        root_user,
        "the docs' examples make TAP devices and namespaces: run the suite as root (CI does)"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docs-examples");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let files: Vec<(String, String)> = doc_files()
        .iter()
        .map(|p| {
            (
                p.strip_prefix(root).unwrap().display().to_string(),
                std::fs::read_to_string(p).unwrap(),
            )
        })
        .collect();
    let vm_json = files
        .iter()
        .flat_map(|(n, t)| fenced_blocks(n, t))
        .find(|b| b.info == ["json", "vm.json"])
        .expect("docs/API.md shows vm.json")
        .body
        .join("\n");
    stage(&dir, &vm_json);

    let bin_dir = Path::new(env!("CARGO_BIN_EXE_vmm")).parent().unwrap();
    let path = format!(
        "{}:{}:{}",
        bin_dir.display(),
        dir.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let real_home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cache =
        std::env::var("VMM_CACHE_DIR").unwrap_or_else(|_| format!("{real_home}/.cache/vmm"));
    let cargo_home = std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{real_home}/.cargo"));
    let rustup_home =
        std::env::var("RUSTUP_HOME").unwrap_or_else(|_| format!("{real_home}/.rustup"));
    let env: Vec<(&str, String)> = vec![
        ("PATH", path),
        ("HOME", dir.join("home").display().to_string()),
        ("USER", "root".into()),
        ("VMM_CACHE_DIR", cache),
        ("CARGO_HOME", cargo_home),
        ("RUSTUP_HOME", rustup_home),
    ];
    let timeout = match host {
        Host::Pvm => Duration::from_secs(1500),
        Host::Hardware => Duration::from_secs(600),
    };
    let mut failures = Vec::new();
    let mut ran = 0;
    let mut seen = std::collections::BTreeSet::new();
    // DOCS_EXAMPLES_ONLY=docs/API.md,README.md runs those files' examples (for work on them).
    let only = std::env::var("DOCS_EXAMPLES_ONLY").ok();
    for (name, text) in &files {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|o| o == name))
        {
            continue;
        }
        let mut output = String::new();
        let mut session = String::new();
        // script line (1-based) -> (declared status, where in the docs)
        let mut declared: BTreeMap<usize, (i32, String)> = BTreeMap::new();
        for b in fenced_blocks(name, text) {
            match b.info.join(" ").as_str() {
                "sh ci" => {
                    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
                    let cmd = b.body.join("\n");
                    if !ci
                        .lines()
                        .any(|l| l.trim() == format!("exec {}", cmd.trim()))
                    {
                        failures.push(format!("{name}:{}: .ci/run does not run `{cmd}`", b.line));
                    }
                    ran += 1;
                }
                "sh long" => {
                    for (_, _, cmd) in shell_commands(&b.body) {
                        let cmd = cmd.replace("\\\n", " ");
                        match check_long(&cmd, root, &env) {
                            Ok(out) => output += &out,
                            Err(e) => failures.push(format!("{name}:{}: {e}", b.line)),
                        }
                        ran += 1;
                    }
                }
                "sh repo" => {
                    let script = b.body.join("\n");
                    eprintln!(
                        "docs-examples: {name}:{}: running `{}` from the repository",
                        b.line,
                        script.trim()
                    );
                    let typing = script.contains("run-guest.sh");
                    let how = How {
                        dir: root,
                        env: &env,
                        taps: &[],
                        net: false,
                        type_poweroff: typing,
                        kill_background: false,
                        timeout,
                    };
                    let t0 = Instant::now();
                    let (out, fails, done) = run_script(&script, &how);
                    eprintln!("docs-examples: ... {:.0} s", t0.elapsed().as_secs_f64());
                    if !done || !fails.is_empty() {
                        failures.push(format!(
                            "{name}:{}: `{}` {}: {fails:?}\n{}",
                            b.line,
                            script.trim(),
                            if done { "failed" } else { "timed out" },
                            tail(&out)
                        ));
                    }
                    output += &out;
                    ran += 1;
                }
                "sh" => {
                    let offset = 2 + session.lines().count();
                    let mut body = b.body.clone();
                    for (first, last, cmd) in shell_commands(&b.body) {
                        ran += 1;
                        let after = b.body.get(last + 1).map(|l| l.trim()).unwrap_or("");
                        let comment = format!(
                            "{} {}",
                            cmd.split_once(" #").map(|x| x.1).unwrap_or(""),
                            after.strip_prefix('#').unwrap_or("")
                        );
                        let status = declared_status(&comment, host);
                        // A VM-booting command an earlier file ran word for
                        // word (the README's and its reference page's) is
                        // not booted again: what it leaves is already there.
                        let key = cmd.split(" #").next().unwrap_or("").trim().to_string();
                        if first == last
                            && status == 0
                            && key.starts_with("vmm --")
                            && !key.ends_with('&')
                            && !seen.insert(key.clone())
                        {
                            body[first] = format!(": already run above: {key}");
                        }
                        for l in first..=last {
                            declared.insert(
                                offset + l + 1,
                                (status, format!("{name}:{}", b.line + 1 + first)),
                            );
                        }
                    }
                    for line in &body {
                        session += line;
                        session.push('\n');
                    }
                }
                _ => {}
            }
        }
        if !session.is_empty() {
            eprintln!("docs-examples: {name}: running its shell examples");
            let how = How {
                dir: &dir,
                env: &env,
                taps: taps(name),
                net: true,
                type_poweroff: false,
                kill_background: kill_background(name),
                timeout,
            };
            let t0 = Instant::now();
            let (out, fails, done) = run_script(&session, &how);
            eprintln!("docs-examples: ... {:.0} s", t0.elapsed().as_secs_f64());
            if !done {
                failures.push(format!("{name}: timed out\n{}", tail(&out)));
            }
            for (status, line) in &fails {
                match declared.get(line) {
                    Some((want, _)) if want == status => {}
                    Some((want, at)) => failures.push(format!(
                        "{at}: exited {status}, the docs say {want}\n{}",
                        tail(&out)
                    )),
                    None => failures.push(format!(
                        "{name}: script line {line} (a background job if 0) exited {status}\n{}",
                        tail(&out)
                    )),
                }
            }
            let mut failed_lines: Vec<usize> = fails.iter().map(|f| f.1).collect();
            failed_lines.sort();
            let wanted: BTreeMap<&String, i32> = declared
                .values()
                .filter(|(status, _)| *status != 0)
                .map(|(status, at)| (at, *status))
                .collect();
            for (at, status) in wanted {
                let hit = declared
                    .iter()
                    .any(|(l, (_, a))| a == at && failed_lines.binary_search(l).is_ok());
                if !hit {
                    failures.push(format!("{at}: the docs say it exits {status}, it exited 0"));
                }
            }
            output += &out;
        }
        for want in expectations(name, host) {
            let ok = if let Some(l) = want.strip_prefix("line:") {
                output.lines().any(|x| x.trim_end_matches('\r') == l)
            } else if let Some(spec) = want.strip_prefix("file:") {
                let (f, needle) = spec.split_once(':').unwrap();
                std::fs::read(dir.join(f)).is_ok_and(|t| {
                    t.windows(needle.len().max(1))
                        .any(|w| needle.is_empty() || w == needle.as_bytes())
                })
            } else {
                output.contains(want)
            };
            if !ok {
                failures.push(format!(
                    "{name}: the examples did not give {want:?}\n{}",
                    tail(&output)
                ));
            }
        }
    }
    eprintln!(
        "asserting: the {ran} shell example commands of README.md and docs/ ran as the docs say"
    );
    assert!(
        ran >= 40 || only.is_some(),
        "only {ran} commands found: the extraction broke"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The last lines of an output, for a failure message.
fn tail(out: &str) -> String {
    let lines: Vec<&str> = out.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
