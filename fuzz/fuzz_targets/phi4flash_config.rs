//! Phi-4-mini-flash `config.json` parsing and validation: any bytes must give a config or a
//! typed error, and a config that validates must have a catalogue whose sizes do not overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = yoco::Phi4FlashConfig::from_json(text) else {
        return;
    };
    // `from_json` validates; everything derived from a valid config must be computable.
    let _ = cfg.n_params();
    let _ = cfg.parameters(true);
    for i in 0..cfg.num_hidden_layers {
        let _ = cfg.role(i);
    }
});
