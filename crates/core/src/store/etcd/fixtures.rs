//! The builders against `tests/fixtures/etcd/requests.json`, whose bodies
//! `tests/e2e/test_etcd_harness.py` sends to a real etcd.

use std::collections::BTreeSet;

use serde_json::Value;

use super::keys::{split_audio, Keys};
use super::request::{self, Compare, Op, Request, Txn};

const FIXTURES: &str = include_str!("../../../../../tests/fixtures/etcd/requests.json");

fn s<'a>(call: &'a Value, name: &str) -> &'a [u8] {
    call[name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} in {call}"))
        .as_bytes()
}

fn n(call: &Value, name: &str) -> i64 {
    call[name]
        .as_i64()
        .unwrap_or_else(|| panic!("{name} in {call}"))
}

fn lease(call: &Value) -> Option<i64> {
    call["lease"].as_i64()
}

/// An index entry of the fixture's own layout (the requests' shapes are what
/// is checked, not the store's key names).
fn pending(keys: &Keys, id: &str) -> Vec<u8> {
    format!("{}pending/{id}", keys.prefix()).into_bytes()
}

/// Writes a job with its audio parts and its pending entry, if the job is new.
fn store_job(keys: &Keys, id: &str, record: &[u8], audio: &[&[u8]], lease: i64) -> Txn {
    let mut txn = Txn::new()
        .when(Compare::absent(&keys.job(id)))
        .then(Op::put(&keys.job(id), record, Some(lease)));
    for (i, part) in audio.iter().enumerate() {
        txn = txn.then(Op::put(&keys.audio_part(id, i as u32), part, Some(lease)));
    }
    txn.then(Op::put(&pending(keys, id), b"", None))
}

/// Deletes a job and everything that goes with it, if it is still unchanged.
fn delete_job(keys: &Keys, id: &str, mod_revision: i64) -> Txn {
    Txn::new()
        .when(Compare::unchanged(&keys.job(id), mod_revision))
        .then(Op::delete(&keys.job(id)))
        .then(Op::delete_prefix(&keys.audio(id)))
        .then(Op::delete(&keys.claim(id)))
        .then(Op::delete(&pending(keys, id)))
}

fn build(call: &Value) -> Request {
    match call["fn"].as_str().unwrap() {
        "range" => request::range(s(call, "key")),
        "range_prefix" => request::range_prefix(s(call, "prefix"), n(call, "limit")),
        "range_prefix_after" => {
            request::range_prefix_after(s(call, "prefix"), s(call, "after"), n(call, "limit"))
        }
        "put" => request::put(s(call, "key"), s(call, "value"), lease(call)),
        "delete" => request::delete(s(call, "key")),
        "put_if_absent" => request::put_if_absent(s(call, "key"), s(call, "value"), lease(call)),
        "compare_and_put" => request::compare_and_put(
            s(call, "key"),
            n(call, "expected_mod_revision"),
            s(call, "value"),
            lease(call),
        ),
        "delete_if" => request::delete_if(s(call, "key"), n(call, "mod_revision")),
        "claim" => request::claim(s(call, "claim_key"), s(call, "owner"), n(call, "lease")),
        "lease_grant" => request::lease_grant(n(call, "ttl_s")),
        "lease_keepalive" => request::lease_keepalive(n(call, "id")),
        "lease_revoke" => request::lease_revoke(n(call, "id")),
        "txn_store_job" => {
            let keys = Keys::new(call["prefix"].as_str().unwrap());
            let audio: Vec<u8> = call["parts"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|p| p.as_str().unwrap().bytes())
                .collect();
            // The fixture's parts are 5 bytes each.
            let parts = split_audio(&audio, 5);
            let id = call["id"].as_str().unwrap();
            store_job(&keys, id, s(call, "record"), &parts, n(call, "lease")).request()
        }
        "txn_delete_job" => {
            let keys = Keys::new(call["prefix"].as_str().unwrap());
            delete_job(&keys, call["id"].as_str().unwrap(), n(call, "mod_revision")).request()
        }
        other => panic!("no builder for fixture call {other}"),
    }
}

#[test]
fn every_fixture_body_is_what_the_builder_makes() {
    let doc: Value = serde_json::from_str(FIXTURES).unwrap();
    let steps = doc["steps"].as_array().unwrap();
    let mut covered = BTreeSet::new();
    for step in steps {
        let name = step["name"].as_str().unwrap();
        let r = build(&step["call"]);
        assert_eq!(r.path, step["path"].as_str().unwrap(), "{name}");
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body, step["body"], "{name}");
        covered.insert(step["call"]["fn"].as_str().unwrap().to_string());
    }
    let all = [
        "range",
        "range_prefix",
        "range_prefix_after",
        "put",
        "delete",
        "put_if_absent",
        "compare_and_put",
        "delete_if",
        "claim",
        "lease_grant",
        "lease_keepalive",
        "lease_revoke",
        "txn_store_job",
        "txn_delete_job",
    ];
    let all: BTreeSet<String> = all.iter().map(|s| s.to_string()).collect();
    assert_eq!(covered, all);
}

#[test]
fn the_limits_are_the_configs_defaults() {
    use super::config::{parse_store_config, StoreConfig, PREFIX_MAX_BYTES};
    let doc: Value = serde_json::from_str(FIXTURES).unwrap();
    let limits = &doc["limits"];
    let v = serde_json::json!({"type": "etcd", "cluster": "etcd"});
    let StoreConfig::Etcd(c) = parse_store_config(Some(&v)).unwrap() else {
        panic!("not etcd")
    };
    assert_eq!(limits["max_value_bytes"].as_u64(), Some(c.max_value_bytes));
    assert_eq!(limits["part_bytes"].as_u64(), Some(c.part_bytes() as u64));
    assert_eq!(
        limits["prefix_max_bytes"].as_u64(),
        Some(PREFIX_MAX_BYTES as u64)
    );
}
