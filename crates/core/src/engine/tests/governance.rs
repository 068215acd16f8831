//! Governance per key on the simulated host: refusals and their headers,
//! windows, characters given back, money charged at the serving model's
//! price, usage, fair dispatch, running caps, and exact counts when workers
//! race.

use std::cell::RefCell;
use std::rc::Rc;

use super::world::{json, keys, speech, Reply, World, ETCD, KEY, KEY_B, SHARED};
use crate::engine::Report;

fn header<'a>(answer: &'a crate::api::Answer, name: &str) -> Option<&'a str> {
    answer
        .headers
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.as_str())
}

fn error_type(answer: &crate::api::Answer) -> String {
    json(&answer.body)["error"]["type"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Worlds of both stores with these keys' settings.
fn worlds(a: &str, b: &str, extra: &str) -> Vec<World> {
    let extra = format!("{}{extra}", keys(a, b));
    vec![
        World::new(SHARED, &extra, 1, 2),
        World::new(ETCD, &extra, 2, 1),
    ]
}

#[test]
fn every_refusal_in_order_with_its_status_type_and_headers() {
    let limits = r#","limits":{"max_held_jobs":3,"requests":{"max":2,"per":"1h"},"characters":{"max":10,"per":"1d"}}"#;
    for w in worlds(limits, r#","expires_at":"2020-01-01T00:00:00Z""#, "") {
        let ok = w.submit_as(0, KEY, &speech(""));
        assert_eq!(ok.status, 202);
        assert_eq!(
            header(&ok, "ratelimit-policy"),
            Some(r#""requests";q=2;w=3600, "characters";q=10;w=86400"#)
        );
        assert!(header(&ok, "ratelimit")
            .unwrap()
            .starts_with(r#""requests";r=1;t="#));
        let long = speech("").replace("\"hi\"", "\"123456789\"");
        let chars = w.submit_as(0, KEY, &long);
        assert_eq!(
            (chars.status, error_type(&chars)),
            (429, "character_limit_exceeded".into())
        );
        assert!(header(&chars, "retry-after").is_some());
        assert!(
            header(&chars, "ratelimit")
                .unwrap()
                .contains(r#""characters";r=8;"#),
            "nothing counted"
        );
        assert_eq!(w.submit_as(0, KEY, &speech("")).status, 202);
        let requests = w.submit_as(0, KEY, &speech(""));
        assert_eq!(
            (requests.status, error_type(&requests)),
            (429, "request_limit_exceeded".into())
        );
        let blocked = w.submit_as(0, KEY_B, &speech(""));
        assert_eq!(
            (blocked.status, error_type(&blocked)),
            (403, "virtual_key_blocked".into())
        );
        assert_eq!(
            header(&blocked, "ratelimit"),
            None,
            "403s carry no RateLimit fields"
        );
        let bad = w.submit_as(0, KEY, &speech(r#","speed":9"#));
        assert_eq!(bad.status, 400, "a bad request is 400 before any limit");
        assert_eq!(w.count(|r| matches!(r, Report::Submitted { .. })), 2);
    }
}

#[test]
fn held_jobs_and_models_are_checked_in_order() {
    let a = r#","allowed_models":["a/*"],"limits":{"max_held_jobs":1}"#;
    for w in worlds(a, "", "") {
        let other = w.submit_as(0, KEY, &speech(r#","fallbacks":["b/n"]"#));
        assert_eq!(
            (other.status, error_type(&other)),
            (403, "model_blocked".into())
        );
        assert_eq!(json(&other.body)["error"]["param"], "fallbacks[0]");
        assert_eq!(w.submit_as(0, KEY, &speech("")).status, 202);
        let held = w.submit_as(1, KEY, &speech(""));
        assert_eq!(
            (held.status, error_type(&held)),
            (429, "held_jobs_limit_exceeded".into())
        );
        assert_eq!(header(&held, "retry-after"), Some("1"));
        assert_eq!(
            w.submit_as(1, KEY_B, &speech("")).status,
            202,
            "another key is not held back"
        );
    }
}

#[test]
fn a_window_rolls_over_to_zero_without_a_sweep() {
    for mut w in worlds(r#","limits":{"requests":{"max":1,"per":"2s"}}"#, "", "") {
        assert_eq!(w.submit_as(0, KEY, &speech("")).status, 202);
        assert_eq!(w.submit_as(0, KEY, &speech("")).status, 429);
        w.run_for(2_000);
        assert_eq!(w.submit_as(0, KEY, &speech("")).status, 202);
    }
}

#[test]
fn characters_come_back_when_a_job_fails_and_money_is_charged_at_the_served_price() {
    let a = r#","limits":{"characters":{"max":5,"per":"1d"},"budget":{"max_usd":1.0,"per":"1M"}}"#;
    let pricing = r#","pricing":{"a/*":1000000.0,"b/n":100000.0}"#;
    for mut w in worlds(a, "", pricing) {
        w.set_provider(|c| match c.cluster.as_str() {
            "ca" => Reply::Status(500, b"{}".to_vec()),
            _ => Reply::Audio(b"AUDIO".to_vec()),
        });
        // Fails on a, and has no fallback: its 2 characters come back.
        let id = json(&w.submit_as(0, KEY, &speech("")).body)["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(w.wait(&id, 3_000)["status"], "failed");
        let usage = json(&w.request(0, "GET", "/v1/async/usage", None).body);
        assert_eq!(usage["limits"]["characters"]["used"], 0, "{usage}");
        // Fails on a, completes on b: charged at b's price (2 chars at $0.1 each).
        let body = speech(r#","fallbacks":["b/n"]"#);
        let id = json(&w.submit_as(0, KEY, &body).body)["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(w.wait(&id, 3_000)["status"], "completed");
        let usage = json(&w.request(0, "GET", "/v1/async/usage", None).body);
        assert_eq!(usage["limits"]["characters"]["used"], 2);
        assert_eq!(usage["limits"]["budget"]["spent_usd"], 0.2);
        assert_eq!(usage["held_jobs"], 2);
        assert_eq!(usage["running_jobs"], 0);
    }
}

#[test]
fn a_spent_budget_refuses_with_402_until_the_window_ends() {
    let a = r#","limits":{"budget":{"max_usd":0.1,"per":"1d"}}"#;
    for mut w in worlds(a, "", r#","pricing":{"a/m":100000.0}"#) {
        let id = w.submit(0, &speech(""));
        w.wait(&id, 3_000);
        let refused = w.submit_as(0, KEY, &speech(""));
        assert_eq!(
            (refused.status, error_type(&refused)),
            (402, "budget_exceeded".into())
        );
        assert!(header(&refused, "ratelimit")
            .unwrap()
            .contains(r#""budget";r=0;"#));
        assert_eq!(w.submit_as(0, KEY_B, &speech("")).status, 202);
    }
}

#[test]
fn usage_is_the_callers_own() {
    for w in worlds(r#","limits":{"requests":{"max":9,"per":"1m"}}"#, "", "") {
        w.submit_as(0, KEY_B, &speech(""));
        w.submit_as(0, KEY_B, &speech(""));
        w.submit_as(0, KEY, &speech(""));
        let mine = json(&w.request(1, "GET", "/v1/async/usage", None).body);
        assert_eq!(mine["virtual_key"], "team-a");
        assert_eq!(mine["held_jobs"], 1);
        assert_eq!(mine["limits"]["requests"]["used"], 1);
        let theirs = json(
            &w.request_with(1, "GET", "/v1/async/usage", None, &[("key", KEY_B)])
                .body,
        );
        assert_eq!(
            (theirs["virtual_key"].as_str(), theirs["held_jobs"].as_u64()),
            (Some("team-b"), Some(2))
        );
        assert_eq!(theirs["limits"], serde_json::json!({}));
    }
}

#[test]
fn a_backlog_of_one_key_never_holds_back_another() {
    for mut w in worlds("", "", r#","max_in_flight":2,"max_jobs":1000"#) {
        w.set_provider(|_| Reply::After(1_000, Box::new(Reply::Audio(b"x".to_vec()))));
        for i in 0..200 {
            assert_eq!(w.submit_as(i % 2, KEY, &speech("")).status, 202);
        }
        w.run_for(2_000);
        let before = w.provider_calls.borrow().len();
        let b: Vec<String> = (0..5)
            .map(|_| {
                json(&w.submit_as(0, KEY_B, &speech(r#","voice":"b""#)).body)["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let took = w.run_until(30_000, |w| {
            b.iter().all(|id| w.status_as(KEY_B, id) == "completed")
        });
        if took.is_none() {
            for id in &b {
                let path = format!("/v1/async/audio/speech/{id}");
                let a = w.request_with(0, "GET", &path, None, &[("key", KEY_B)]);
                eprintln!("{}", String::from_utf8_lossy(&a.body));
            }
            for r in w.reports.borrow().iter() {
                let text = format!("{r:?}");
                if b.iter().any(|id| text.contains(id.as_str())) {
                    eprintln!("{text}");
                }
            }
        }
        assert!(
            took.is_some(),
            "{:?} after {} calls",
            b.iter()
                .map(|id| w.status_as(KEY_B, id))
                .collect::<Vec<_>>(),
            w.provider_calls.borrow().len()
        );
        let calls = w.provider_calls.borrow();
        let after: Vec<bool> = calls[before..]
            .iter()
            .map(|c| json(&c.body)["voice"] == "b")
            .collect();
        // Lanes in turn: B's five calls are among the first ten made after it submitted.
        let first_ten = after.iter().take(10).filter(|b| **b).count();
        assert_eq!(first_ten, 5, "{after:?}");
        assert!(took.unwrap() <= 5_000, "B's jobs took {} ms", took.unwrap());
    }
}

#[test]
fn max_running_jobs_caps_a_key_and_the_rest_wait_pending() {
    let a = r#","limits":{"max_running_jobs":2}"#;
    for mut w in worlds(a, "", r#","max_in_flight":8"#) {
        let open = Rc::new(RefCell::new((0usize, 0usize)));
        let seen = open.clone();
        w.set_provider(move |_| {
            let mut o = seen.borrow_mut();
            o.0 += 1;
            Reply::After(3_000, Box::new(Reply::Audio(b"x".to_vec())))
        });
        let ids: Vec<String> = (0..6).map(|_| w.submit(0, &speech(""))).collect();
        w.run_for(1_500);
        assert_eq!(w.provider_calls.borrow().len(), 2, "two at once");
        let statuses: Vec<String> = ids.iter().map(|id| w.status(id)).collect();
        assert_eq!(
            statuses.iter().filter(|s| *s == "pending").count(),
            4,
            "{statuses:?}"
        );
        for id in &ids {
            assert_eq!(w.wait(id, 20_000)["status"], "completed");
        }
        assert_eq!(w.most_at_once.get(), 2);
        let _ = open;
    }
}

/// Two workers submit at once with one request left in the window: at every
/// host call of the first worker's submit, the second makes its whole
/// submit. Exactly one is accepted.
#[test]
fn two_workers_racing_never_let_one_request_too_many_through() {
    let a = r#","limits":{"requests":{"max":1,"per":"1h"}}"#;
    for at in 0..12u64 {
        let w = Rc::new(worlds(a, "", "").remove(0));
        let accepted = Rc::new(RefCell::new(Vec::new()));
        let (w2, acc2) = (w.clone(), accepted.clone());
        let host_a = w.workers[0].host.clone();
        host_a.on_call(move |n| {
            if n == at {
                acc2.borrow_mut()
                    .push(w2.submit_as(1, KEY, &speech("")).status);
            }
        });
        let first = w.submit_as(0, KEY, &speech("")).status;
        host_a.clear_hook();
        accepted.borrow_mut().push(first);
        let ok = accepted.borrow().iter().filter(|s| **s == 202).count();
        assert_eq!(ok, 1, "interleaved at call {at}: {:?}", accepted.borrow());
        let usage = json(&w.request(0, "GET", "/v1/async/usage", None).body);
        assert_eq!(usage["limits"]["requests"]["used"], 1);
        assert_eq!(usage["held_jobs"], 1, "the refused one holds nothing");
    }
}

/// Two replicas submit at once with one request left in the window: the
/// second submits whole between the first's read of the key's counters and
/// its write. Exactly one is accepted.
#[test]
fn two_replicas_racing_never_let_one_request_too_many_through() {
    let a = r#","limits":{"requests":{"max":1,"per":"1h"}}"#;
    let w = World::new(ETCD, &keys(a, ""), 2, 1);
    let mut second = None;
    let body = speech("");
    let first = w.request_between(
        0,
        "POST",
        "/v1/async/audio/speech",
        Some(&body),
        &[],
        1,
        &mut || {
            second = Some(w.submit_as(1, KEY, &speech("")).status);
        },
    );
    assert_eq!(second, Some(202), "the second came first and was counted");
    assert_eq!(
        (first.status, error_type(&first)),
        (429, "request_limit_exceeded".into())
    );
    let usage = json(&w.request(0, "GET", "/v1/async/usage", None).body);
    assert_eq!(
        (
            usage["limits"]["requests"]["used"].as_u64(),
            usage["held_jobs"].as_u64()
        ),
        (Some(1), Some(1))
    );
}

#[test]
fn a_keys_first_job_starts_before_another_key_has_two_more() {
    for mut w in worlds("", "", r#","max_in_flight":1"#) {
        // Calls of different lengths, so that slots free one at a time.
        let n = std::cell::Cell::new(0u64);
        w.set_provider(move |_| {
            n.set(n.get() + 1);
            Reply::After(1_000 + 700 * n.get(), Box::new(Reply::Audio(b"x".to_vec())))
        });
        for _ in 0..10 {
            assert_eq!(w.submit_as(0, KEY, &speech("")).status, 202);
        }
        // Long enough for the lane audit to have looked at every lane.
        w.run_for(8_000);
        let before = w.provider_calls.borrow().len();
        let late = w.submit_as(0, KEY_B, &speech(r#","voice":"b""#));
        assert_eq!(late.status, 202);
        let took = w.run_until(30_000, |w| {
            w.provider_calls.borrow()[before..]
                .iter()
                .any(|c| json(&c.body)["voice"] == "b")
        });
        assert!(took.is_some(), "the late key's call was made");
        let calls = w.provider_calls.borrow();
        let others_first = calls[before..]
            .iter()
            .take_while(|c| json(&c.body)["voice"] != "b")
            .count();
        assert!(
            others_first <= 1,
            "{others_first} of the backlog's jobs started first"
        );
    }
}

/// Many jobs of one key end at once on every worker, each settling its
/// charge and characters with the key's counters: contended, but every job
/// ends, completed, and the counters add up.
#[test]
fn jobs_ending_together_all_settle_with_their_key() {
    let a = r#","limits":{"characters":{"max":100000,"per":"1d"},"budget":{"max_usd":1000,"per":"1d"}}"#;
    let pricing = r#","pricing":{"a/*":1.0},"max_in_flight":64,"max_jobs":100"#;
    for mut w in worlds(a, "", pricing) {
        let ids: Vec<String> = (0..60).map(|i| w.submit(i % 2, &speech(""))).collect();
        let took = w.run_until(20_000, |w| ids.iter().all(|id| w.status(id) == "completed"));
        assert!(
            took.is_some(),
            "{:?}",
            ids.iter().map(|id| w.status(id)).collect::<Vec<_>>()
        );
        let usage = json(&w.request(0, "GET", "/v1/async/usage", None).body);
        // 60 inputs of 2 characters at a dollar per million characters.
        assert_eq!(usage["limits"]["characters"]["used"], 120, "{usage}");
        assert_eq!(usage["limits"]["budget"]["spent_usd"], 0.00012, "{usage}");
    }
}
