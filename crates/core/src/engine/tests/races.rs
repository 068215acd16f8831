//! Races between workers (shared data, interleaved at every host call) and
//! between replicas (etcd, calls answered in every order).

use std::cell::RefCell;
use std::rc::Rc;

use super::world::{speech, Reply, World};
use crate::engine::Report;
use crate::store::shared::work::SharedWork;
use crate::store::work::{Ticket, WorkDone, WorkOp};

fn claims_made(done: &WorkDone) -> usize {
    usize::from(matches!(done, WorkDone::Claimed(Some(_))))
}

/// Two workers claim one job: at every host call of the first worker's
/// claim, the second makes its whole claim. Exactly one holds the job.
#[test]
fn two_workers_claiming_one_job_make_one_claim() {
    for at in 0..8u64 {
        let w = World::shared("");
        let id = w.submit(0, &speech(""));
        let ticket = Ticket::Shared {
            id: id.clone(),
            lane: None,
        };
        let mut a = SharedWork::for_test(1);
        let b = Rc::new(RefCell::new(SharedWork::for_test(2)));
        let (host_a, host_b) = (w.workers[0].host.clone(), w.workers[1].host.clone());
        let won_b = Rc::new(RefCell::new(0));
        let (b2, t2, won2) = (b.clone(), ticket.clone(), won_b.clone());
        let now = w.now();
        let config = w.config();
        let (config, config_a) = (config.clone(), config);
        host_a.on_call(move |n| {
            if n == at {
                let op = WorkOp::Claim {
                    ticket: t2.clone(),
                    hold_ms: 10_000,
                };
                *won2.borrow_mut() +=
                    claims_made(&b2.borrow_mut().run(host_b.as_ref(), &config, op, now));
            }
        });
        let op = WorkOp::Claim {
            ticket,
            hold_ms: 10_000,
        };
        let won_a = claims_made(&a.run(host_a.as_ref(), &config_a, op, now));
        host_a.clear_hook();
        assert_eq!(won_a + *won_b.borrow(), 1, "interleaved at call {at}");
    }
}

/// Two replicas scan the same pending job and claim it at once: one holds it,
/// the provider is called once, the job completes once.
#[test]
fn two_replicas_claiming_one_job_make_one_claim() {
    let mut w = World::etcd("");
    let id = w.submit(0, &speech(""));
    let job = w.wait(&id, 3_000);
    assert_eq!(job["status"], "completed");
    assert_eq!(w.provider_calls.borrow().len(), 1);
    assert_eq!(w.count(|r| matches!(r, Report::Completed { .. })), 1);
    assert_eq!(w.count(|r| matches!(r, Report::Started { .. })), 1);
}

/// A worker (shared data) or a replica (etcd) stops (SIGSTOP) mid-call; its
/// claim (or lease) lapses and another takes the job over and completes it.
/// When the first wakes up and its provider's answer arrives, its ending
/// loses its compare: the job stays as the second made it.
#[test]
fn a_worker_whose_claim_lapsed_cannot_end_a_job_another_took_over() {
    for mut w in super::both("") {
        let mut calls = 0;
        w.set_provider(move |_| {
            calls += 1;
            match calls {
                1 => Reply::After(15_000, Box::new(Reply::Audio(b"LATE".to_vec()))),
                _ => Reply::Audio(b"TAKEN".to_vec()),
            }
        });
        let id = w.submit(0, &speech(""));
        w.run_until(2_000, |w| w.provider_calls.borrow().len() == 1)
            .unwrap();
        let stopped = w.holder();
        w.workers[stopped].paused = true;
        let job = w.wait(&id, 30_000);
        assert_eq!(super::audio(&job), b"TAKEN");
        w.workers[stopped].paused = false;
        w.run_for(20_000);
        let other = 1 - stopped;
        let (_, after) = w.poll(other, &id);
        assert_eq!(
            super::audio(&after),
            b"TAKEN",
            "the late ending was refused"
        );
        assert_eq!(w.count(|r| matches!(r, Report::Completed { .. })), 1);
    }
}
