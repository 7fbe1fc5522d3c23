//! The Debian package: `packaging/build-deb.sh --bin BINARY` packs the binary under test (no
//! rebuild), the package holds exactly the files it should with the right modes and control
//! fields, and it installs into a scratch root, runs from there, renders its man pages, keeps a
//! local edit of its conffile across a reinstall and a remove, and purges without a trace.
//!
//! The scratch root is `dpkg --root DIR` with a freshly made admin dir (DIR/var/lib/dpkg).
//! `--force-script-chrootless` runs the maintainer scripts on the host with DPKG_ROOT=DIR
//! instead of chrooting into DIR (which has no shell): the scripts take every path under
//! DPKG_ROOT and leave the running system's systemd alone when it is set, and deb-systemd-helper
//! keeps its state under DPKG_ROOT too. `--force-depends`: the scratch root has no libc6
//! package. As a user other than root, `--force-not-root` (the files then belong to that user).

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ingot_tests::*;

/// Files the package must hold besides the man pages, with their modes.
const FILES: &[(&str, u32)] = &[
    ("usr/bin/ingot", 0o755),
    ("lib/systemd/system/ingot.service", 0o644),
    ("etc/ingot/ingot.toml", 0o644),
    ("usr/share/doc/ingot/examples/ingot.toml", 0o644),
    ("usr/share/doc/ingot/copyright", 0o644),
    ("usr/share/doc/ingot/changelog.Debian.gz", 0o644),
    ("usr/share/lintian/overrides/ingot", 0o644),
    ("usr/share/bash-completion/completions/ingot", 0o644),
    ("usr/share/zsh/vendor-completions/_ingot", 0o644),
    ("usr/share/fish/vendor_completions.d/ingot.fish", 0o644),
];

/// Directories deb-systemd-helper leaves (empty) in a root after a purge; on a real system
/// they belong to systemd.
const HELPER_DIRS: &[&str] = &[
    "etc",
    "etc/systemd",
    "etc/systemd/system",
    "var/lib/systemd",
];

fn running_as_root() -> bool {
    // /proc/self belongs to the effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `dpkg` working on the scratch root `root`.
fn dpkg(root: &Path) -> Command {
    let mut c = Command::new(require_tool("dpkg"));
    c.arg(format!("--root={}", root.display())).args([
        "--force-script-chrootless",
        "--force-depends",
        "--log=/dev/null",
    ]);
    if !running_as_root() {
        c.arg("--force-not-root");
    }
    // dpkg wants ldconfig and start-stop-daemon on PATH, which a user's PATH may lack.
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/sbin:/sbin:{path}"));
    c
}

/// A fresh dpkg admin dir in `root`.
fn init_root(root: &Path) {
    let admin = root.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(d)).unwrap();
    }
    std::fs::write(admin.join("status"), "").unwrap();
    std::fs::write(admin.join("available"), "").unwrap();
}

/// Everything under `root` but the dpkg admin dir, relative to `root`.
fn tree(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, acc: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if rel == "var/lib/dpkg" {
                continue;
            }
            let is_dir = p.symlink_metadata().unwrap().is_dir();
            acc.insert(if is_dir { format!("{rel}/") } else { rel });
            if is_dir {
                walk(root, &p, acc);
            }
        }
    }
    let mut acc = BTreeSet::new();
    walk(root, root, &mut acc);
    acc
}

/// Render a gzipped man page with groff, failing on any warning; returns the text.
fn render_man_gz(page: &Path) -> String {
    let troff = run(Command::new(require_tool("gzip")).arg("-dc").arg(page)).stdout;
    let mut groff = Command::new(require_tool("groff"))
        .args(["-ww", "-mandoc", "-Tutf8"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start groff");
    groff.stdin.take().unwrap().write_all(&troff).unwrap();
    let out = groff.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{} does not render cleanly: {out:?}",
        page.display()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_deb_installs_runs_and_purges_in_a_scratch_root() {
    let dpkg_deb = require_tool("dpkg-deb");
    let bash = require_tool("bash");
    for tool in ["dpkg", "gzip", "strip", "groff"] {
        require_tool(tool);
    }
    let dir = TempDir::new("deb");
    let version = format!("{}-1", env!("CARGO_PKG_VERSION"));
    let arch = run_stdout(Command::new(require_tool("dpkg")).arg("--print-architecture"));
    let arch = arch.trim();

    // Build around the binary under test.
    let out_dir = dir.join("out");
    let script = workspace_root().join("packaging/build-deb.sh");
    let printed = run_stdout(
        Command::new(&bash)
            .arg(&script)
            .arg("--bin")
            .arg(ingot_bin())
            .arg("--out")
            .arg(&out_dir)
            .arg("--no-lintian"),
    );
    let deb = out_dir.join(format!("ingot_{version}_{arch}.deb"));
    assert_eq!(
        printed.trim(),
        deb.display().to_string(),
        "the script prints the .deb"
    );
    assert!(deb.is_file(), "{} was not written", deb.display());

    // Control fields and maintainer scripts.
    let info = run_stdout(Command::new(&dpkg_deb).arg("-I").arg(&deb));
    for field in [
        "Package: ingot".to_string(),
        format!("Version: {version}"),
        format!("Architecture: {arch}"),
        "Section: admin".into(),
        "Priority: optional".into(),
        "Maintainer: ".into(),
        "Installed-Size: ".into(),
        "Description: ".into(),
    ] {
        assert!(
            info.contains(&format!("\n {field}")),
            "no `{field}` in:\n{info}"
        );
    }
    let depends = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .unwrap_or_else(|| panic!("no Depends in:\n{info}"));
    assert!(depends.contains("libc6 (>= "), "Depends: {depends}");
    let control = dir.join("control");
    run(Command::new(&dpkg_deb).arg("-e").arg(&deb).arg(&control));
    assert_eq!(
        std::fs::read_to_string(control.join("conffiles")).unwrap(),
        "/etc/ingot/ingot.toml\n"
    );
    for s in ["postinst", "prerm", "postrm"] {
        let mode = std::fs::metadata(control.join(s)).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755, "DEBIAN/{s} mode {mode:o}");
    }

    // Contents: exactly the expected files (man pages: one per `ingot man --dir` page), owned by
    // root, 0755 directories and binary, 0644 otherwise.
    let pages_dir = dir.join("pages");
    run(ingot().arg("man").arg("--dir").arg(&pages_dir));
    let mut expected: BTreeSet<(String, u32)> =
        FILES.iter().map(|&(p, m)| (p.to_string(), m)).collect();
    for e in std::fs::read_dir(&pages_dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        expected.insert((format!("usr/share/man/man1/{name}.gz"), 0o644));
    }
    assert!(
        expected.len() > FILES.len() + 5,
        "too few man pages: {expected:?}"
    );
    let listing = run_stdout(Command::new(&dpkg_deb).arg("-c").arg(&deb));
    let mut files = BTreeSet::new();
    for line in listing.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (perms, owner, path) = (cols[0], cols[1], cols[5]);
        assert_eq!(owner, "root/root", "{line}");
        let path = path.trim_start_matches("./").trim_end_matches('/');
        match perms.as_bytes()[0] {
            b'd' => assert_eq!(perms, "drwxr-xr-x", "{line}"),
            b'-' => {
                let mode = if perms == "-rwxr-xr-x" {
                    0o755
                } else {
                    assert_eq!(perms, "-rw-r--r--", "{line}");
                    0o644
                };
                files.insert((path.to_string(), mode));
            }
            _ => panic!("not a file or a directory: {line}"),
        }
    }
    assert_eq!(files, expected, "the package's files");

    // Install into a scratch root.
    let root = dir.join("root");
    init_root(&root);
    run(dpkg(&root).arg("-i").arg(&deb));
    let as_root = running_as_root();
    for (path, mode) in &expected {
        let m = std::fs::symlink_metadata(root.join(path))
            .unwrap_or_else(|e| panic!("{path} is not installed: {e}"));
        assert!(m.is_file(), "{path} is not a file");
        assert_eq!(m.permissions().mode() & 0o7777, *mode, "{path}'s mode");
        if as_root {
            assert_eq!((m.uid(), m.gid()), (0, 0), "{path}'s owner");
        }
    }
    let state =
        std::fs::metadata(root.join("var/lib/ingot")).expect("postinst makes /var/lib/ingot");
    assert!(state.is_dir());
    assert_eq!(
        state.permissions().mode() & 0o7777,
        0o700,
        "/var/lib/ingot's mode"
    );

    // The installed binary runs; the installed config sets nothing.
    let installed = root.join("usr/bin/ingot");
    let help = run_stdout(Command::new(&installed).arg("--help"));
    assert!(help.contains("serve"), "--help: {help}");
    let v = run_stdout(Command::new(&installed).arg("--version"));
    assert!(
        v.starts_with(&format!("ingot {} (", env!("CARGO_PKG_VERSION"))),
        "--version: {v}"
    );
    let conf = root.join("etc/ingot/ingot.toml");
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(
        text.lines()
            .all(|l| l.trim().is_empty() || l.starts_with('#')),
        "/etc/ingot/ingot.toml must set nothing as installed:\n{text}"
    );
    let check = run_stdout(
        Command::new(&installed)
            .arg("config")
            .arg("check")
            .arg(&conf),
    );
    assert!(check.contains("(0 settings)"), "config check: {check}");
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/ingot.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/ingot serve --config /etc/ingot/ingot.toml"));

    // Man pages render; the bash completion loads.
    let man1 = root.join("usr/share/man/man1");
    for (path, _) in expected.iter().filter(|(p, _)| p.ends_with(".1.gz")) {
        let name = path.rsplit('/').next().unwrap().trim_end_matches(".1.gz");
        let text = render_man_gz(&man1.join(format!("{name}.1.gz")));
        assert!(
            text.contains(name),
            "{name}.1 does not name itself:\n{text}"
        );
    }
    let completion = root.join("usr/share/bash-completion/completions/ingot");
    run(Command::new(&bash).arg("-c").arg(format!(
        "source {} && complete -p ingot",
        completion.display()
    )));

    // A local edit of the conffile survives a reinstall and a remove; purge takes it.
    let edited = format!("{text}cache-size = \"1G\"\n");
    std::fs::write(&conf, &edited).unwrap();
    run(dpkg(&root).arg("-i").arg(&deb));
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        edited,
        "after a reinstall"
    );
    run(dpkg(&root).arg("--remove").arg("ingot"));
    assert!(!installed.exists(), "remove leaves the binary");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        edited,
        "after remove"
    );
    run(dpkg(&root).arg("--purge").arg("ingot"));
    let left = tree(&root);
    let allowed: BTreeSet<String> = ["var/", "var/lib/"]
        .into_iter()
        .map(String::from)
        .chain(HELPER_DIRS.iter().map(|d| format!("{d}/")))
        .collect();
    assert!(
        left.is_subset(&allowed),
        "purge left: {:?}",
        left.difference(&allowed).collect::<Vec<_>>()
    );
    let status = std::fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    assert!(
        !status.contains("Package: ingot"),
        "dpkg still knows ingot:\n{status}"
    );

    // A pool in /var/lib/ingot is the admin's data: purge keeps it and says so.
    run(dpkg(&root).arg("-i").arg(&deb));
    let pool_file: PathBuf = root.join("var/lib/ingot/ingot-data/pool.json");
    std::fs::create_dir_all(pool_file.parent().unwrap()).unwrap();
    std::fs::write(&pool_file, "{}").unwrap();
    let out = run(dpkg(&root).arg("--purge").arg("ingot"));
    assert!(pool_file.is_file(), "purge removed a pool");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds a pool"),
        "purge does not say it kept the pool: {out:?}"
    );
    assert!(!installed.exists() && !conf.exists());
}
