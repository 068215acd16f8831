//! The Envoy side of the async speech filter: `Host` over proxy-wasm, and the
//! contexts that turn Envoy's callbacks into calls of the core
//! (`async_speech_core`), which decides everything.
#![cfg(target_arch = "wasm32")]

mod envoy;
mod http;
mod metrics;
mod root;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::Root::default())
    });
}}
