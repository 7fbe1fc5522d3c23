//! Login negotiation, PDU by PDU, without a connection.

use super::*;

fn req(flags: u8, itt: u32, keys: &[(&str, &str)]) -> Pdu {
    let mut b = Bhs::new(op::LOGIN_REQ, flags);
    b.0[0] |= 0x40;
    b.0[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
    b.set_itt(itt);
    b.set_u32(24, 5);
    let data = text::encode(keys);
    b.set_data_len(data.len());
    Pdu {
        bhs: b,
        ahs: vec![],
        data,
    }
}

fn chap_target() -> ChapConfig {
    ChapConfig {
        user: "alice".into(),
        secret: "secretsecret".into(),
        mutual: Some(("target".into(), "tsecrettsecret".into())),
    }
}

fn lookup_open(name: &str) -> TargetLookup {
    if name == "iqn.t" {
        TargetLookup::Found(None)
    } else {
        TargetLookup::Missing
    }
}

fn lookup_chap(_: &str) -> TargetLookup {
    TargetLookup::Found(Some(chap_target()))
}

fn keys(s: &Step) -> Vec<(String, String)> {
    text::parse(&s.data).unwrap()
}

fn get<'a>(k: &'a [(String, String)], name: &str) -> Option<&'a str> {
    k.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

#[test]
fn login_none_then_operational() {
    let mut l = Login::new(LoginConfig::default(), 7, 64);
    let s = l.step(
        &req(
            0x81,
            1,
            &[
                ("InitiatorName", "iqn.i"),
                ("TargetName", "iqn.t"),
                ("SessionType", "Normal"),
                ("AuthMethod", "None"),
            ],
        ),
        &lookup_open,
    );
    assert!(s.outcome.is_none());
    assert_eq!(s.bhs.0[1], 0x81);
    assert_eq!(get(&keys(&s), "AuthMethod"), Some("None"));
    let s = l.step(
        &req(
            0x87,
            1,
            &[
                ("HeaderDigest", "CRC32C,None"),
                ("DataDigest", "None"),
                ("MaxRecvDataSegmentLength", "65536"),
                ("MaxBurstLength", "16776192"),
                ("FirstBurstLength", "262144"),
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("MaxOutstandingR2T", "8"),
                ("ErrorRecoveryLevel", "2"),
                ("X-foo", "bar"),
            ],
        ),
        &lookup_open,
    );
    let k = keys(&s);
    assert_eq!(get(&k, "HeaderDigest"), Some("CRC32C"));
    assert_eq!(get(&k, "ErrorRecoveryLevel"), Some("0"));
    assert_eq!(get(&k, "X-foo"), Some("NotUnderstood"));
    assert_eq!(get(&k, "MaxOutstandingR2T"), Some("1"));
    match s.outcome {
        Some(Outcome::FullFeature(sess)) => {
            assert_eq!(sess.tsih, 7);
            assert!(sess.params.header_digest);
            assert!(!sess.params.initial_r2t);
            assert_eq!(sess.params.max_send_data, 65536);
            assert_eq!(sess.params.max_burst, OUR_MAX_BURST);
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(u16::from_be_bytes([s.bhs.0[14], s.bhs.0[15]]), 7);
}

#[test]
fn unknown_target_and_missing_name() {
    let mut l = Login::new(LoginConfig::default(), 1, 64);
    let s = l.step(
        &req(
            0x81,
            1,
            &[("InitiatorName", "iqn.i"), ("TargetName", "iqn.nope")],
        ),
        &lookup_open,
    );
    assert_eq!(s.outcome, Some(Outcome::Failed(status::NOT_FOUND)));
    let mut l = Login::new(LoginConfig::default(), 1, 64);
    let s = l.step(&req(0x81, 1, &[("TargetName", "iqn.t")]), &lookup_open);
    assert_eq!(s.outcome, Some(Outcome::Failed(status::MISSING_PARAMETER)));
}

fn chap_login(secret: &str, mutual: bool) -> (Step, Vec<u8>) {
    let mut l = Login::new(LoginConfig::default(), 1, 64);
    let s = l.step(
        &req(
            0x01,
            1,
            &[
                ("InitiatorName", "iqn.i"),
                ("TargetName", "iqn.t"),
                ("AuthMethod", "CHAP,None"),
            ],
        ),
        &lookup_chap,
    );
    assert_eq!(get(&keys(&s), "AuthMethod"), Some("CHAP"));
    let s = l.step(&req(0x01, 1, &[("CHAP_A", "7,5")]), &lookup_chap);
    let k = keys(&s);
    let id: u8 = get(&k, "CHAP_I").unwrap().parse().unwrap();
    let c = text::parse_binary(get(&k, "CHAP_C").unwrap()).unwrap();
    let r = text::hex(&chap_md5(id, secret.as_bytes(), &c));
    let my_c = vec![9u8; 16];
    let mut ks = vec![("CHAP_N", "alice".to_string()), ("CHAP_R", r)];
    if mutual {
        ks.push(("CHAP_I", "3".into()));
        ks.push(("CHAP_C", text::hex(&my_c)));
    }
    let ks: Vec<(&str, &str)> = ks.iter().map(|(k, v)| (*k, v.as_str())).collect();
    (l.step(&req(0x81, 1, &ks), &lookup_chap), my_c)
}

#[test]
fn chap_one_way_and_mutual() {
    let (s, _) = chap_login("secretsecret", false);
    assert!(s.outcome.is_none(), "{:?}", s.outcome);
    assert_eq!(s.bhs.0[1] & 0x80, 0x80);
    let (s, c) = chap_login("secretsecret", true);
    assert!(s.outcome.is_none());
    let k = keys(&s);
    assert_eq!(get(&k, "CHAP_N"), Some("target"));
    assert_eq!(
        text::parse_binary(get(&k, "CHAP_R").unwrap()).unwrap(),
        chap_md5(3, b"tsecrettsecret", &c)
    );
    let (s, _) = chap_login("wrong", false);
    assert_eq!(s.outcome, Some(Outcome::Failed(status::AUTH_FAILURE)));
}

#[test]
fn chap_required_refuses_none() {
    let mut l = Login::new(LoginConfig::default(), 1, 64);
    let s = l.step(
        &req(
            0x81,
            1,
            &[
                ("InitiatorName", "iqn.i"),
                ("TargetName", "iqn.t"),
                ("AuthMethod", "None"),
            ],
        ),
        &lookup_chap,
    );
    assert_eq!(s.outcome, Some(Outcome::Failed(status::AUTH_FAILURE)));
    // Skipping the security stage is refused too.
    let mut l = Login::new(LoginConfig::default(), 1, 64);
    let s = l.step(
        &req(
            0x87,
            1,
            &[("InitiatorName", "iqn.i"), ("TargetName", "iqn.t")],
        ),
        &lookup_chap,
    );
    assert_eq!(s.outcome, Some(Outcome::Failed(status::AUTH_FAILURE)));
}

fn lookup_mixed(name: &str) -> TargetLookup {
    match name {
        "iqn.open" => TargetLookup::Found(None),
        "iqn.t" => TargetLookup::Found(Some(chap_target())),
        _ => TargetLookup::Missing,
    }
}

/// A security stage with AuthMethod=None, then `second` as the operational stage's PDU.
fn switch(first: &[(&str, &str)], second: &[(&str, &str)]) -> Step {
    let mut l = Login::new(LoginConfig::default(), 1, 64);
    let s = l.step(&req(0x81, 1, first), &lookup_mixed);
    assert!(s.outcome.is_none(), "{:?}", s.outcome);
    assert_eq!(s.bhs.0[1] & 0x80, 0x80, "security stage did not end");
    l.step(&req(0x87, 1, second), &lookup_mixed)
}

#[test]
fn session_identity_cannot_change_after_the_first_pdu() {
    let disc = [
        ("InitiatorName", "iqn.i"),
        ("SessionType", "Discovery"),
        ("AuthMethod", "None"),
    ];
    let open = [
        ("InitiatorName", "iqn.i"),
        ("TargetName", "iqn.open"),
        ("AuthMethod", "None"),
    ];
    let refused = Some(Outcome::Failed(status::REDECLARED));
    // Discovery, then a normal session to a CHAP target.
    let s = switch(&disc, &[("SessionType", "Normal"), ("TargetName", "iqn.t")]);
    assert_eq!(s.outcome, refused);
    assert_eq!(s.bhs.0[1] & 0x83, 0, "no transit on a failure");
    assert_eq!(s.bhs.0[14..16], [0, 0], "no TSIH on a failure");
    // Discovery, then a TargetName alone.
    assert_eq!(switch(&disc, &[("TargetName", "iqn.t")]).outcome, refused);
    // An open target, then a protected one.
    assert_eq!(switch(&open, &[("TargetName", "iqn.t")]).outcome, refused);
    // Another initiator name, another session type.
    assert_eq!(
        switch(&open, &[("InitiatorName", "iqn.j")]).outcome,
        refused
    );
    assert_eq!(
        switch(&open, &[("SessionType", "Discovery")]).outcome,
        refused
    );
    // The same key twice in the first PDU with two values.
    let mut l = Login::new(LoginConfig::default(), 1, 64);
    let s = l.step(
        &req(
            0x81,
            1,
            &[
                ("InitiatorName", "iqn.i"),
                ("TargetName", "iqn.open"),
                ("TargetName", "iqn.t"),
                ("AuthMethod", "None"),
            ],
        ),
        &lookup_mixed,
    );
    assert_eq!(s.outcome, refused);
    // Repeating the first PDU's values is allowed.
    let s = switch(
        &open,
        &[
            ("InitiatorName", "iqn.i"),
            ("SessionType", "Normal"),
            ("TargetName", "iqn.open"),
        ],
    );
    assert!(
        matches!(s.outcome, Some(Outcome::FullFeature(_))),
        "{:?}",
        s.outcome
    );
    let s = switch(&disc, &[("SessionType", "Discovery")]);
    assert!(
        matches!(s.outcome, Some(Outcome::FullFeature(_))),
        "{:?}",
        s.outcome
    );
}

#[test]
fn full_feature_phase_rechecks_the_targets_authentication() {
    // The target had no CHAP when the login started and requires it by the end.
    let calls = std::cell::Cell::new(0);
    let lookup = |_: &str| {
        calls.set(calls.get() + 1);
        if calls.get() == 1 {
            TargetLookup::Found(None)
        } else {
            TargetLookup::Found(Some(chap_target()))
        }
    };
    let mut l = Login::new(LoginConfig::default(), 1, 64);
    let s = l.step(
        &req(
            0x81,
            1,
            &[
                ("InitiatorName", "iqn.i"),
                ("TargetName", "iqn.t"),
                ("AuthMethod", "None"),
            ],
        ),
        &lookup,
    );
    assert!(s.outcome.is_none());
    let s = l.step(&req(0x87, 1, &[]), &lookup);
    assert_eq!(s.outcome, Some(Outcome::Failed(status::AUTH_FAILURE)));
    // After CHAP, the session records who authenticated.
    let (s, _) = chap_login("secretsecret", false);
    assert!(s.outcome.is_none());
}

#[test]
fn refuse_turns_success_into_failure() {
    let mut l = Login::new(LoginConfig::default(), 9, 64);
    let mut s = l.step(
        &req(
            0x87,
            1,
            &[("InitiatorName", "iqn.i"), ("TargetName", "iqn.open")],
        ),
        &lookup_mixed,
    );
    assert!(matches!(s.outcome, Some(Outcome::FullFeature(_))));
    Login::refuse(&mut s, status::OUT_OF_RESOURCES);
    assert_eq!(s.outcome, Some(Outcome::Failed(status::OUT_OF_RESOURCES)));
    assert_eq!(s.bhs.0[1] & 0x83, 0);
    assert_eq!(s.bhs.0[14..16], [0, 0]);
    assert_eq!(s.bhs.0[36..38], [3, 2]);
    assert!(s.data.is_empty());
}
