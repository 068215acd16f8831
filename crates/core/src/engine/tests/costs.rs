//! Host calls per operation, on both stores: what a submit, a poll, a delete
//! and one job's work (its claim, provider call, end and expiry) ask of the
//! host. The store's calls are counted here (shared data reads, writes and
//! queue operations; callouts, to etcd or a provider); the filter adds a few
//! of its own per request (docs/benchmark.md lists them). Printed with
//! `cargo test -p async-speech-core costs -- --nocapture`, and bounded, so
//! that a change that adds calls shows here.

use super::world::{speech, World};

/// Host calls since the last reset, all workers and the requests' store
/// round trips together.
fn calls(w: &World) -> u64 {
    w.workers.iter().map(|k| k.host.calls()).sum::<u64>() + w.request_rounds.get()
}

fn reset(w: &World) {
    for worker in &w.workers {
        worker.host.on_call(|_| {});
        worker.host.clear_hook();
    }
    w.request_rounds.set(0);
}

/// The calls `op` makes.
fn cost<T>(w: &mut World, op: impl FnOnce(&mut World) -> T) -> (u64, T) {
    reset(w);
    let out = op(w);
    (calls(w), out)
}

#[derive(Debug)]
struct Costs {
    submit: u64,
    poll_completed: u64,
    poll_unknown: u64,
    delete: u64,
    /// A job's claim, provider call, end and expiry, less what the same
    /// ticks cost a twin world without the jobs.
    work: u64,
    /// A tick with nothing to do, every worker together.
    idle_tick: u64,
}

const JOBS: u64 = 20;
const TICKS: u64 = 25;

/// Measured on `make()`'s world; a twin from `make()` runs the same ticks
/// without jobs, for what upkeep costs anyway.
fn measure(make: impl Fn() -> World) -> Costs {
    let (mut w, mut twin) = (make(), make());
    // Both worlds warm: as many slots made (and free again) as the jobs need.
    for world in [&mut w, &mut twin] {
        for _ in 0..JOBS {
            world.submit(0, &speech(""));
        }
        world.run_for(TICKS * 200);
    }
    let (submit, first) = cost(&mut w, |w| w.submit(0, &speech("")));
    let ids: Vec<String> = std::iter::once(first)
        .chain((1..JOBS).map(|_| w.submit(0, &speech(""))))
        .collect();
    let (busy, ()) = cost(&mut w, |w| w.run_for(TICKS * 200));
    let (idle, ()) = cost(&mut twin, |w| w.run_for(TICKS * 200));
    assert!(
        ids.iter().all(|id| w.poll(0, id).0 == 404),
        "every job completed and expired in the window"
    );
    // One that stays, for the poll and the delete.
    let ttl = [("x-bf-async-job-result-ttl", "60")];
    let answer = w.request_with(0, "POST", "/v1/async/audio/speech", Some(&speech("")), &ttl);
    let id = super::world::json(&answer.body)["id"]
        .as_str()
        .unwrap()
        .to_string();
    w.wait(&id, 3_000);
    let (poll_completed, _) = cost(&mut w, |w| w.poll(0, &id));
    let path = format!("/v1/async/audio/speech/{id}");
    let (delete, _) = cost(&mut w, |w| w.request(0, "DELETE", &path, None));
    let (poll_unknown, _) = cost(&mut w, |w| w.poll(0, &id));
    Costs {
        submit,
        poll_completed,
        poll_unknown,
        delete,
        work: busy.saturating_sub(idle) / JOBS,
        idle_tick: idle / TICKS,
    }
}

#[test]
fn costs_per_operation_stay_within_their_bounds() {
    let extra = r#","default_result_ttl_s":1"#;
    let shared = measure(|| World::shared(extra));
    let etcd = measure(|| World::etcd(extra));
    let rows = [
        ("submit", shared.submit, etcd.submit),
        ("poll completed", shared.poll_completed, etcd.poll_completed),
        ("poll unknown", shared.poll_unknown, etcd.poll_unknown),
        ("delete", shared.delete, etcd.delete),
        ("a job's work", shared.work, etcd.work),
        ("idle tick", shared.idle_tick, etcd.idle_tick),
    ];
    println!("host calls per operation (store calls; the filter adds its own per request)");
    println!("{:<16} {:>12} {:>6}", "operation", "shared data", "etcd");
    for (name, s, e) in rows {
        println!("{name:<16} {s:>12} {e:>6}");
    }
    // For `make bench`, which puts them in its table.
    let operations: serde_json::Map<String, serde_json::Value> = rows
        .iter()
        .flat_map(|(name, s, e)| {
            [
                (format!("{name} (shared data)"), (*s).into()),
                (format!("{name} (etcd)"), (*e).into()),
            ]
        })
        .collect();
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/host-calls.json");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let json = serde_json::json!({ "counted": "store calls, by the native test engine::tests::costs", "operations": operations });
    std::fs::write(out, json.to_string()).unwrap();
    // Bounds a little above today's counts: a change that adds calls to
    // the hot paths fails here and says which.
    let bounds = [
        ("shared submit", shared.submit, 7),
        ("shared poll", shared.poll_completed, 1),
        ("shared unknown poll", shared.poll_unknown, 1),
        ("shared delete", shared.delete, 5),
        ("shared work", shared.work, 24),
        ("etcd submit", etcd.submit, 2),
        ("etcd poll", etcd.poll_completed, 1),
        ("etcd unknown poll", etcd.poll_unknown, 1),
        ("etcd delete", etcd.delete, 3),
        ("etcd work", etcd.work, 6),
    ];
    for (name, count, bound) in bounds {
        assert!(count <= bound, "{name}: {count} host calls, bound {bound}");
    }
}
