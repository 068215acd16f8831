//! An in-memory etcd that answers the gateway calls the store makes (range,
//! put, delete, txn with compares, lease grant / keep-alive / revoke, and
//! lease expiry), with etcd's semantics: one revision per write request, a
//! key's create/mod revision and version, compares on a missing key as etcd
//! makes them, keys deleted with their lease. It reads and writes the JSON
//! of `store::etcd::wire`, so the store's real requests and parsers run
//! against it; `tests/fixtures/etcd/requests.json` (real etcd's answers)
//! holds it to the real thing.

use std::cell::RefCell;
use std::collections::BTreeMap;

use serde::Serialize;

use crate::platform::Callout;
use crate::store::etcd::request::{
    DELETE_RANGE, LEASE_GRANT, LEASE_KEEPALIVE, LEASE_REVOKE, PUT, RANGE, TXN,
};
use crate::store::etcd::wire::{
    Compare, CompareResult, CompareTarget, DeleteRangeRequest, DeleteRangeResponse, ErrorOut,
    KeepAliveAnswer, Kv, LeaseRequest, LeaseResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    lease: i64,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    ttl_s: i64,
    expires_ms: u64,
}

#[derive(Debug, Default)]
struct State {
    kv: BTreeMap<Vec<u8>, Entry>,
    revision: i64,
    leases: BTreeMap<i64, Lease>,
    next_lease: i64,
}

/// Why a request was refused: (HTTP status, gRPC code, message).
type Refusal = (u16, i64, &'static str);

const LEASE_NOT_FOUND: Refusal = (404, 5, "etcdserver: requested lease not found");

#[derive(Debug, Default)]
pub struct SimEtcd {
    state: RefCell<State>,
}

fn json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn refused((status, code, message): Refusal) -> (u16, Vec<u8>) {
    let body = ErrorOut {
        error: message.to_string(),
        code,
        message: message.to_string(),
    };
    (status, json(&body))
}

fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        return key == start;
    }
    key >= start && (end == [0] || key < end)
}

impl SimEtcd {
    /// A fresh etcd: at revision 1, as a new cluster is.
    pub fn new() -> SimEtcd {
        let etcd = SimEtcd::default();
        etcd.state.borrow_mut().revision = 1;
        etcd
    }

    /// Answers one gateway call at `now_ms` (leases past their time expire first).
    pub fn answer(&self, call: &Callout, now_ms: u64) -> (u16, Vec<u8>) {
        self.expire(now_ms);
        let path = call
            .headers
            .iter()
            .find(|(k, _)| k == ":path")
            .map_or("", |(_, v)| v.as_str());
        let body = &call.body;
        let bad = || (400, b"{\"error\":\"bad request\",\"code\":3}".to_vec());
        match path {
            RANGE => serde_json::from_slice(body)
                .map_or_else(|_| bad(), |r| (200, json(&self.range(&r)))),
            PUT => match serde_json::from_slice::<PutRequest>(body) {
                Ok(p) => match self.write(|s| s.put(&p)) {
                    Ok(()) => (200, json(&self.header_only())),
                    Err(r) => refused(r),
                },
                Err(_) => bad(),
            },
            DELETE_RANGE => match serde_json::from_slice::<DeleteRangeRequest>(body) {
                Ok(d) => {
                    let deleted = self.write(|s| Ok(s.delete(&d))).unwrap_or(0);
                    let answer = DeleteRangeResponse {
                        header: self.header(),
                        deleted,
                    };
                    (200, json(&answer))
                }
                Err(_) => bad(),
            },
            TXN => match serde_json::from_slice::<TxnRequest>(body) {
                Ok(t) => match self.txn(&t) {
                    Ok(answer) => (200, json(&answer)),
                    Err(r) => refused(r),
                },
                Err(_) => bad(),
            },
            LEASE_GRANT => match serde_json::from_slice::<LeaseRequest>(body) {
                Ok(l) => (200, json(&self.grant(l.id, l.ttl, now_ms))),
                Err(_) => bad(),
            },
            LEASE_KEEPALIVE => match serde_json::from_slice::<LeaseRequest>(body) {
                Ok(l) => (200, json(&self.keep_alive(l.id, now_ms))),
                Err(_) => bad(),
            },
            LEASE_REVOKE => match serde_json::from_slice::<LeaseRequest>(body) {
                Ok(l) => match self.revoke(l.id) {
                    true => (200, json(&self.header_only())),
                    false => refused(LEASE_NOT_FOUND),
                },
                Err(_) => bad(),
            },
            _ => (404, b"Not Found".to_vec()),
        }
    }

    fn header(&self) -> ResponseHeader {
        ResponseHeader {
            revision: self.state.borrow().revision,
        }
    }

    fn header_only(&self) -> PutResponse {
        PutResponse {
            header: self.header(),
        }
    }

    /// Runs one write request: its writes share one new revision, if any.
    fn write<T>(&self, f: impl FnOnce(&mut Writer) -> Result<T, Refusal>) -> Result<T, Refusal> {
        let mut state = self.state.borrow_mut();
        let mut w = Writer {
            revision: state.revision + 1,
            wrote: false,
            state: &mut state,
        };
        let out = f(&mut w)?;
        if w.wrote {
            let revision = w.revision;
            state.revision = revision;
        }
        Ok(out)
    }

    fn range(&self, r: &RangeRequest) -> RangeResponse {
        let state = self.state.borrow();
        let matched: Vec<Kv> = state
            .kv
            .iter()
            .filter(|(k, _)| in_range(k, &r.key, &r.range_end))
            .map(|(k, e)| Kv {
                key: k.clone(),
                create_revision: e.create_revision,
                mod_revision: e.mod_revision,
                version: e.version,
                value: e.value.clone(),
                lease: e.lease,
            })
            .collect();
        let count = i64::try_from(matched.len()).unwrap_or(i64::MAX);
        let limit = usize::try_from(r.limit).unwrap_or(0);
        let more = limit > 0 && matched.len() > limit;
        let kvs = match (r.count_only, limit) {
            (true, _) => Vec::new(),
            (false, 0) => matched,
            (false, n) => matched.into_iter().take(n).collect(),
        };
        RangeResponse {
            header: ResponseHeader {
                revision: state.revision,
            },
            kvs,
            more,
            count,
        }
    }

    fn holds(&self, c: &Compare) -> bool {
        let state = self.state.borrow();
        let entry = state.kv.get(&c.key);
        let order = match (&c.target, entry) {
            // etcd: a value compared on a missing key always fails.
            (CompareTarget::Value { .. }, None) => return false,
            (CompareTarget::Value { value }, Some(e)) => e.value.as_slice().cmp(value.as_slice()),
            (CompareTarget::Version { version }, e) => e.map_or(0, |e| e.version).cmp(version),
            (CompareTarget::CreateRevision { create_revision }, e) => {
                e.map_or(0, |e| e.create_revision).cmp(create_revision)
            }
            (CompareTarget::ModRevision { mod_revision }, e) => {
                e.map_or(0, |e| e.mod_revision).cmp(mod_revision)
            }
            (CompareTarget::Lease { lease }, e) => e.map_or(0, |e| e.lease).cmp(lease),
        };
        match c.result {
            CompareResult::Equal => order.is_eq(),
            CompareResult::NotEqual => order.is_ne(),
            CompareResult::Greater => order.is_gt(),
            CompareResult::Less => order.is_lt(),
        }
    }

    fn txn(&self, t: &TxnRequest) -> Result<TxnResponse, Refusal> {
        let succeeded = t.compare.iter().all(|c| self.holds(c));
        let ops = if succeeded { &t.success } else { &t.failure };
        // Ranges see the store before this txn's writes, as in etcd when a
        // txn does not read what it writes (the store's txns never do).
        let mut responses = Vec::with_capacity(ops.len());
        let reads: Vec<Option<RangeResponse>> = ops
            .iter()
            .map(|op| match op {
                RequestOp::RequestRange(r) => Some(self.range(r)),
                _ => None,
            })
            .collect();
        let unknown_lease = ops.iter().any(|op| {
            matches!(op, RequestOp::RequestPut(p) if p.lease != 0
                && !self.state.borrow().leases.contains_key(&p.lease))
        });
        if unknown_lease {
            // Refused whole, as etcd checks a txn before applying any of it.
            return Err(LEASE_NOT_FOUND);
        }
        let deleted = self.write(|w| {
            let mut deleted = Vec::new();
            for op in ops {
                match op {
                    RequestOp::RequestPut(p) => w.put(p)?,
                    RequestOp::RequestDeleteRange(d) => deleted.push(w.delete(d)),
                    RequestOp::RequestRange(_) => {}
                }
            }
            Ok(deleted)
        })?;
        let header = self.header();
        let mut deleted = deleted.into_iter();
        for (op, read) in ops.iter().zip(reads) {
            responses.push(match (op, read) {
                (_, Some(mut r)) => {
                    r.header = header.clone();
                    ResponseOp::ResponseRange(r)
                }
                (RequestOp::RequestDeleteRange(_), _) => {
                    ResponseOp::ResponseDeleteRange(DeleteRangeResponse {
                        header: header.clone(),
                        deleted: deleted.next().unwrap_or(0),
                    })
                }
                _ => ResponseOp::ResponsePut(PutResponse {
                    header: header.clone(),
                }),
            });
        }
        Ok(TxnResponse {
            header,
            succeeded,
            responses,
        })
    }

    /// A new lease: `id` if asked for (0: etcd picks one).
    fn grant(&self, id: i64, ttl_s: i64, now_ms: u64) -> LeaseResponse {
        let mut state = self.state.borrow_mut();
        state.next_lease += 1;
        let id = if id != 0 {
            id
        } else {
            0x7000_0000 + state.next_lease
        };
        let ttl_s = ttl_s.max(1);
        let expires_ms = now_ms.saturating_add(u64::try_from(ttl_s).unwrap_or(0) * 1000);
        state.leases.insert(id, Lease { ttl_s, expires_ms });
        LeaseResponse {
            header: ResponseHeader {
                revision: state.revision,
            },
            id,
            ttl: ttl_s,
        }
    }

    fn keep_alive(&self, id: i64, now_ms: u64) -> KeepAliveAnswer {
        let mut state = self.state.borrow_mut();
        let revision = state.revision;
        let ttl = match state.leases.get_mut(&id) {
            Some(lease) => {
                lease.expires_ms =
                    now_ms.saturating_add(u64::try_from(lease.ttl_s).unwrap_or(0) * 1000);
                lease.ttl_s
            }
            None => 0,
        };
        KeepAliveAnswer {
            result: Some(LeaseResponse {
                header: ResponseHeader { revision },
                id,
                ttl,
            }),
        }
    }

    fn revoke(&self, id: i64) -> bool {
        let known = self.state.borrow_mut().leases.remove(&id).is_some();
        if known {
            self.drop_keys_of(&[id]);
        }
        known
    }

    /// Ends every lease past its time, and their keys with them.
    pub fn expire(&self, now_ms: u64) {
        let gone: Vec<i64> = {
            let mut state = self.state.borrow_mut();
            let gone: Vec<i64> = state
                .leases
                .iter()
                .filter(|(_, l)| now_ms >= l.expires_ms)
                .map(|(id, _)| *id)
                .collect();
            for id in &gone {
                state.leases.remove(id);
            }
            gone
        };
        if !gone.is_empty() {
            self.drop_keys_of(&gone);
        }
    }

    fn drop_keys_of(&self, leases: &[i64]) {
        let _ = self.write(|w| {
            let keys: Vec<Vec<u8>> = w
                .state
                .kv
                .iter()
                .filter(|(_, e)| leases.contains(&e.lease))
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                w.state.kv.remove(&k);
                w.wrote = true;
            }
            Ok(())
        });
    }

    /// The keys under `prefix`, as text (for tests).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.state
            .borrow()
            .kv
            .keys()
            .filter(|k| k.starts_with(prefix.as_bytes()))
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }
}

/// The writes of one request, at one revision.
struct Writer<'a> {
    state: &'a mut State,
    revision: i64,
    wrote: bool,
}

impl Writer<'_> {
    fn put(&mut self, p: &PutRequest) -> Result<(), Refusal> {
        if p.lease != 0 && !self.state.leases.contains_key(&p.lease) {
            return Err(LEASE_NOT_FOUND);
        }
        let revision = self.revision;
        let entry = self.state.kv.entry(p.key.clone()).or_insert(Entry {
            value: Vec::new(),
            create_revision: revision,
            mod_revision: revision,
            version: 0,
            lease: 0,
        });
        entry.value = p.value.clone();
        entry.mod_revision = revision;
        entry.version += 1;
        entry.lease = p.lease;
        self.wrote = true;
        Ok(())
    }

    fn delete(&mut self, d: &DeleteRangeRequest) -> i64 {
        let keys: Vec<Vec<u8>> = self
            .state
            .kv
            .keys()
            .filter(|k| in_range(k, &d.key, &d.range_end))
            .cloned()
            .collect();
        for k in &keys {
            self.state.kv.remove(k);
        }
        self.wrote |= !keys.is_empty();
        i64::try_from(keys.len()).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::etcd::request::Request;
    use serde_json::Value;

    const FIXTURES: &str = include_str!("../../../../tests/fixtures/etcd/requests.json");

    fn subset(expected: &Value, actual: &Value, at: &str) {
        match expected {
            Value::Object(m) => {
                for (k, v) in m {
                    subset(v, &actual[k], &format!("{at}.{k}"));
                }
            }
            Value::Array(items) => {
                let got = actual
                    .as_array()
                    .unwrap_or_else(|| panic!("{at}: {actual}"));
                assert_eq!(got.len(), items.len(), "{at}: {actual}");
                for (i, (e, a)) in items.iter().zip(got).enumerate() {
                    subset(e, a, &format!("{at}.{i}"));
                }
            }
            _ => assert_eq!(actual, expected, "{at}"),
        }
    }

    fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
        path.split('.').fold(v, |v, p| match p.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[p],
        })
    }

    /// Every request the store's builders make, answered as real etcd 3.4
    /// answered it (the recorded answers of the fixture).
    #[test]
    fn answers_as_real_etcd_does() {
        let doc: Value = serde_json::from_str(FIXTURES).unwrap();
        let etcd = SimEtcd::new();
        let call = |path: &'static str, body: &Value| {
            let request = Request {
                path,
                body: serde_json::to_vec(body).unwrap(),
            };
            etcd.answer(&request.callout("etcd", "etcd", 1000), 0)
        };
        let (status, _) = call("/v3/lease/grant", &doc["preset_lease"]);
        assert_eq!(status, 200);
        for step in doc["steps"].as_array().unwrap() {
            let name = step["name"].as_str().unwrap();
            let path: &'static str = match step["path"].as_str().unwrap() {
                "/v3/kv/range" => RANGE,
                "/v3/kv/put" => PUT,
                "/v3/kv/deleterange" => DELETE_RANGE,
                "/v3/kv/txn" => TXN,
                "/v3/lease/grant" => LEASE_GRANT,
                "/v3/lease/keepalive" => LEASE_KEEPALIVE,
                "/v3/lease/revoke" => LEASE_REVOKE,
                other => panic!("{other}"),
            };
            let (status, body) = call(path, &step["body"]);
            assert_eq!(
                u64::from(status),
                step["status"].as_u64().unwrap(),
                "{name}"
            );
            let answer: Value = serde_json::from_slice(&body).unwrap();
            subset(&step["expect"], &answer, name);
            for path in step["absent"].as_array().unwrap() {
                let path = path.as_str().unwrap();
                assert!(at(&answer, path).is_null(), "{name}: {path} in {answer}");
            }
            for path in step["present"].as_array().into_iter().flatten() {
                let path = path.as_str().unwrap();
                assert!(
                    !at(&answer, path).is_null(),
                    "{name}: no {path} in {answer}"
                );
            }
        }
    }

    #[test]
    fn a_lease_that_lapses_takes_its_keys() {
        let etcd = SimEtcd::new();
        let call = |r: Request, now| etcd.answer(&r.callout("etcd", "etcd", 1000), now);
        let (_, grant) = call(crate::store::etcd::request::lease_grant(10), 0);
        let id = crate::store::etcd::response::parse_lease_grant(&grant)
            .unwrap()
            .id;
        call(crate::store::etcd::request::put(b"/k", b"v", Some(id)), 0);
        call(crate::store::etcd::request::lease_keepalive(id), 9_000);
        assert_eq!(etcd.keys("/"), vec!["/k"], "kept alive");
        etcd.expire(18_999);
        assert_eq!(etcd.keys("/").len(), 1);
        etcd.expire(19_000);
        assert!(etcd.keys("/").is_empty(), "gone with its lease");
        let (_, alive) = call(crate::store::etcd::request::lease_keepalive(id), 19_000);
        assert_eq!(
            crate::store::etcd::response::parse_lease_keepalive(&alive).unwrap(),
            None
        );
    }
}
