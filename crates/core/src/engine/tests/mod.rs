//! The engine on the simulated host, over both stores: every test runs on
//! shared data (one Envoy, two workers) and on etcd (two replicas, one etcd),
//! unless it is about one store's own machinery.

mod costs;
mod governance;
mod profile;
mod races;
mod world;

use super::attempt::{AttemptResult, FailReason};
use super::Report;
use world::{speech, Reply, World};

/// The same test on both stores.
fn both(extra: &str) -> [World; 2] {
    [World::shared(extra), World::etcd(extra)]
}

fn audio(job: &serde_json::Value) -> Vec<u8> {
    use base64::Engine;
    assert_eq!(job["status"], "completed", "{job}");
    base64::engine::general_purpose::STANDARD
        .decode(job["result"]["audio"].as_str().unwrap())
        .unwrap()
}

#[test]
fn a_job_completes_and_every_replica_polls_it() {
    for mut w in both("") {
        let id = w.submit(0, &speech(""));
        assert_eq!(w.status(&id), "pending");
        let job = w.wait(&id, 3_000);
        assert_eq!(job["status"], "completed");
        assert_eq!(audio(&job), b"AUDIO");
        let last = w.workers.len() - 1;
        assert_eq!(
            w.poll(last, &id).1,
            job,
            "the same answer through any worker"
        );
        assert_eq!(w.count(|r| matches!(r, Report::Completed { .. })), 1);
        assert_eq!(w.provider_calls.borrow().len(), 1, "one call, once");
    }
}

#[test]
fn failures_move_through_the_fallbacks_then_fail_naming_each_attempt() {
    for mut w in both("") {
        w.set_provider(|c| match c.cluster.as_str() {
            "ca" => Reply::Status(500, br#"{"error":{"message":"down"}}"#.to_vec()),
            _ => Reply::Status(429, br#"{"error":{"message":"slow"}}"#.to_vec()),
        });
        let id = w.submit(0, &speech(r#","fallbacks":["b/n"]"#));
        let job = w.wait(&id, 3_000);
        assert_eq!(
            (job["status"].as_str(), job["status_code"].as_u64()),
            (Some("failed"), Some(429))
        );
        let attempts = &job["error"]["extra_fields"]["attempts"];
        assert_eq!(attempts[0]["status_code"], 500);
        assert_eq!(attempts[1]["provider"], "b");
        assert_eq!(
            w.count(|r| matches!(
                r,
                Report::Failed {
                    reason: FailReason::ProviderError,
                    ..
                }
            )),
            1
        );
    }
}

#[test]
fn a_call_envoy_cannot_send_is_unreachable_on_either_store() {
    for mut w in both("") {
        for worker in &w.workers {
            *worker.host.refuse_cluster.borrow_mut() = Some("ca".into());
        }
        let id = w.submit(0, &speech(""));
        let job = w.wait(&id, 3_000);
        assert_eq!(job["status_code"], 502, "{job}");
        let message = job["error"]["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("Envoy cannot call cluster ca"),
            "{message}"
        );
        let unreachable = |r: &Report| {
            matches!(
                r,
                Report::AttemptEnded {
                    result: AttemptResult::Unreachable,
                    ..
                }
            )
        };
        assert_eq!(w.count(unreachable), 1);
        let failed = |r: &Report| {
            matches!(
                r,
                Report::Failed {
                    reason: FailReason::Unreachable,
                    ..
                }
            )
        };
        assert_eq!(w.count(failed), 1);
    }
}

#[test]
fn a_long_input_goes_in_parts_at_most_two_at_once_and_comes_back_as_one_file() {
    for mut w in both("") {
        w.set_provider(|c| {
            let input = crate::engine::tests::world::json(&c.body)["input"]
                .as_str()
                .unwrap()
                .to_string();
            // Whole 16-bit samples: each byte twice.
            let pcm = input.bytes().flat_map(|b| [b, b]).collect();
            Reply::After(300, Box::new(Reply::Audio(pcm)))
        });
        let input = "One two. Three four five. Six seven eight nine.";
        let id = w.submit(0, &speech("").replace("\"hi\"", &format!("\"{input}\"")));
        w.run_for(400);
        let (_, running) = w.poll(0, &id);
        assert_eq!(running["status"], "processing");
        assert!(
            running["progress"]["chunks_total"].as_u64().unwrap() >= 4,
            "{running}"
        );
        let job = w.wait(&id, 10_000);
        let parts: Vec<u8> = crate::audio::split_text(input, 10)
            .concat()
            .bytes()
            .flat_map(|b| [b, b])
            .collect();
        assert_eq!(audio(&job), parts, "every part once, joined in order");
        assert!(job.get("progress").is_none());
        assert_eq!(w.most_at_once.get(), 2, "max_parallel_chunks");
    }
}

#[test]
fn max_in_flight_holds_exactly_per_worker() {
    for mut w in both(r#","max_in_flight":1"#) {
        w.set_provider(|_| Reply::After(500, Box::new(Reply::Audio(b"xx".to_vec()))));
        let long = speech("").replace("\"hi\"", "\"aaaa bbbb cccc dddd eeee ffff\"");
        let short = speech("");
        let ids: Vec<String> = (0..6)
            .map(|i| w.submit(i % 2, if i == 0 { &long } else { &short }))
            .collect();
        for id in &ids {
            assert_eq!(w.wait(id, 20_000)["status"], "completed");
        }
        let workers = w.workers.len();
        assert_eq!(
            w.most_at_once.get(),
            workers,
            "one call per worker, never more"
        );
    }
}

#[test]
fn a_job_never_answered_fails_at_its_deadline_naming_the_last_attempt() {
    for mut w in both(r#","job_deadline_s":5"#) {
        w.set_provider(|c| match c.cluster.as_str() {
            "ca" => Reply::Status(500, b"{}".to_vec()),
            _ => Reply::After(60_000, Box::new(Reply::Audio(b"late".to_vec()))),
        });
        let id = w.submit(0, &speech(r#","fallbacks":["b/n"]"#));
        let started = w.now();
        let job = w.wait(&id, 10_000);
        let took = w.now() - started;
        assert!(
            (5_000..=5_600).contains(&took),
            "ended {took} ms after submit"
        );
        assert_eq!(job["status_code"], 504);
        assert_eq!(job["error"]["extra_fields"]["provider"], "b", "{job}");
        let deadline = |r: &Report| {
            matches!(
                r,
                Report::Failed {
                    reason: FailReason::Deadline,
                    ..
                }
            )
        };
        assert_eq!(w.count(deadline), 1);
    }
}

const HOOKS: &str = r#","webhooks":{"billing":{"cluster":"hooks","path":"/h","secret":"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw","retry_backoff_initial_seconds":2,"retry_backoff_max_seconds":2,"max_retries":3,"attempt_timeout_seconds":1}}"#;

fn submit_hooked(w: &World, ttl: &str) -> String {
    let answer = w.request_with(
        0,
        "POST",
        "/v1/async/audio/speech",
        Some(&speech("")),
        &[
            ("x-bf-async-webhook", "billing"),
            ("x-bf-async-job-result-ttl", ttl),
        ],
    );
    assert_eq!(
        answer.status,
        202,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    world::json(&answer.body)["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_webhook_is_retried_with_one_id_and_one_body_until_delivered() {
    for mut w in both(HOOKS) {
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let log = seen.clone();
        w.set_provider(move |c| {
            if c.cluster != "hooks" {
                return Reply::Audio(b"AUDIO".to_vec());
            }
            let id = c
                .headers
                .iter()
                .find(|(k, _)| k == "webhook-id")
                .unwrap()
                .1
                .clone();
            log.borrow_mut().push((id, c.body.clone()));
            match log.borrow().len() {
                1 => Reply::Status(500, Vec::new()),
                2 => Reply::Hang,
                _ => Reply::Status(204, Vec::new()),
            }
        });
        let id = submit_hooked(&w, "3600");
        w.wait(&id, 3_000);
        let delivered = w.run_until(15_000, |w| {
            w.poll(0, &id).1["webhook"]["status"] == "delivered"
        });
        assert!(delivered.is_some(), "{}", w.poll(0, &id).1);
        let seen = seen.borrow();
        assert_eq!(seen.len(), 3, "a failure, a timeout, then delivered");
        assert!(seen.iter().all(|(i, b)| *i == seen[0].0 && *b == seen[0].1));
        assert_eq!(w.poll(0, &id).1["webhook"]["attempts"], 3);
    }
}

#[test]
fn a_delivery_due_after_expiry_sends_the_expired_form_then_the_job_goes() {
    for mut w in both(HOOKS) {
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let log = seen.clone();
        w.set_provider(move |c| {
            if c.cluster != "hooks" {
                return Reply::Audio(b"AUDIO".to_vec());
            }
            log.borrow_mut().push(world::json(&c.body));
            match log.borrow().len() {
                1 => Reply::Status(503, Vec::new()),
                _ => Reply::Status(200, Vec::new()),
            }
        });
        let id = submit_hooked(&w, "1");
        let sent = w.run_until(10_000, |_| seen.borrow().len() == 2);
        assert!(sent.is_some());
        let second = &seen.borrow()[1];
        assert_eq!(second["data"]["result_expired"], true, "{second}");
        assert_eq!(w.poll(0, &id).0, 404);
        w.run_for(3_000);
        assert!(
            w.etcd.keys("/async-speech/jobs/").is_empty(),
            "etcd keys gone"
        );
        let held = w.envoys[0]
            .data
            .borrow()
            .values()
            .filter(|(v, _)| v.first() == Some(&b'H'))
            .count();
        assert_eq!(held, 0, "shared-data slot freed");
    }
}

#[test]
fn finished_jobs_expire_on_time_with_nobody_polling() {
    for mut w in both(r#","default_result_ttl_s":3"#) {
        let id = w.submit(0, &speech(""));
        w.wait(&id, 2_000);
        let done = w.now();
        let gone = w.run_until(10_000, |w| w.poll(0, &id).0 == 404).unwrap();
        assert!((2_600..=3_400).contains(&(w.now() - done)), "{gone}");
        w.run_for(2_000);
        let left = w.etcd.keys("/async-speech/");
        assert!(
            left.iter().all(|k| !k.contains(&id)),
            "etcd removed the keys: {left:?}"
        );
        // Shared data frees the slot itself and counts it; etcd expires it by its lease.
        let freed = w.count(|r| matches!(r, Report::Expired { count: 1, .. }));
        assert_eq!(freed, usize::from(!w.is_etcd()));
    }
}

/// The first provider call hangs for ever; the rest answer.
fn first_call_hangs() -> impl FnMut(&crate::platform::Callout) -> Reply {
    let mut calls = 0;
    move |_| {
        calls += 1;
        match calls {
            1 => Reply::After(3_600_000, Box::new(Reply::Audio(b"late".to_vec()))),
            _ => Reply::Audio(b"AUDIO".to_vec()),
        }
    }
}

/// A job whose first call never answers, under way: its id and its holder.
fn one_hanging_call(w: &mut World) -> (String, usize) {
    w.set_provider(first_call_hangs());
    let id = w.submit(0, &speech(""));
    w.run_until(2_000, |w| w.provider_calls.borrow().len() == 1)
        .unwrap();
    (id, w.holder())
}

#[test]
fn a_worker_dying_mid_job_loses_nothing_and_its_attempt_is_made_again_uncounted() {
    for mut w in both("") {
        let (id, holder) = one_hanging_call(&mut w);
        w.kill(holder);
        let job = w.wait(&id, 30_000);
        assert_eq!(audio(&job), b"AUDIO");
        assert!(job["error"].is_null());
        assert_eq!(w.provider_calls.borrow().len(), 2, "made again once");
        let failed = |r: &Report| matches!(r, Report::AttemptEnded { result, .. } if *result != AttemptResult::Success);
        assert_eq!(
            w.count(failed),
            0,
            "the lost call is not counted as a failure"
        );
    }
}

#[test]
fn a_worker_going_away_hands_its_jobs_back_at_once() {
    for mut w in both("") {
        let (id, holder) = one_hanging_call(&mut w);
        w.close(holder);
        let took = w.run_until(3_000, |w| w.status(&id) == "completed");
        assert!(took.is_some(), "taken over at once, not after a lapse");
        assert_eq!(w.count(|r| matches!(r, Report::Requeued { .. })), 1);
        let failed = |r: &Report| matches!(r, Report::Failed { .. });
        assert_eq!(w.count(failed), 0);
    }
}

#[test]
fn while_etcd_is_away_submits_answer_503_and_jobs_end_once_it_is_back() {
    let mut w = World::etcd("");
    w.set_provider(|_| Reply::After(600, Box::new(Reply::Audio(b"AUDIO".to_vec()))));
    let id = w.submit(0, &speech(""));
    w.run_until(2_000, |w| w.provider_calls.borrow().len() == 1)
        .unwrap();
    w.etcd_down.set(true);
    let refused = w.request(1, "POST", "/v1/async/audio/speech", Some(&speech("")));
    assert_eq!(refused.status, 503);
    assert!(refused.headers.iter().any(|(k, _)| *k == "retry-after"));
    assert!(String::from_utf8_lossy(&refused.body).contains("job store unavailable"));
    // The answer comes while etcd is away: the ending waits and is tried again.
    w.run_for(4_000);
    w.etcd_down.set(false);
    let job = w.wait(&id, 20_000);
    assert_eq!(audio(&job), b"AUDIO");
    assert_eq!(w.count(|r| matches!(r, Report::Completed { .. })), 1);
}

#[test]
fn a_draining_worker_finishes_its_calls_and_takes_nothing_new() {
    for mut w in both("") {
        w.set_provider(|_| Reply::After(2_000, Box::new(Reply::Audio(b"AUDIO".to_vec()))));
        let first = w.submit(0, &speech(""));
        w.run_until(2_000, |w| w.provider_calls.borrow().len() == 1)
            .unwrap();
        let draining = w.holder();
        w.drain(draining);
        let second = w.submit(0, &speech(""));
        assert_eq!(w.wait(&first, 5_000)["status"], "completed");
        assert_eq!(w.wait(&second, 5_000)["status"], "completed");
        assert!(w.is_closed(draining), "let go of everything");
        assert_eq!(w.provider_calls.borrow().len(), 2, "no call made twice");
        assert_eq!(w.count(|r| matches!(r, Report::Requeued { .. })), 0);
        let by_drainer = w
            .reports
            .borrow()
            .iter()
            .filter(|r| matches!(r, Report::Started { .. }))
            .count();
        assert_eq!(by_drainer, 2);
    }
}

#[test]
fn a_draining_worker_hands_back_what_outlives_its_longest_call() {
    for mut w in both("") {
        let (id, draining) = one_hanging_call(&mut w);
        w.drain(draining);
        let job = w.wait(&id, 20_000);
        assert_eq!(audio(&job), b"AUDIO");
        w.run_for(1_000);
        assert!(w.is_closed(draining), "let go of everything");
        // Handed back, or taken over when its claim lapsed first.
        assert!(w.count(|r| matches!(r, Report::Requeued { .. })) <= 1);
        assert_eq!(w.count(|r| matches!(r, Report::Failed { .. })), 0);
    }
}
