//! `vmm snapshot`: offline work on snapshot files. `vmm snapshot rebase`
//! merges a Diff snapshot's memory file onto its base (as Firecracker's
//! snapshot-editor `edit-memory rebase` does), so that the base restores with
//! the Diff's state file; applied in the order they were taken, a chain of
//! Diffs merges likewise.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Offline tools for snapshot files.
#[derive(Debug, Parser)]
#[command(name = "vmm snapshot", disable_version_flag = true)]
struct SnapshotCli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Copies the pages of a Diff memory file over its base memory file (in
    /// place): the base then restores with the Diff's state file.
    Rebase {
        /// The base memory file: the Full snapshot's, or one a previous Diff
        /// was merged onto. Changed in place.
        #[arg(long, value_name = "PATH")]
        base_mem: PathBuf,
        /// The Diff snapshot's memory file (taken after the base).
        #[arg(long, value_name = "PATH")]
        diff_mem: PathBuf,
    },
}

/// Whether `vmm snapshot ARGS` parses (clap's message if not).
pub fn check_args(args: Vec<String>) -> Result<(), String> {
    SnapshotCli::try_parse_from(std::iter::once("vmm snapshot".to_string()).chain(args))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Runs `vmm snapshot ARGS` and exits.
pub fn main(args: Vec<String>) -> ! {
    let cli = match SnapshotCli::try_parse_from(
        std::iter::once("vmm snapshot".to_string()).chain(args),
    ) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                std::process::exit(if e.kind() == ErrorKind::DisplayHelp {
                    0
                } else {
                    crate::EXIT_USAGE
                });
            }
            eprintln!(
                "vmm snapshot: error: {}",
                crate::cli::one_line_error(&e, "vmm snapshot")
            );
            std::process::exit(crate::EXIT_USAGE);
        }
    };
    match cli.command {
        Command::Rebase { base_mem, diff_mem } => match super::diff::rebase(&base_mem, &diff_mem) {
            Ok(n) => {
                println!(
                    "merged {n} bytes of '{}' onto '{}'",
                    diff_mem.display(),
                    base_mem.display()
                );
                std::process::exit(0)
            }
            Err(e) => {
                eprintln!("vmm snapshot rebase: error: {e}");
                std::process::exit(1)
            }
        },
    }
}
