//! The store on the simulated host: constant cost at any fill, races between
//! interleaved workers, and recovery from a VM that died between two writes.

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;

use super::*;
use crate::ids::make_id;
use crate::sim::{SimHost, SimShared};
use crate::speech::SpeechRequest;

fn request() -> SpeechRequest {
    crate::speech::sample_request(&[("p", "m")])
}

fn insert(store: &Store, host: &SimHost) -> Result<JobRecord, StoreError> {
    let mut random = [0u8; 16];
    host.random(&mut random).unwrap();
    store.insert(&|slot| JobRecord::new(make_id(random, slot), "o".into(), 0, 1, 60, request()))
}

fn delete(store: &Store, id: &str) -> bool {
    match store.load(id).unwrap() {
        Some(loaded) => store.free(loaded, &|v| v.id == id.as_bytes()).unwrap(),
        None => false,
    }
}

/// Host calls one operation makes.
fn cost(host: &SimHost, op: impl FnOnce()) -> u64 {
    host.on_call(|_| {});
    op();
    let n = host.calls();
    host.clear_hook();
    n
}

#[test]
fn keys_stay_bounded_however_many_jobs_pass() {
    let shared = SimShared::new(0);
    let host = SimHost::new(&shared, 1);
    let keys = Keys::new("t");
    let store = Store::new(&host, &keys, 5, 1);
    for _ in 0..200 {
        let held: Vec<String> = (0..5).map(|_| insert(&store, &host).unwrap().id).collect();
        assert_eq!(insert(&store, &host).unwrap_err(), StoreError::Full(None));
        for id in &held {
            assert!(delete(&store, id));
            assert!(!delete(&store, id), "freeing twice is a no-op");
            assert!(
                store.load(id).unwrap().is_none(),
                "a freed id no longer resolves"
            );
        }
    }
    assert_eq!(store.slots(), 5);
    assert!(shared.keys() <= 5 + 2, "{} keys", shared.keys());
    assert_eq!(shared.queue_len(&Queue::Free), 5);
}

#[test]
fn every_operation_costs_the_same_at_any_fill() {
    let shared = SimShared::new(0);
    let host = SimHost::new(&shared, 1);
    let keys = Keys::new("t");
    let store = Store::new(&host, &keys, 200_000, 1);
    // Warm: one slot made and freed, so both the free-list path and growth are measured.
    let first = insert(&store, &host).unwrap().id;
    let empty_insert = cost(&host, || drop(insert(&store, &host).unwrap()));
    let empty_load = cost(&host, || drop(store.load(&first).unwrap()));
    let empty_free = cost(&host, || assert!(delete(&store, &first)));
    let reuse_insert = cost(&host, || drop(insert(&store, &host).unwrap()));
    for _ in 0..100_000 {
        insert(&store, &host).unwrap();
    }
    let victim = insert(&store, &host).unwrap().id;
    let full_insert = cost(&host, || drop(insert(&store, &host).unwrap()));
    let full_load = cost(&host, || drop(store.load(&victim).unwrap()));
    let full_free = cost(&host, || assert!(delete(&store, &victim)));
    let full_reuse = cost(&host, || drop(insert(&store, &host).unwrap()));
    assert_eq!(
        (empty_insert, empty_load, empty_free, reuse_insert),
        (full_insert, full_load, full_free, full_reuse)
    );
    assert!(
        full_insert <= 4 && full_reuse <= 4 && full_load == 1 && full_free <= 3,
        "{full_insert} {full_reuse} {full_load} {full_free}"
    );
}

/// Two workers: at every host call of worker A's operation, worker B runs
/// its own; afterwards no slot is held twice, and every slot comes back.
fn interleave(
    setup: impl Fn(&Store, &SimHost) -> Vec<String>,
    a: impl Fn(&Store, &[String]),
    b: impl Fn(&Store, &SimHost, &[String]) + 'static,
) {
    let b = Rc::new(b);
    for at in 0..12u64 {
        let shared = SimShared::new(0);
        let (ha, hb) = (SimHost::new(&shared, 1), Rc::new(SimHost::new(&shared, 2)));
        let keys = Rc::new(Keys::new("t"));
        let store_a = Store::new(&ha, &keys, 3, 1);
        let ids = setup(&store_a, &ha);
        let fired = Rc::new(RefCell::new(false));
        let (hb2, keys2, ids2, fired2) = (hb.clone(), keys.clone(), ids.clone(), fired.clone());
        let b = b.clone();
        ha.on_call(move |n| {
            if n == at && !*fired2.borrow() {
                *fired2.borrow_mut() = true;
                let store_b = Store::new(hb2.as_ref(), &keys2, 3, 1);
                b(&store_b, &hb2, &ids2);
            }
        });
        a(&store_a, &ids);
        ha.clear_hook();
        // Invariants: each held slot holds one job, and all 3 slots can be had.
        let store = Store::new(&ha, &keys, 3, 1);
        let mut held = HashSet::new();
        for slot in 0..3 {
            if let Some((v, _)) = shared.data.borrow().get(&keys.slot(slot)) {
                if let slot::SlotView::Held(view) = slot::decode(v) {
                    assert!(held.insert(view.id.to_vec()), "a job in two slots");
                }
            }
        }
        let mut all: Vec<String> = Vec::new();
        for slot in 0..3u32 {
            if let Some((v, _)) = shared.data.borrow().get(&keys.slot(slot)) {
                if let slot::SlotView::Held(view) = slot::decode(v) {
                    all.push(String::from_utf8(view.id.to_vec()).unwrap());
                }
            }
        }
        for id in all {
            assert!(delete(&store, &id));
        }
        let again: Vec<String> = (0..3)
            .map(|_| {
                insert(&store, &ha)
                    .unwrap_or_else(|e| panic!("slot lost (interleave at {at}): {e:?}"))
                    .id
            })
            .collect();
        assert_eq!(again.iter().collect::<HashSet<_>>().len(), 3);
        assert_eq!(insert(&store, &ha).unwrap_err(), StoreError::Full(None));
    }
}

#[test]
fn racing_submits_never_share_a_slot() {
    interleave(
        |s, h| {
            let id = insert(s, h).unwrap().id;
            assert!(delete(s, &id));
            vec![]
        },
        |s, _| {
            let _ = insert(s, &SimHost::new(&SimShared::new(0), 9)).map(|_| ());
        },
        |s, h, _| {
            insert(s, h).unwrap();
        },
    );
}

#[test]
fn delete_racing_completion_or_expiry_frees_once() {
    let completion = crate::job::Completion {
        meta: crate::job::ResultMeta {
            response_format: crate::speech::AudioFormat::Mp3,
            extra_fields: Default::default(),
        },
        audio: vec![7; 64],
        alignment: None,
        normalized_alignment: None,
    };
    let c2 = completion.clone();
    interleave(
        |s, h| {
            let id = insert(s, h).unwrap().id;
            s.update(&id, None, &mut |r| {
                r.status = crate::job::JobStatus::Processing;
                true
            })
            .unwrap();
            vec![id]
        },
        move |s, ids| {
            // Worker A completes the job...
            let _ = s.update(&ids[0], Some(&c2), &mut |r| {
                if !r.is_running(0) {
                    return false;
                }
                r.complete(1, c2.meta.clone());
                true
            });
        },
        |s, _, ids| {
            // ...while worker B deletes it.
            assert!(delete(s, &ids[0]));
        },
    );
    let _ = completion;
}

#[test]
fn a_vm_dying_between_two_writes_loses_no_slot() {
    let shared = SimShared::new(0);
    let host = SimHost::new(&shared, 1);
    let keys = Keys::new("t");
    let gen = Store::start_generation(&host, &keys);
    let store = Store::new(&host, &keys, 2, gen);
    let a = insert(&store, &host).unwrap().id;
    let b = insert(&store, &host).unwrap().id;
    assert!(delete(&store, &a));
    assert!(delete(&store, &b));
    // A VM takes both free-list entries and dies before writing its jobs.
    assert!(host.dequeue(&Queue::Free).unwrap().is_some());
    assert!(host.dequeue(&Queue::Free).unwrap().is_some());
    assert_eq!(
        insert(&store, &host).unwrap_err(),
        StoreError::Full(None),
        "both slots look lost"
    );
    // Its replacement starts a new generation; the audit puts the slots back.
    let gen2 = Store::start_generation(&host, &keys);
    let store2 = Store::new(&host, &keys, 2, gen2);
    assert!(store2.audit_step(64).0.is_empty());
    insert(&store2, &host).unwrap();
    insert(&store2, &host).unwrap();
    assert_eq!(insert(&store2, &host).unwrap_err(), StoreError::Full(None));
    // A second audit pass of the same generation queues nothing again.
    let queued = shared.queue_len(&Queue::Free);
    store2.audit_step(64);
    assert_eq!(shared.queue_len(&Queue::Free), queued);
}

#[test]
fn a_lower_max_jobs_retires_slots_above_it() {
    let shared = SimShared::new(0);
    let host = SimHost::new(&shared, 1);
    let keys = Keys::new("t");
    let big = Store::new(&host, &keys, 4, 1);
    let ids: Vec<String> = (0..4).map(|_| insert(&big, &host).unwrap().id).collect();
    let small = Store::new(&host, &keys, 2, 1);
    for id in &ids {
        assert!(
            delete(&small, id),
            "jobs in retired slots can still be freed"
        );
    }
    insert(&small, &host).unwrap();
    insert(&small, &host).unwrap();
    assert_eq!(insert(&small, &host).unwrap_err(), StoreError::Full(None));
}

#[test]
fn a_store_that_refuses_writes_answers_busy_and_holds_nothing() {
    let shared = SimShared::new(0);
    let host = SimHost::new(&shared, 1);
    let keys = Keys::new("t");
    let store = Store::new(&host, &keys, 2, 1);
    host.fail_sets.set(true);
    assert!(matches!(insert(&store, &host), Err(StoreError::Busy(_))));
    host.fail_sets.set(false);
    insert(&store, &host).unwrap();
    insert(&store, &host).unwrap();
}
