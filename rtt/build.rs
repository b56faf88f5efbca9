//! Builds the sock_ops program (`ebpf/program`) for the BPF target with the
//! nightly toolchain and bpf-linker, and leaves the object in `OUT_DIR` for
//! `include_bytes!`.
//!
//! When that toolchain is missing (see `scripts/setup-ebpf.sh`) the crate
//! still builds: an empty object is left instead and the reason is passed to
//! the code as `SWITCHYARD_RTT_EBPF_MISSING`, so the sidecar falls back to
//! TCP_INFO and says why. A toolchain that is present but fails to build the
//! program fails the build: that is a bug to see, not to hide.

use std::path::PathBuf;
use std::process::{Command, Stdio};

const OBJECT: &str = "switchyard-rtt-ebpf";
const TOOLCHAIN: &str = "nightly";

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let program_dir = manifest_dir.join("../ebpf/program");
    let common_dir = manifest_dir.join("../ebpf/common");
    for dir in [&program_dir, &common_dir] {
        for f in ["Cargo.toml", "src"] {
            println!("cargo:rerun-if-changed={}", dir.join(f).display());
        }
    }
    println!(
        "cargo:rerun-if-changed={}",
        program_dir.join("Cargo.lock").display()
    );
    println!("cargo:rerun-if-env-changed=SWITCHYARD_SKIP_EBPF");
    println!("cargo:rerun-if-env-changed=PATH");

    match missing_toolchain() {
        Some(reason) => {
            println!("cargo:warning=building without the eBPF RTT program: {reason}; run scripts/setup-ebpf.sh to build it");
            std::fs::write(out_dir.join(OBJECT), []).expect("writing the empty object marker");
            println!("cargo:rustc-env=SWITCHYARD_RTT_EBPF_MISSING={reason}");
            // scripts/setup-ebpf.sh installs bpf-linker last, into cargo's
            // bin directory: watching it makes the next build pick the
            // toolchain up without a clean.
            if let Some(bin) = cargo_bin_dir() {
                println!("cargo:rerun-if-changed={}", bin.display());
            }
        }
        None => {
            // aya-build runs `cargo build --package` in the current
            // directory; the program is its own workspace (excluded from
            // the root one), so that must be the program's directory.
            std::env::set_current_dir(&program_dir).expect("entering ebpf/program");
            // aya-build relays the inner cargo's stderr as build warnings;
            // without this every rebuild prints each crate it compiles.
            // Compiler diagnostics still come through (as JSON on stdout).
            std::env::set_var("CARGO_TERM_QUIET", "true");
            let root = program_dir.canonicalize().expect("ebpf/program exists");
            let package = aya_build::Package {
                name: "switchyard-rtt-ebpf",
                root_dir: root.to_str().expect("a UTF-8 path"),
                ..Default::default()
            };
            if let Err(e) =
                aya_build::build_ebpf([package], aya_build::Toolchain::Custom(TOOLCHAIN))
            {
                panic!("building the eBPF RTT program failed: {e:#}");
            }
            println!("cargo:rustc-env=SWITCHYARD_RTT_EBPF_MISSING=");
        }
    }
}

/// Why the program cannot be built here, if it cannot.
fn missing_toolchain() -> Option<String> {
    if std::env::var_os("SWITCHYARD_SKIP_EBPF").is_some_and(|v| v == "1") {
        return Some("SWITCHYARD_SKIP_EBPF=1".into());
    }
    let sysroot = match output("rustup", &["run", TOOLCHAIN, "rustc", "--print", "sysroot"]) {
        Some(s) => PathBuf::from(s.trim()),
        None => {
            return Some(format!(
                "no `{TOOLCHAIN}` toolchain (rustup run {TOOLCHAIN} rustc failed)"
            ))
        }
    };
    let core_src = sysroot.join("lib/rustlib/src/rust/library/core");
    if !core_src.is_dir() {
        return Some(format!(
            "the {TOOLCHAIN} toolchain has no rust-src component"
        ));
    }
    if output("bpf-linker", &["--version"]).is_none() {
        return Some("bpf-linker is not installed or does not run".into());
    }
    None
}

fn cargo_bin_dir() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let bin = home.join("bin");
    bin.is_dir().then_some(bin)
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
