//! `ingot serve` with no arguments, in an empty working directory: it creates `./ingot-data` with
//! an 8 GiB volume `vol0` and serves it on 127.0.0.1:10809. This is the only test that uses port
//! 10809; nothing else may listen there while it runs.

use std::net::TcpListener;

use ingot_tests::*;

#[test]
fn serve_without_arguments_uses_the_embedded_default() {
    require_tool("nbdinfo");
    if let Err(e) = TcpListener::bind("127.0.0.1:10809") {
        panic!(
            "port 127.0.0.1:10809 is busy ({e}): this test runs `ingot serve` with its default \
             listener there; stop whatever listens on 10809 (`ss -ltnp 'sport = :10809'`) and rerun"
        );
    }
    let dir = TempDir::new("serve-default");
    let cwd = dir.join("cwd");
    std::fs::create_dir(&cwd).expect("mkdir cwd");
    let srv = Server::start(ServeOpts {
        pool: None,
        unix: None,
        tcp_port: None,
        default_listener: true,
        cwd: Some(cwd.clone()),
        extra_args: Vec::new(),
        env: Vec::new(),
    });
    assert!(
        srv.serving[0].contains("127.0.0.1:10809"),
        "the default listener is not 127.0.0.1:10809: {:?}",
        srv.serving
    );
    let data = cwd.join("ingot-data");
    assert!(
        data.join("dev0.img").is_file(),
        "ingot serve did not create ./ingot-data/dev0.img in its working directory"
    );
    assert_eq!(nbd_export_size("nbd://127.0.0.1:10809/vol0"), 8 * GIB);

    // The CLI's default pool is the same ./ingot-data, reached through the control socket.
    let out = run_stdout(ingot().args(["volume", "list", "--json"]).current_dir(&cwd));
    let v = parse_json(&out);
    let vols = v.as_array().expect("volume list --json is an array");
    assert_eq!(vols.len(), 1, "expected only vol0: {v}");
    assert_eq!(vols[0]["name"], "vol0");
    assert_eq!(vols[0]["size_bytes"], 8 * GIB);
    let s = parse_json(&run_stdout(
        ingot().args(["stats", "--json"]).current_dir(&cwd),
    ));
    let cap = s["capacity_bytes"].as_u64().expect("capacity_bytes");
    assert!(
        (15 * GIB..=16 * GIB).contains(&cap),
        "the default pool holds {cap} bytes, expected 16 GiB"
    );
    srv.stop();

    // A second start reuses the pool instead of creating another one.
    let srv = Server::start(ServeOpts {
        pool: None,
        unix: None,
        tcp_port: None,
        default_listener: true,
        cwd: Some(cwd.clone()),
        extra_args: Vec::new(),
        env: Vec::new(),
    });
    assert_eq!(nbd_export_size("nbd://127.0.0.1:10809/vol0"), 8 * GIB);
    srv.stop();
    let names: Vec<_> = std::fs::read_dir(&cwd)
        .expect("read cwd")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("ingot-data")],
        "ingot serve left other files in its working directory"
    );
}
