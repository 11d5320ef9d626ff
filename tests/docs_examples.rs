//! Every `vmm` and `vmm run` command line the README and docs/ show, parsed
//! with the real command-line parsers: a renamed or misspelt flag in an
//! example fails here instead of in a reader's terminal. (Synopsis lines,
//! with `[OPTIONAL]` parts, are not commands and are left out.)

use std::path::Path;

use clap::Parser;

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
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<_> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut checked = 0;
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for line in code_lines(&text) {
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
            let parsed = if w.get(1).map(String::as_str) == Some("run") {
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
    eprintln!("asserting: the {checked} vmm command lines in README.md and docs/ parse");
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
