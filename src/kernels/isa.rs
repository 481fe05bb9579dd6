//! Which x86 instruction set the CPU kernels run on, decided at run time.
//!
//! Every kernel in [`super`] that has SIMD forms takes an [`Isa`] and matches on its
//! [`Level`]; the model's path passes [`Isa::active`]: the best this CPU has, lowered by the
//! environment variable `YOCO_CPU_ISA` if it is set when the first kernel runs (read once):
//!
//! * `avx512`: AVX-512 where the CPU has it (the default: the CPU's best);
//! * `avx2`: the AVX2 (with FMA and F16C) forms even on an AVX-512 CPU, so that one machine can
//!   test and measure the kernels an AVX2-only CPU runs;
//! * `avx2-vnni`: the same with AVX-VNNI's byte dot products where the CPU has them (the
//!   default on AVX2 CPUs that have them, Intel's since Alder Lake);
//! * `portable`: no SIMD intrinsics of this crate (candle's own dot products and plain Rust).
//!
//! A level above what the CPU has is lowered to what it has. Tests do not set the variable:
//! they take every level of [`Isa::supported`] and pass each to the kernels' internal entry
//! points, so that parallel tests cannot race on a global.
//!
//! An [`Isa`] can only be made here, never above what the CPU has, so the kernels' unsafe SIMD
//! calls may rely on its level.

use std::sync::OnceLock;

/// An instruction-set level, from least to most capable.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum Level {
    /// No SIMD intrinsics of this crate.
    Portable,
    /// AVX2, FMA and F16C.
    Avx2,
    /// AVX-512F and AVX-512BW, with everything of [`Level::Avx2`].
    Avx512,
}

impl Level {
    /// The level named by `YOCO_CPU_ISA`'s value, `None` for anything else.
    fn parse(name: &str) -> Option<Level> {
        match name.trim().to_ascii_lowercase().as_str() {
            "avx512" | "avx-512" => Some(Level::Avx512),
            "avx2" => Some(Level::Avx2),
            "portable" | "none" | "scalar" => Some(Level::Portable),
            _ => None,
        }
    }
}

/// A [`Level`] this CPU has, and at [`Level::Avx2`] whether the kernels may take AVX-VNNI
/// (never set where the CPU lacks it): proof, for the kernels' unsafe calls, that their
/// instructions run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Isa(Level, bool);

impl Isa {
    /// The level, to dispatch on.
    pub(crate) fn level(self) -> Level {
        self.0
    }

    /// The best level this CPU has (checked once).
    pub(crate) fn cpu() -> Isa {
        static CPU: OnceLock<Level> = OnceLock::new();
        let level = *CPU.get_or_init(detect);
        Isa(level, level == Level::Avx2 && has_avx_vnni())
    }

    /// What the kernels use: [`Isa::cpu`], lowered by `YOCO_CPU_ISA` (read once).
    pub(crate) fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let cpu = Isa::cpu();
            match std::env::var("YOCO_CPU_ISA") {
                Ok(name) => cpu.lowered_to(&name).unwrap_or_else(|| {
                    // A typo must not silently test the wrong kernels.
                    eprintln!(
                        "yoco: YOCO_CPU_ISA={name:?} is not avx512, avx2-vnni, avx2 or portable; \
                         using {:?}",
                        cpu.level()
                    );
                    cpu
                }),
                Err(_) => cpu,
            }
        })
    }

    /// This `Isa` lowered as `YOCO_CPU_ISA=name` asks (empty or `native`: as it is); `None`
    /// for a name that is no level.
    fn lowered_to(self, name: &str) -> Option<Isa> {
        let name = name.trim().to_ascii_lowercase();
        match name.as_str() {
            "" | "native" => Some(self),
            "avx2-vnni" | "avx-vnni" | "avxvnni" => Some(self.at_most(Level::Avx2).with_avx_vnni()),
            _ => Level::parse(&name).map(|level| self.at_most(level)),
        }
    }

    /// Whether this is [`Level::Avx512`] on a CPU with AVX-512 VNNI and VL (`vpdpbusd` on 256-bit
    /// registers: a byte dot product in one instruction where AVX2 takes two).
    pub(crate) fn vnni(self) -> bool {
        static VNNI: OnceLock<bool> = OnceLock::new();
        self.0 == Level::Avx512
            && *VNNI.get_or_init(|| {
                #[cfg(target_arch = "x86_64")]
                {
                    std::arch::is_x86_feature_detected!("avx512vnni")
                        && std::arch::is_x86_feature_detected!("avx512vl")
                }
                #[cfg(not(target_arch = "x86_64"))]
                false
            })
    }

    /// This level, or `level` if that is lower (always one the CPU has); AVX2 without
    /// AVX-VNNI when that is `level`.
    pub(crate) fn at_most(self, level: Level) -> Isa {
        if level < self.0 || level == Level::Avx2 {
            Isa(self.0.min(level), false)
        } else {
            self
        }
    }

    /// At [`Level::Avx2`], with AVX-VNNI where the CPU has it; other levels as they are.
    pub(crate) fn with_avx_vnni(self) -> Isa {
        Isa(self.0, self.0 == Level::Avx2 && has_avx_vnni())
    }

    /// Whether this is [`Level::Avx2`] with AVX-VNNI (`vpdpbusd` on 256-bit registers in the
    /// VEX encoding, as AVX2-only Intel CPUs since Alder Lake have it).
    pub(crate) fn avx_vnni(self) -> bool {
        self.0 == Level::Avx2 && self.1
    }

    /// Every level this CPU has, lowest first (for tests and benchmarks of each kernel).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn supported() -> Vec<Isa> {
        let cpu = Isa::cpu().level();
        let mut all: Vec<Isa> = [Level::Portable, Level::Avx2, Level::Avx512]
            .into_iter()
            .filter(|&l| l <= cpu)
            .map(|l| Isa(l, false))
            .collect();
        if cpu >= Level::Avx2 && has_avx_vnni() {
            all.insert(2, Isa(Level::Avx2, true));
        }
        all
    }
}

/// Whether the CPU is AMD's (checked once): its hardware prefetcher keeps one row's f32 stream
/// fed, where Intel's needed hints (see `gemv`'s `PREFETCH_AHEAD`).
pub(crate) fn amd() -> bool {
    static AMD: OnceLock<bool> = OnceLock::new();
    *AMD.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `cpuid` leaf 0 exists on every x86-64 CPU; it only reads the vendor.
            #[allow(unused_unsafe)]
            let id = unsafe { std::arch::x86_64::__cpuid(0) };
            // "AuthenticAMD" in EBX, EDX, ECX.
            id.ebx == u32::from_le_bytes(*b"Auth")
                && id.edx == u32::from_le_bytes(*b"enti")
                && id.ecx == u32::from_le_bytes(*b"cAMD")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether the CPU has AVX-VNNI (checked once).
fn has_avx_vnni() -> bool {
    static AVX_VNNI: OnceLock<bool> = OnceLock::new();
    *AVX_VNNI.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avxvnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// The best level of this CPU.
fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma") && has!("f16c");
        if avx2 && has!("avx512f") && has!("avx512bw") {
            Level::Avx512
        } else if avx2 {
            Level::Avx2
        } else {
            Level::Portable
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    Level::Portable
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vendor read by `cpuid` is the one Linux reports.
    #[test]
    fn amd_is_what_the_kernel_reports() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        let vendor = info
            .lines()
            .find(|l| l.starts_with("vendor_id"))
            .and_then(|l| l.split(':').nth(1))
            .map(str::trim);
        if let Some(vendor) = vendor {
            assert_eq!(amd(), vendor == "AuthenticAMD", "{vendor}");
        }
    }

    #[test]
    fn levels_parse_and_never_exceed_the_cpu() {
        assert_eq!(Level::parse("AVX2"), Some(Level::Avx2));
        assert_eq!(Level::parse(" avx512 "), Some(Level::Avx512));
        assert_eq!(Level::parse("portable"), Some(Level::Portable));
        assert_eq!(Level::parse("sse9"), None);
        let cpu = Isa::cpu();
        assert!(Isa::active().level() <= cpu.level());
        assert_eq!(cpu.at_most(Level::Avx512), cpu);
        assert_eq!(cpu.at_most(Level::Portable).level(), Level::Portable);
        let all = Isa::supported();
        assert_eq!(all.first().map(|i| i.level()), Some(Level::Portable));
        assert_eq!(all.last(), Some(&cpu));
        // What `YOCO_CPU_ISA` asks for, never above the CPU.
        assert_eq!(cpu.lowered_to(" Native "), Some(cpu));
        assert_eq!(cpu.lowered_to(""), Some(cpu));
        assert_eq!(cpu.lowered_to("sse9"), None);
        assert_eq!(cpu.lowered_to("AVX512"), Some(cpu));
        assert_eq!(
            cpu.lowered_to("portable").map(|i| i.level()),
            Some(Level::Portable)
        );
        let avx2 = cpu.lowered_to("avx2");
        assert_eq!(avx2.map(|i| i.level()), Some(cpu.level().min(Level::Avx2)));
        assert_eq!(avx2.map(|i| i.avx_vnni()), Some(false));
        let vnni = cpu.lowered_to("avx2-vnni");
        assert_eq!(vnni.map(|i| i.level()), Some(cpu.level().min(Level::Avx2)));
        assert_eq!(
            vnni.map(|i| i.avx_vnni()),
            Some(cpu.level() >= Level::Avx2 && has_avx_vnni())
        );
        // AVX-VNNI only at the AVX2 level and only where the CPU has it; `avx2` means without.
        assert!(all.iter().all(|i| !i.avx_vnni() || has_avx_vnni()));
        assert!(!cpu.at_most(Level::Avx2).avx_vnni());
        assert_eq!(
            all.iter().filter(|i| i.avx_vnni()).count(),
            usize::from(cpu.level() >= Level::Avx2 && has_avx_vnni())
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            all.iter().any(|i| i.level() == Level::Avx2),
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        );
    }
}
