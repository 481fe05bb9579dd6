//! Choosing a device and a dtype by name (for command-line tools and configs).

use candle_core::{DType, Device};

use crate::{Error, Result};

/// `"cpu"`, `"cuda"` or `"cuda:N"`. CUDA needs a build with the `cuda` feature and a GPU;
/// otherwise this is an [`Error::Device`] that says which is missing, never a silent CPU fallback.
pub fn device_by_name(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        _ if name == "cuda" || name.starts_with("cuda:") => {
            let ordinal = match name.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| Error::Device(format!("bad CUDA device `{name}`")))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::Device(
                    "CUDA requested, but this build of yoco has no CUDA support (build with `--features cuda`)".into(),
                ));
            }
            Device::new_cuda(ordinal)
                .map_err(|e| Error::Device(format!("cannot open CUDA device {ordinal}: {e}")))
        }
        _ => Err(Error::Device(format!(
            "unknown device `{name}` (use cpu, cuda or cuda:N)"
        ))),
    }
}

/// `"f32"`, `"bf16"` or `"f16"`.
pub fn dtype_by_name(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => Err(Error::Device(format!(
            "unknown dtype `{name}` (use f32, bf16 or f16)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_devices_and_dtypes() {
        assert!(matches!(device_by_name("cpu"), Ok(Device::Cpu)));
        assert!(matches!(device_by_name("tpu"), Err(Error::Device(_))));
        assert!(matches!(dtype_by_name("bf16"), Ok(DType::BF16)));
        assert!(matches!(dtype_by_name("f8"), Err(Error::Device(_))));
        #[cfg(not(feature = "cuda"))]
        assert!(
            matches!(device_by_name("cuda"), Err(Error::Device(m)) if m.contains("--features cuda"))
        );
    }
}
