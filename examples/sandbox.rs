//! Embedding vmm as a sandbox for untrusted code: start a fresh microVM (a
//! clone of the default guest, restored in milliseconds once the first run
//! has booted and saved it), run commands in it, throw it away.
//!
//!     cargo build --workspace && cargo run --example sandbox -- 'echo $((6 * 7))'

use vmm::run::{ExecRequest, Sandbox, SandboxConfig};

fn main() {
    let script = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "echo hello from $(uname -n); exit 3".to_string());
    let mut sandbox = Sandbox::start(&SandboxConfig::default()).unwrap_or_else(|e| {
        eprintln!("sandbox: {e}");
        std::process::exit(1)
    });
    // One command with its output collected...
    match sandbox.output(&["sh", "-c", &script]) {
        Ok((out, err, status)) => {
            print!("{}", String::from_utf8_lossy(&out));
            eprint!("{}", String::from_utf8_lossy(&err));
            println!("(exit status {})", status.shell_code());
        }
        Err(e) => eprintln!("sandbox: {e}"),
    }
    // ... and one streamed, with stdin: the sandbox keeps its files between
    // commands until it is dropped.
    let req = ExecRequest::new(["sh", "-c", "cat > /tmp/in && wc -c < /tmp/in"]).with_stdin(true);
    let input = std::io::Cursor::new(b"twelve bytes".to_vec());
    if let Err(e) = sandbox.exec(&req, input, std::io::stdout(), std::io::stderr()) {
        eprintln!("sandbox: {e}");
    }
}
