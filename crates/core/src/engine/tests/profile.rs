//! A fixed workload for an instruction profile of the engine on the
//! simulated host (repeatable, unlike timings on a shared machine):
//! 2,000 jobs with 1 KiB of audio each, submitted, run, completed and
//! expired on one worker. Ignored by `cargo test`; docs/benchmark.md shows
//! how to run it under `valgrind --tool=callgrind`.

use super::world::{speech, Reply, World, SHARED};

#[test]
#[ignore]
fn profile_jobs() {
    let mut w = World::new(SHARED, r#","default_result_ttl_s":1,"max_jobs":5000"#, 1, 1);
    w.set_provider(|_| Reply::Audio(vec![7u8; 1024]));
    for _ in 0..20 {
        for _ in 0..100 {
            w.submit(0, &speech(""));
        }
        w.run_for(2500);
    }
    assert_eq!(w.provider_calls.borrow().len(), 2000);
    use crate::engine::Report;
    assert_eq!(w.count(|r| matches!(r, Report::Completed { .. })), 2000);
    let expired: u32 = w
        .reports
        .borrow()
        .iter()
        .map(|r| match r {
            Report::Expired { count, .. } => *count,
            _ => 0,
        })
        .sum();
    assert!(expired >= 1900, "{expired} expired");
}
