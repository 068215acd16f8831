use super::*;
use crate::time::parse_rfc3339;
use serde_json::json;

fn limits(v: Value) -> Limits {
    parse_rules(None, None, Some(&v), "k", 1000).unwrap().limits
}

fn at(text: &str) -> u64 {
    parse_rfc3339(text).unwrap() / 1000
}

#[test]
fn counts_start_at_zero_in_each_new_window_without_a_sweep() {
    let l = limits(json!({"requests": {"max": 2, "per": "1m"}}));
    let mut s = KeyState::default();
    let t = at("2026-12-06T10:14:10Z");
    for _ in 0..2 {
        assert_eq!(check(&l, &s, 0, 1, t), None);
        count(&l, &mut s, 1, t);
    }
    assert_eq!(check(&l, &s, 0, 1, t + 49), Some(Refusal::Requests));
    assert_eq!(
        check(&l, &s, 0, 1, t + 50),
        None,
        "10:15:00 is a new window"
    );
}

#[test]
fn refusals_come_in_order_and_a_submit_past_the_characters_is_refused_whole() {
    let l = limits(
        json!({"max_held_jobs": 3, "requests": {"max": 10, "per": "1h"},
        "characters": {"max": 100, "per": "1d"}, "budget": {"max_usd": 0.01, "per": "1M"}}),
    );
    let t = at("2026-12-06T10:00:00Z");
    let mut s = KeyState::default();
    count(&l, &mut s, 90, t);
    assert_eq!(check(&l, &s, 0, 10, t), None, "exactly to the max");
    assert_eq!(check(&l, &s, 0, 11, t), Some(Refusal::Characters));
    assert_eq!(
        check(&l, &s, 3, 11, t),
        Some(Refusal::HeldJobs),
        "held first"
    );
    settle(
        &l,
        &mut s,
        &Settle {
            charge: 10_000,
            ..Settle::default()
        },
        t,
    );
    assert_eq!(check(&l, &s, 0, 1, t), Some(Refusal::Budget));
    settle(
        &l,
        &mut s,
        &Settle {
            give_back: Some((at("2026-12-06T00:00:00Z"), 90)),
            ..Settle::default()
        },
        t,
    );
    assert_eq!(
        s.characters.used(l.characters.as_ref().unwrap(), t),
        0,
        "given back in its window"
    );
    let e = refusal_error(Refusal::Characters, &l, t);
    assert_eq!(
        (e.status_code, e.error.kind.as_deref()),
        (429, Some("character_limit_exceeded"))
    );
    assert_eq!(
        e.retry_after_s,
        Some(14 * 3600),
        "to the end of the UTC day"
    );
    let e = refusal_error(Refusal::Budget, &l, t);
    assert_eq!(
        (e.status_code, e.error.kind.as_deref()),
        (402, Some("budget_exceeded"))
    );
    assert_eq!(
        refusal_error(Refusal::HeldJobs, &l, t).retry_after_s,
        Some(1)
    );
}

#[test]
fn characters_given_back_after_their_window_change_nothing() {
    let l = limits(json!({"characters": {"max": 100, "per": "1m"}}));
    let t = at("2026-12-06T10:00:30Z");
    let mut s = KeyState::default();
    count(&l, &mut s, 60, t);
    let window = l.characters.as_ref().unwrap().window.start(t);
    count(&l, &mut s, 10, t + 60);
    settle(
        &l,
        &mut s,
        &Settle {
            give_back: Some((window, 60)),
            ..Settle::default()
        },
        t + 60,
    );
    assert_eq!(
        s.characters.used(l.characters.as_ref().unwrap(), t + 60),
        10
    );
}

#[test]
fn ratelimit_fields_say_what_remains_and_when_it_resets() {
    let l = limits(
        json!({"requests": {"max": 600, "per": "1m"}, "characters": {"max": 1000000, "per": "1d"},
        "budget": {"max_usd": 50.0, "per": "1M"}}),
    );
    let t = at("2026-12-06T10:14:15Z");
    let mut s = KeyState::default();
    count(&l, &mut s, 1234, t);
    settle(
        &l,
        &mut s,
        &Settle {
            charge: 12_345,
            ..Settle::default()
        },
        t,
    );
    let (policy, now) = ratelimit_fields(&l, &s, t).unwrap();
    assert_eq!(
        policy,
        r#""requests";q=600;w=60, "characters";q=1000000;w=86400, "budget";q=5000;w=2678400"#
    );
    assert_eq!(
        now,
        format!(
            r#""requests";r=599;t=45, "characters";r=998766;t={}, "budget";r=4998;t={}"#,
            at("2026-12-07T00:00:00Z") - t,
            at("2027-01-01T00:00:00Z") - t
        )
    );
    assert_eq!(ratelimit_fields(&Limits::default(), &s, t), None);
}

#[test]
fn usage_shows_the_keys_own_numbers() {
    let rules = parse_rules(Some("2027-06-30T00:00:00Z"), None,
        Some(&json!({"max_held_jobs": 500, "requests": {"max": 600, "per": "1m"}, "budget": {"max_usd": 50.0, "per": "1M"}})),
        "k", 1000).unwrap();
    let t = at("2026-12-06T10:14:15Z");
    let mut s = KeyState::default();
    count(&rules.limits, &mut s, 7, t);
    settle(
        &rules.limits,
        &mut s,
        &Settle {
            charge: 1_270_000,
            ..Settle::default()
        },
        t,
    );
    let u = usage("team-a", &rules, &s, 12, 3, t * 1000);
    assert_eq!(
        u,
        json!({"virtual_key": "team-a", "expires_at": "2027-06-30T00:00:00Z",
        "held_jobs": 12, "running_jobs": 3, "max_held_jobs": 500,
        "limits": {"requests": {"max": 600, "used": 1, "window": "1m", "resets_at": "2026-12-06T10:15:00Z"},
                   "budget": {"max_usd": 50.0, "spent_usd": 1.27, "window": "1M", "resets_at": "2027-01-01T00:00:00Z"}}})
    );
}

#[test]
fn owners_without_a_key_share_a_fixed_number_of_lanes() {
    assert_eq!(lane_of("vk:team-a"), "team-a");
    let lanes: std::collections::HashSet<String> = (0..1000)
        .map(|i| lane_of(&format!("jwt:\"user-{i}\"")))
        .collect();
    assert_eq!(lanes.len(), SHARED_LANES as usize);
    assert_eq!(lane_of("jwt:\"a\""), lane_of("jwt:\"a\""));
}

#[test]
fn key_state_keeps_only_what_is_set() {
    let s = KeyState::default();
    assert_eq!(
        String::from_utf8(s.encode()).unwrap(),
        r#"{"h":0,"u":0,"q":0,"x":0,"t":0,"p":0}"#
    );
    assert_eq!(KeyState::decode(b"not json"), KeyState::default());
}
