//! `params.json` parsing and validation: any bytes must give a `Config` or a typed error, and a
//! config that validates must have derived sizes that do not overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = yoco::Config::from_json(text) else {
        return;
    };
    // `from_json` validates; everything derived from a valid config must be computable.
    let _ = cfg.n_params();
    let _ = cfg.cache_bytes_per_token(4);
    let _ = cfg.transformer_cache_bytes_per_token(4);
    let _ = cfg.self_state_bytes(4);
    let _ = cfg.parameters();
    if let Ok(json) = cfg.to_json() {
        // What we write must read back as the same config, except the reference's fields that
        // are accepted and ignored (not written back).
        let mut written = cfg.clone();
        written.max_batch_size = None;
        written.max_seq_len = None;
        written.model_parallel_size = None;
        written.load_checkpoint = None;
        assert_eq!(yoco::Config::from_json(&json).ok(), Some(written));
    }
});
