//! `SharedData` over Envoy's shared data, without the SDK's panicking wrappers.

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::store::{SetError, SharedData, Versioned};

pub struct EnvoySharedData;

impl SharedData for EnvoySharedData {
    fn get(&self, key: &str) -> Result<Versioned, String> {
        match hostcalls::get_shared_data(key) {
            Ok((value, cas)) => Ok((value.unwrap_or_default(), cas.unwrap_or(0))),
            Err(Status::NotFound) => Ok((Vec::new(), 0)),
            Err(e) => Err(format!("get_shared_data({key}): {e:?}")),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        let cas = (cas != 0).then_some(cas);
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SetError::CasMismatch),
            Err(e) => Err(SetError::Host(format!("set_shared_data({key}): {e:?}"))),
        }
    }
}
