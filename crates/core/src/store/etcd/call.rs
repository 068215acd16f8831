//! One call to etcd, made again on another member while the store's
//! `timeout_ms` allows, when it got no usable answer: no answer at all
//! (reset, timeout), Envoy's own error reply (no healthy member), or etcd's
//! "unavailable" (a member without a leader). Envoy's load balancer picks the
//! member of each try. A try gets half of the time left, so that a member
//! that hangs still leaves time for another.

use super::config::EtcdConfig;
use super::request::Request;
use super::response::{check_status, EtcdError};
use crate::engine::attempt::envoy_reply;
use crate::platform::Callout;
use crate::store::work::StoreAnswer;

/// Tries of one call at most.
const MAX_TRIES: u32 = 3;
/// A try is given at least this long (or what is left, if less).
const MIN_TRY_MS: u64 = 100;

/// A call under way: what to send again, and since when it has been tried.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdCall {
    pub request: Request,
    pub first_ms: u64,
    pub tries: u32,
}

/// What became of a call's answer.
#[derive(Debug)]
pub enum Answered<'a> {
    /// etcd's answer (HTTP 200).
    Body(&'a [u8]),
    /// Make it again (perhaps on another member).
    Again(Callout, EtcdCall),
    /// No usable answer within the store's timeout; or etcd refused it.
    Failed(EtcdError),
}

impl EtcdConfig {
    fn try_timeout(&self, elapsed_ms: u64, tries: u32) -> u64 {
        let left = self.timeout_ms.saturating_sub(elapsed_ms).max(1);
        if tries + 1 >= MAX_TRIES || left <= 2 * MIN_TRY_MS {
            left
        } else {
            (left / 2).max(MIN_TRY_MS)
        }
    }

    /// The first try of `request`.
    pub fn call(&self, request: Request, now_ms: u64) -> (Callout, EtcdCall) {
        let callout = request.callout(&self.cluster, &self.authority, self.try_timeout(0, 0));
        let call = EtcdCall {
            request,
            first_ms: now_ms,
            tries: 1,
        };
        (callout, call)
    }

    /// Reads a call's answer: the body, another try, or the failure.
    pub fn answered<'a>(
        &self,
        call: EtcdCall,
        answer: &'a StoreAnswer,
        now_ms: u64,
    ) -> Answered<'a> {
        let error = match answer {
            Some((status, body)) => match check_status(*status, body) {
                Ok(body) => return Answered::Body(body),
                Err(_) if envoy_reply(*status, body).is_some() => EtcdError::Status(*status),
                Err(e) => e,
            },
            None => EtcdError::Status(0),
        };
        let elapsed = now_ms.saturating_sub(call.first_ms);
        let unusable = matches!(error, EtcdError::Status(0)) || error.is_unavailable();
        if !unusable || call.tries >= MAX_TRIES || elapsed >= self.timeout_ms {
            return Answered::Failed(error);
        }
        let timeout = self.try_timeout(elapsed, call.tries);
        let callout = call
            .request
            .callout(&self.cluster, &self.authority, timeout);
        let again = EtcdCall {
            tries: call.tries + 1,
            ..call
        };
        Answered::Again(callout, again)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::etcd::request;

    fn config() -> EtcdConfig {
        match super::super::parse_store_config(Some(
            &serde_json::json!({"type": "etcd", "cluster": "etcd", "timeout_ms": 2000}),
        )) {
            Ok(super::super::StoreConfig::Etcd(e)) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unusable_answer_is_tried_again_within_the_timeout_and_a_real_one_is_not() {
        let etcd = config();
        let (first, call) = etcd.call(request::range(b"k"), 0);
        assert_eq!(
            first.timeout_ms, 1000,
            "half the budget, so another member has time"
        );
        let reset: StoreAnswer = None;
        let Answered::Again(second, call) = etcd.answered(call, &reset, 1000) else {
            panic!("a reset is tried again")
        };
        assert_eq!(second.timeout_ms, 500, "half of what is left");
        let no_leader: StoreAnswer = Some((
            503,
            br#"{"error":"etcdserver: no leader","code":14}"#.to_vec(),
        ));
        let Answered::Again(third, last) = etcd.answered(call.clone(), &no_leader, 1500) else {
            panic!("no leader is tried again")
        };
        assert_eq!(third.timeout_ms, 500, "what is left goes to the last try");
        assert!(
            matches!(etcd.answered(last, &reset, 1900), Answered::Failed(_)),
            "three tries at most"
        );
        let envoy: StoreAnswer = Some((503, b"no healthy upstream".to_vec()));
        assert!(matches!(
            etcd.answered(call.clone(), &envoy, 1500),
            Answered::Again(..)
        ));
        assert!(
            matches!(
                etcd.answered(call.clone(), &reset, 2000),
                Answered::Failed(_)
            ),
            "out of time"
        );
        let refused: StoreAnswer = Some((
            400,
            br#"{"error":"etcdserver: request is too large","code":3}"#.to_vec(),
        ));
        assert!(matches!(
            etcd.answered(call.clone(), &refused, 1500),
            Answered::Failed(_)
        ));
        let ok: StoreAnswer = Some((200, b"{}".to_vec()));
        assert!(matches!(
            etcd.answered(call, &ok, 1500),
            Answered::Body(b"{}")
        ));
    }
}
