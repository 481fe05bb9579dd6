//! Entry points for the crate's own benchmarks (`benches/`), which see only the public API:
//! not a stable interface.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::Tensor;

use crate::kernels::isa::{Isa, Level};
use crate::Result;

/// `x W^T` through the CPU decode kernel of quantized projections (what a quantized linear
/// layer runs for up to 64 rows), on the instruction set the kernels run on (see
/// [`active_isa`]); `None` where that kernel declines the case.
pub fn quantized_decode(x: &Tensor, w: &Arc<QTensor>) -> Result<Option<Tensor>> {
    crate::kernels::quantized::qgemv_cpu(x, std::slice::from_ref(w))
}

/// The instruction set the CPU kernels run on: `"avx512"`, `"avx2"` or `"portable"` (the CPU's
/// best, lowered by the environment variable `YOCO_CPU_ISA`).
pub fn active_isa() -> &'static str {
    match Isa::active().level() {
        Level::Avx512 => "avx512",
        Level::Avx2 => "avx2",
        Level::Portable => "portable",
    }
}
