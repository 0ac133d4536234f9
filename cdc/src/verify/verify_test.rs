//! The pure parts of `raftcache-cdc verify`: classification, nines, percentiles, the
//! report and its text, sampling, the `verify-value` option.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::config::Config;

fn b(s: &str) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(s.as_bytes()))
}

#[test]
fn verify_classify() {
    assert_eq!(classify(None, &[b("x")]), Verdict::Absent);
    assert_eq!(classify(None, &[]), Verdict::Absent);
    assert_eq!(classify(Some(b"x"), &[b("x")]), Verdict::Equal);
    assert_eq!(classify(Some(b"x"), &[b("y")]), Verdict::Differs);
    // Several rows derive the key: any of them will do.
    assert_eq!(classify(Some(b"x"), &[b("y"), b("x")]), Verdict::Equal);
    // No row derives it, or the row's expected value is NULL: it should be absent.
    assert_eq!(classify(Some(b"x"), &[]), Verdict::Differs);
    assert_eq!(classify(Some(b"x"), &[None]), Verdict::Differs);
    assert_eq!(classify(Some(b""), &[b("")]), Verdict::Equal);
}

#[test]
fn verify_nines() {
    let n = |checked, stale| nines(checked, stale).map(|n| (n.nines, n.at_least));
    assert_eq!(n(0, 0), None);
    assert_eq!(n(10_000, 0), Some((4, true)));
    assert_eq!(n(9_999, 0), Some((3, true)));
    assert_eq!(n(1, 0), Some((0, true)));
    assert_eq!(n(9, 0), Some((0, true)));
    // floor(-log10(stale/checked)), exact at powers of ten.
    assert_eq!(n(1000, 1), Some((3, false)));
    assert_eq!(n(10_000, 1), Some((4, false)));
    assert_eq!(n(10_000, 2), Some((3, false)));
    assert_eq!(n(10_000, 10), Some((3, false)));
    assert_eq!(n(10_000, 11), Some((2, false)));
    assert_eq!(n(10, 10), Some((0, false)));
    assert_eq!(n(10, 2), Some((0, false)));
    assert_eq!(n(u64::MAX, 1), Some((19, false)));
    assert_eq!(n(u64::MAX, 0), Some((19, true)));
}

#[test]
fn verify_agreement_sentence() {
    let s = Duration::from_secs(1);
    assert_eq!(
        agreement(10_000, 0, s),
        "≥ 4 nines (0 of 10000 stale beyond 1s)"
    );
    assert_eq!(agreement(1000, 1, s), "3 nines (1 of 1000 stale beyond 1s)");
    assert_eq!(
        agreement(20, 1, Duration::from_millis(500)),
        "1 nine (1 of 20 stale beyond 500ms)"
    );
    assert_eq!(agreement(0, 0, s), "no keys checked");
}

#[test]
fn verify_spread_is_nearest_rank() {
    assert_eq!(spread(&[]), None);
    let ms = Duration::from_millis;
    let one = spread(&[ms(7)]).unwrap();
    assert_eq!(
        (one.count, one.p50_ms, one.p99_ms, one.max_ms),
        (1, 7.0, 7.0, 7.0)
    );
    // 1..=100 ms, shuffled: p50 = 50, p99 = 99, max = 100.
    let mut v: Vec<Duration> = (1..=100).map(ms).collect();
    v.reverse();
    v.swap(3, 70);
    let s = spread(&v).unwrap();
    assert_eq!(
        (s.count, s.p50_ms, s.p99_ms, s.max_ms),
        (100, 50.0, 99.0, 100.0)
    );
    let s = spread(&[ms(1), ms(2), ms(3)]).unwrap();
    assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (2.0, 3.0, 3.0));
}

#[test]
fn verify_prefix_cuts_on_characters() {
    assert_eq!(prefix(b"short"), "short");
    let long = "é".repeat(VALUE_PREFIX_CHARS + 5);
    let p = prefix(long.as_bytes());
    assert_eq!(p.chars().count(), VALUE_PREFIX_CHARS + 1);
    assert!(p.ends_with('…'));
    assert_eq!(prefix(&[0xff, b'a']), "\u{fffd}a");
}

fn stale(key: &str) -> KeyOutcome {
    KeyOutcome::Stale(Box::new(StaleKey {
        key: key.into(),
        table: "public.users".into(),
        cached: Some("wrong".into()),
        expected: Some("{\"id\":\"5\"}".into()),
        row_lsn: Some(Lsn(0x16_B374_D848)),
        reason: "the value differs".into(),
    }))
}

#[test]
fn verify_tally_and_report() {
    let tables = [
        ("public.users".to_owned(), expectation(false)),
        ("public.items".to_owned(), expectation(true)),
    ];
    let mut t = Tally::new(Scope::All, Duration::from_secs(1), &tables);
    t.rows(0, 3);
    t.rows(1, 2);
    t.record(0, KeyOutcome::Equal);
    t.record(0, KeyOutcome::Absent);
    t.record(0, stale("user:5"));
    t.record(1, KeyOutcome::Equal);
    t.record(1, KeyOutcome::Converged(Duration::from_millis(12)));
    assert_eq!(t.counts().checked, 5);
    let r = t.finish(42, Duration::from_millis(1500), false);
    assert_eq!(
        r.counts,
        Counts {
            checked: 5,
            equal: 2,
            absent: 1,
            converged: 1,
            stale: 1
        }
    );
    assert_eq!(r.tables[0].counts.stale, 1);
    assert_eq!(r.tables[1].counts.converged, 1);
    assert_eq!(r.tables[1].rows, 2);
    assert_eq!(r.nines, Some(0));
    assert!(!r.nines_at_least);
    assert_eq!(r.exit_code(), 1);
    assert_eq!(r.convergence.as_ref().unwrap().max_ms, 12.0);

    let text = r.text();
    assert!(
        text.contains("checked 5 keys: 2 equal, 1 absent, 1 converged, 1 stale"),
        "{text}"
    );
    assert!(
        text.contains("agreement: 0 nines (1 of 5 stale beyond 1s)"),
        "{text}"
    );
    assert!(text.contains("  user:5  (public.users)"), "{text}");
    assert!(text.contains("cached    \"wrong\""), "{text}");
    assert!(text.contains("row lsn   16/B374D848"), "{text}");
    assert!(text.contains("p50 12.0ms"), "{text}");

    let json: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(json["checked"], 5);
    assert_eq!(json["stale"], 1);
    assert_eq!(json["scope"], "all");
    assert_eq!(json["stale_keys"][0]["key"], "user:5");
    assert_eq!(json["stale_keys"][0]["row_lsn"], "16/B374D848");
    assert_eq!(json["tables"][1]["converged"], 1);
    assert!(json.get("convergence_times").is_none());
    assert_eq!(json["tables"][0]["expected"], "json");
    assert_eq!(json["tables"][1]["expected"], "verify-value");
    assert!(text.contains("stale  (vs the row as JSON)"), "{text}");
    assert!(text.contains("stale  (vs verify-value)"), "{text}");
}

#[test]
fn verify_clean_report_and_listing_cap() {
    let tables = [("t".to_owned(), expectation(false))];
    let mut t = Tally::new(Scope::Sample(1000), Duration::from_secs(1), &tables);
    for _ in 0..10_000 {
        t.record(0, KeyOutcome::Equal);
    }
    let r = t.finish(3, Duration::from_millis(10), true);
    assert_eq!(
        (r.nines, r.nines_at_least, r.exit_code()),
        (Some(4), true, 0)
    );
    assert_eq!(r.agreement, "≥ 4 nines (0 of 10000 stale beyond 1s)");
    assert!(r.text().contains("stopped at --max-time"));
    assert!(r.text().contains("sample of 1000 rows per table"));

    let mut t = Tally::new(Scope::All, Duration::from_secs(1), &tables);
    for i in 0..MAX_STALE_LISTED + 5 {
        t.record(0, stale(&format!("k{i}")));
    }
    let r = t.finish(0, Duration::ZERO, false);
    assert_eq!(r.stale_keys.len(), MAX_STALE_LISTED);
    assert_eq!(r.stale_keys_omitted, 5);
    assert_eq!(r.counts.stale, MAX_STALE_LISTED as u64 + 5);
    assert!(r.text().contains("… and 5 more"));
}

#[test]
fn verify_sampling_clause() {
    assert_eq!(sample_clause(-1.0, 1000), "");
    assert_eq!(sample_clause(50_000.0, 1000), "");
    assert_eq!(sample_clause(200_000.0, 100_000), "");
    assert_eq!(
        sample_clause(10_000_000.0, 1000),
        " TABLESAMPLE SYSTEM (0.0400)"
    );
    assert_eq!(sample_clause(f64::NAN, 1000), "");
}

#[test]
fn verify_select_list_uses_the_output_function() {
    let list = select_list(&["id".into(), "we\"ird".into()], Some("t.v"), true).unwrap();
    assert!(list.contains("format('%s', t.\"id\")"), "{list}");
    assert!(list.contains("num_nulls(t.\"we\"\"ird\") = 1"), "{list}");
    assert!(list.contains("((t.v))::text AS verify_value"), "{list}");
    assert!(list.ends_with("t.ctid::text AS cursor_tid"), "{list}");
}

#[test]
fn verify_options_are_checked() {
    assert!(Options::default().validate().is_ok());
    for bad in [
        Options {
            scope: Scope::Sample(0),
            ..Options::default()
        },
        Options {
            page_size: 0,
            ..Options::default()
        },
        Options {
            rate: 0.0,
            ..Options::default()
        },
        Options {
            rate: f64::NAN,
            ..Options::default()
        },
        Options {
            bound: Duration::ZERO,
            ..Options::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

const MIN: &str = r#"
    [postgres]
    url = "postgres://app:secret@127.0.0.1:5432/app"
    [cache]
    endpoints = ["127.0.0.1:7001"]
"#;

#[test]
fn verify_value_option() {
    let c = Config::parse(&format!(
        "{MIN}\n[[table]]\nname = \"items\"\nkeys = [\"item:{{id}}\"]\nverify-value = \"v::text\""
    ))
    .unwrap();
    assert_eq!(c.table[0].verify_value.as_deref(), Some("v::text"));
    let c = Config::parse(&format!(
        "{MIN}\n[[table]]\nname = \"items\"\nkeys = [\"item:{{id}}\"]\nmode = \"update\""
    ))
    .unwrap();
    assert_eq!(c.table[0].verify_value, None);
    for empty in ["\"\"", "\"  \""] {
        let e = Config::parse(&format!(
            "{MIN}\n[[table]]\nname = \"items\"\nkeys = [\"item:{{id}}\"]\nverify-value = {empty}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("table[0].verify-value") && e.contains("must not be empty"),
            "{e}"
        );
    }
    let e = Config::parse(&format!(
        "{MIN}\n[[table]]\nname = \"items\"\nkeys = [\"item:{{id}}\"]\nverify_value = \"v\""
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown field"), "{e}");
}

/// The example file documents `verify-value` in a comment; uncommented, it parses.
#[test]
fn verify_value_in_the_example_parses() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/cdc.example.toml");
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains("\n# verify-value = "), "documented");
    let c = Config::parse(&text.replace("\n# verify-value = ", "\nverify-value = ")).unwrap();
    assert!(c.table[0].verify_value.is_some());
    assert!(c.mappings().is_ok());
}

/// The expected value is what the worker writes for an insert in update mode, or the
/// verify value; one entry per key the row derives.
#[test]
fn verify_expected_value_is_the_workers_encoding() {
    let c = Config::parse(&format!(
        "{MIN}\n[[table]]\nname = \"users\"\nkeys = [\"user:{{id}}\", \"by_email:{{email}}\"]\n"
    ))
    .unwrap();
    let map = c.mappings().unwrap().remove(0);
    let columns: Vec<String> = vec!["id".into(), "email".into(), "ok".into()];
    let shape = Shape::new(&map, columns.clone(), false);
    let row = Fetched {
        values: vec![Some("5".into()), Some("a@x".into()), Some("t".into())],
        verify: None,
        cursor: vec!["5".into()],
    };
    let entries = shape.entries(&row);
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].key.as_ref(), b"user:5");
    assert_eq!(entries[0].params, ["5"]);
    assert_eq!(entries[1].key.as_ref(), b"by_email:a@x");
    assert_eq!(
        (entries[1].template, entries[1].params.as_slice()),
        (1, &["a@x".to_owned()][..])
    );
    // The worker's own encoding of the row, byte for byte.
    let mut update = map.clone();
    update.mode = Mode::Update;
    let cells = Row::new([
        ("id", Cell::Text(b"5")),
        ("email", Cell::Text(b"a@x")),
        ("ok", Cell::Text(b"t")),
    ]);
    let KeyChange::Put(_, written) = &update.on_insert(&cells)[0] else {
        panic!("update mode writes")
    };
    assert_eq!(entries[0].expected, [Some(written.clone())]);
    let json: serde_json::Value =
        serde_json::from_slice(entries[0].expected[0].as_ref().unwrap()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"id": "5", "email": "a@x", "ok": "t"})
    );

    // NULL email: no by_email key; NULL stays null in the JSON.
    let row = Fetched {
        values: vec![Some("6".into()), None, None],
        verify: None,
        cursor: vec!["6".into()],
    };
    let entries = shape.entries(&row);
    assert_eq!(entries.len(), 1);
    let json: serde_json::Value =
        serde_json::from_slice(entries[0].expected[0].as_ref().unwrap()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"id": "6", "email": null, "ok": null})
    );

    // With verify-value: its text, or NULL (the key should be absent).
    let shape = Shape::new(&map, columns, true);
    let row = Fetched {
        values: vec![Some("7".into()), Some("b@x".into()), None],
        verify: Some("seven".into()),
        cursor: vec!["7".into()],
    };
    let entries = shape.entries(&row);
    assert_eq!(entries[0].expected, [b("seven")]);
    let row = Fetched {
        verify: None,
        ..row
    };
    assert_eq!(shape.entries(&row)[1].expected, [None]);
}

#[test]
fn verify_update_mode_columns_option_is_honoured() {
    let c = Config::parse(&format!(
        "{MIN}\n[[table]]\nname = \"p\"\nkeys = [\"p:{{id}}\"]\nmode = \"update\"\ncolumns = [\"id\", \"bio\"]\n"
    ))
    .unwrap();
    let map = c.mappings().unwrap().remove(0);
    let shape = Shape::new(
        &map,
        vec!["id".into(), "bio".into(), "secret".into()],
        false,
    );
    let row = Fetched {
        values: vec![Some("1".into()), Some("hi".into()), Some("pw".into())],
        verify: None,
        cursor: vec!["1".into()],
    };
    let e = shape.entries(&row);
    let json: serde_json::Value =
        serde_json::from_slice(e[0].expected[0].as_ref().unwrap()).unwrap();
    assert_eq!(json, serde_json::json!({"id": "1", "bio": "hi"}));
}
