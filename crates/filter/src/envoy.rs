//! `Host` over proxy-wasm's host calls, without the SDK's panicking wrappers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, Status};

use async_speech_core::engine::CallAnswer;
use async_speech_core::ids::Drbg;
use async_speech_core::platform::{header_pairs, Callout, Host, Queue, SetError};

/// Queue ids by queue, registered by the root context and shared with its
/// HTTP contexts.
pub type QueueIds = Rc<RefCell<HashMap<Queue, u32>>>;

pub struct EnvoyHost {
    pub queues: QueueIds,
    /// Seeded from the secure source on first use (see `Drbg`).
    pub random: RefCell<Option<Drbg>>,
    /// The filter's namespace, prefixed to queue names.
    pub namespace: Rc<str>,
}

impl EnvoyHost {
    /// Registers `queues` from this root context; the last registrant of a
    /// queue is the one Envoy notifies.
    pub fn register(&self, queues: Vec<Queue>) -> Result<(), String> {
        let mut ids = self.queues.borrow_mut();
        for q in queues {
            let id = hostcalls::register_shared_queue(&q.name(&self.namespace))
                .map_err(|e| format!("cannot register queue {q:?}: {e:?}"))?;
            ids.insert(q, id);
        }
        Ok(())
    }

    fn queue_id(&self, queue: &Queue) -> Result<u32, String> {
        self.queues
            .borrow()
            .get(queue)
            .copied()
            .ok_or_else(|| format!("queue {queue:?} is not registered"))
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
}

/// Every header of a map, in one host call, as raw bytes: unlike the SDK's
/// reader, a name that is not UTF-8 cannot panic here.
pub fn all_headers(map: MapType) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host allocates the map through the SDK's exported
    // allocator and hands it over; it is read once and freed here.
    let bytes = unsafe {
        match proxy_get_header_map_pairs(map, &mut data, &mut size) {
            Status::Ok if !data.is_null() => Vec::from_raw_parts(data, size, size),
            _ => return Vec::new(),
        }
    };
    header_pairs(&bytes)
}

/// A callout's answer: its status (none if it failed) and body (not read
/// when larger than `limit`).
pub fn callout_answer(num_headers: usize, body_size: usize, limit: usize) -> CallAnswer {
    // A failed callout has no headers; asking for ":status" then would panic in the SDK.
    let status = (num_headers > 0)
        .then(|| hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status"))
        .and_then(|v| v.ok().flatten())
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| s.parse::<u16>().ok());
    let too_large = body_size > limit;
    let body = if body_size > 0 && !too_large {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    CallAnswer {
        status,
        body,
        body_size,
        too_large,
    }
}

impl Host for EnvoyHost {
    fn wall_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    fn random(&self, buf: &mut [u8]) -> Result<(), String> {
        let mut random = self.random.borrow_mut();
        if random.is_none() {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| e.to_string())?;
            *random = Some(Drbg::new(seed));
        }
        if let Some(drbg) = random.as_mut() {
            drbg.fill(buf);
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, String> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), cas)) => Ok(Some((value, cas.unwrap_or(0)))),
            Ok((None, _)) | Err(Status::NotFound) => Ok(None),
            Err(e) => Err(format!("get_shared_data: {e:?}")),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SetError::CasMismatch),
            Err(e) => Err(SetError::Host(format!("set_shared_data: {e:?}"))),
        }
    }

    fn enqueue(&self, queue: &Queue, item: &[u8]) -> Result<(), String> {
        hostcalls::enqueue_shared_queue(self.queue_id(queue)?, Some(item))
            .map_err(|e| format!("enqueue: {e:?}"))
    }

    fn dequeue(&self, queue: &Queue) -> Result<Option<Vec<u8>>, String> {
        hostcalls::dequeue_shared_queue(self.queue_id(queue)?)
            .map_err(|e| format!("dequeue: {e:?}"))
    }

    fn dispatch(&self, call: &Callout) -> Result<u32, String> {
        let headers: Vec<(&str, &str)> = call
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        hostcalls::dispatch_http_call(
            &call.cluster,
            headers,
            Some(&call.body),
            vec![],
            Duration::from_millis(call.timeout_ms.max(1)),
        )
        .map_err(|e| format!("{e:?}"))
    }
}
