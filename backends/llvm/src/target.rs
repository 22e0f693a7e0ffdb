//! Target machines: the host CPU (or a named x86-64 CPU) with its vector width and features, and NVPTX.

use inkwell::targets::{
    CodeModel, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple,
};
use inkwell::OptimizationLevel;
use q3c_backend_common::BackendError;

use crate::fb::Flavor;

/// CPU features the runtime can check (`q3c_abi::CPU_FEATURES`), as LLVM spells them.
fn runtime_name(llvm: &str) -> Option<String> {
    let name = match llvm {
        "sse4.1" => "sse41",
        "sse4.2" => "sse42",
        other => other,
    };
    q3c_abi::CPU_FEATURES
        .contains(&name)
        .then(|| name.to_string())
}

/// A CPU code generation target.
pub struct CpuTarget {
    pub machine: TargetMachine,
    /// LLVM's CPU name (the host's for `native`).
    pub cpu: String,
    /// LLVM feature string (`+avx512f,...`), empty for a named CPU (LLVM derives them).
    pub features: String,
    pub flavor: Flavor,
    /// Features the runtime must find on the CPU that loads the code.
    pub required: Vec<String>,
}

impl CpuTarget {
    /// Whether the code may use 256-bit AVX512-VNNI (`vpdpbusd`) next to 512-bit vectors.
    pub fn vnni(&self) -> bool {
        let has = |f: &str| self.required.iter().any(|r| r == f);
        self.flavor.lanes() == 16 && has("avx512vnni") && has("avx512vl")
    }
}

/// The host CPU as LLVM names it (`znver4`, `sapphirerapids`, ...).
pub fn host_cpu() -> String {
    TargetMachine::get_host_cpu_name().to_string()
}

/// x86-64-v4's AVX-512 subset.
const AVX512: &[&str] = &[
    "sse42", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl",
];

/// What LLVM's `znver4` may use in our code beyond [`AVX512`]: BF16 and VNNI, the later AVX-512 subsets and
/// GFNI (byte shifts), each one the runtime checks before loading an artifact.
const ZEN4_EXTRAS: &[&str] = &[
    "avx512bf16",
    "avx512vnni",
    "avx512cd",
    "avx512ifma",
    "avx512vbmi",
    "avx512vbmi2",
    "avx512bitalg",
    "avx512vpopcntdq",
    "gfni",
];
/// What `sapphirerapids` may use beyond `znver4`: AVX512-FP16 (its f16 conversions, e.g. `vcvtph2psx`).
const FP16: &[&str] = &["avx512fp16"];

/// Named CPUs q3c knows the vector width and required features of (the union of the listed sets).
const NAMED: &[(&str, u32, &[&[&str]])] = &[
    (
        "x86-64-v2",
        4,
        &[&["sse3", "ssse3", "sse41", "sse42", "popcnt"]],
    ),
    (
        "x86-64-v3",
        8,
        &[&[
            "sse41", "sse42", "popcnt", "avx", "avx2", "fma", "bmi1", "bmi2",
        ]],
    ),
    ("x86-64-v4", 16, &[AVX512]),
    (
        "haswell",
        8,
        &[&["sse42", "popcnt", "avx", "avx2", "fma", "bmi1", "bmi2"]],
    ),
    ("skylake-avx512", 16, &[AVX512]),
    ("znver4", 16, &[AVX512, ZEN4_EXTRAS]),
    ("sapphirerapids", 16, &[AVX512, ZEN4_EXTRAS, FP16]),
];

/// The target for `target_cpu`: `native` (this machine's CPU and features) or one of [`NAMED`].
///
/// With `bf16_activations`, products over bf16 weights use AVX512_BF16 (refused if the CPU lacks it).
pub fn cpu(target_cpu: &str, bf16_activations: bool) -> Result<CpuTarget, BackendError> {
    Target::initialize_x86(&InitializationConfig::default());
    let triple = TargetMachine::get_default_triple();
    let target = Target::from_triple(&triple).map_err(|e| BackendError::Target(e.to_string()))?;
    let (cpu, features, lanes, required) = if target_cpu == "native" {
        let features = TargetMachine::get_host_cpu_features().to_string();
        let on: Vec<&str> = features
            .split(',')
            .filter_map(|f| f.strip_prefix('+'))
            .collect();
        let lanes = if on.contains(&"avx512f") {
            16
        } else if on.contains(&"avx2") {
            8
        } else {
            4
        };
        let required: Vec<String> = on.iter().filter_map(|f| runtime_name(f)).collect();
        (host_cpu(), features, lanes, required)
    } else {
        let (_, lanes, required) = NAMED
            .iter()
            .find(|(name, _, _)| *name == target_cpu)
            .ok_or_else(|| {
                let names: Vec<&str> = NAMED.iter().map(|n| n.0).collect();
                BackendError::Target(format!(
                    "unknown CPU '{target_cpu}' for the LLVM backend (try native, {})",
                    names.join(", ")
                ))
            })?;
        let required = required
            .iter()
            .flat_map(|set| set.iter())
            .map(|s| s.to_string())
            .collect();
        (target_cpu.to_string(), String::new(), *lanes, required)
    };
    let has_bf16 = required.iter().any(|f: &String| f == "avx512bf16");
    if bf16_activations && !(has_bf16 && lanes == 16) {
        return Err(BackendError::Target(format!(
            "bf16 activations need AVX512_BF16, which {cpu} lacks"
        )));
    }
    let machine = target
        .create_target_machine(
            &triple,
            &cpu,
            &features,
            OptimizationLevel::Aggressive,
            RelocMode::PIC,
            CodeModel::Default,
        )
        .ok_or_else(|| BackendError::Target(format!("LLVM cannot target {cpu}")))?;
    Ok(CpuTarget {
        machine,
        features,
        flavor: Flavor::Cpu {
            lanes,
            bf16_dot: bf16_activations,
            tuning: crate::fb::CpuTuning::of(&cpu),
        },
        cpu,
        required,
    })
}

/// Whether products for `target_cpu` can use AVX512_BF16 dot products (bf16 activations).
pub fn bf16_dot_available(target_cpu: &str) -> Result<bool, BackendError> {
    let t = cpu(target_cpu, false)?;
    Ok(t.flavor.lanes() == 16 && t.required.iter().any(|f| f == "avx512bf16"))
}

/// The compute capability of `gpu` (`sm_90` → 90).
pub fn sm_version(gpu: &str) -> Result<u32, BackendError> {
    gpu.strip_prefix("sm_")
        .and_then(|s| s.trim_end_matches('a').parse().ok())
        .ok_or_else(|| BackendError::Target(format!("unknown GPU '{gpu}' (try sm_80, sm_90)")))
}

/// Whether kernels for `gpu` can take programmatic launches (PTX `griddepcontrol`: sm_90 and later).
pub fn programmatic_launches(gpu: &str) -> bool {
    sm_version(gpu).is_ok_and(|sm| sm >= 90)
}

/// Whether `gpu` (`sm_80`, ...) has bf16 tensor cores (`mma.sync` over bf16, sm_80 and later).
pub fn bf16_tensor_cores(gpu: &str) -> bool {
    sm_version(gpu).is_ok_and(|sm| sm >= 80)
}

/// An NVPTX target for `gpu` (`sm_80`, `sm_90`, ...), with the PTX ISA version that GPU needs.
pub fn ptx(gpu: &str) -> Result<TargetMachine, BackendError> {
    let sm = sm_version(gpu)?;
    let ptx_isa = match sm {
        60..=75 => "+ptx64",
        80 => "+ptx70",
        86 | 87 => "+ptx74",
        89 | 90 => "+ptx78",
        _ => {
            return Err(BackendError::Target(format!(
                "unsupported GPU '{gpu}' (sm_60 to sm_90)"
            )))
        }
    };
    Target::initialize_nvptx(&InitializationConfig::default());
    let triple = TargetTriple::create("nvptx64-nvidia-cuda");
    let target = Target::from_triple(&triple).map_err(|e| BackendError::Target(e.to_string()))?;
    target
        .create_target_machine(
            &triple,
            gpu,
            ptx_isa,
            OptimizationLevel::Aggressive,
            RelocMode::Default,
            CodeModel::Default,
        )
        .ok_or_else(|| BackendError::Target(format!("LLVM cannot target {gpu}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_cpus_require_only_features_the_runtime_checks() {
        for (name, _, sets) in NAMED {
            for f in sets.iter().flat_map(|s| s.iter()) {
                assert!(q3c_abi::CPU_FEATURES.contains(f), "{name}: {f}");
            }
        }
        // What LLVM used in artifacts for these CPUs (GFNI byte shifts, AVX512-FP16 conversions) is required.
        let required = |cpu: &str| -> Vec<&str> {
            let (_, _, sets) = NAMED.iter().find(|n| n.0 == cpu).unwrap();
            sets.iter().flat_map(|s| s.iter().copied()).collect()
        };
        assert!(required("znver4").contains(&"gfni"));
        assert!(!required("znver4").contains(&"avx512fp16"));
        assert!(required("sapphirerapids").contains(&"avx512fp16"));
    }
}
