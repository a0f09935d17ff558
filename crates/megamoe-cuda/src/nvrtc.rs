//! NVRTC kernel cache: a kernel source is compiled to a CUBIN for this GPU's architecture
//! once per process (key: module name + compile defines) and its functions looked up once.

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};

use cudarc::driver::{result as dres, sys as dsys};
use cudarc::nvrtc::{result as nres, sys as nsys};

use crate::error::{DriverCtx, Error, Result};

/// Directories searched for `cuda_bf16.h`, in order.
fn include_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var) {
            v.push(Path::new(&p).join("include"));
        }
    }
    v.push(PathBuf::from("/usr/local/cuda/include"));
    v.push(PathBuf::from(
        "/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/include",
    ));
    v
}

/// The CUDA include directory NVRTC gets (`-I`), or a named error.
pub fn cuda_include_dir() -> Result<PathBuf> {
    let c = include_candidates();
    c.iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
        .cloned()
        .ok_or_else(|| Error::NoHeaders {
            searched: c
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

struct Module {
    module: dsys::CUmodule,
    functions: HashMap<String, dsys::CUfunction>,
}

/// Compiled modules of one engine.
pub(crate) struct KernelCache {
    arch: String,
    modules: HashMap<String, Module>,
    /// Wall time spent compiling, seconds.
    pub(crate) compile_secs: f64,
}

impl KernelCache {
    pub(crate) fn new(major: i32, minor: i32) -> KernelCache {
        KernelCache {
            arch: format!("sm_{major}{minor}"),
            modules: HashMap::new(),
            compile_secs: 0.0,
        }
    }

    /// The function `name` of module `module` (source `src`, `defines` as `-D` options),
    /// compiling and loading the module on first use.
    pub(crate) fn function(
        &mut self,
        module: &str,
        src: &str,
        defines: &[(&str, &str)],
        name: &str,
    ) -> Result<dsys::CUfunction> {
        let key = format!(
            "{module}|{}",
            defines
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        if !self.modules.contains_key(&key) {
            let t0 = std::time::Instant::now();
            let cubin = self.compile(&key, src, defines)?;
            let m = unsafe { dres::module::load_data(cubin.as_ptr() as *const _) }
                .ctx("cuModuleLoadData")?;
            self.compile_secs += t0.elapsed().as_secs_f64();
            self.modules.insert(
                key.clone(),
                Module {
                    module: m,
                    functions: HashMap::new(),
                },
            );
        }
        let m = self
            .modules
            .get_mut(&key)
            .ok_or_else(|| Error::invalid("kernel module", key.clone(), "was not loaded"))?;
        if let Some(f) = m.functions.get(name) {
            return Ok(*f);
        }
        let cname = CString::new(name)
            .map_err(|_| Error::invalid("kernel name", name, "has a NUL byte"))?;
        let f =
            unsafe { dres::module::get_function(m.module, cname) }.ctx("cuModuleGetFunction")?;
        m.functions.insert(name.to_string(), f);
        Ok(f)
    }

    fn compile(&self, key: &str, src: &str, defines: &[(&str, &str)]) -> Result<Vec<u8>> {
        let inc = cuda_include_dir()?;
        let bad = |log: String| Error::Compile {
            module: key.to_string(),
            log,
        };
        let csrc = CString::new(src).map_err(|_| bad("source has a NUL byte".into()))?;
        let prog = nres::create_program(&csrc, None).map_err(|e| bad(format!("{e:?}")))?;
        let mut opts = vec![
            format!("--gpu-architecture={}", self.arch),
            format!("-I{}", inc.display()),
            "--std=c++17".to_string(),
        ];
        for (k, v) in defines {
            opts.push(format!("-D{k}={v}"));
        }
        let compiled = unsafe { nres::compile_program(prog, &opts) };
        let out = match compiled {
            Ok(()) => unsafe {
                let mut size = 0usize;
                nsys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| bad(format!("nvrtcGetCUBINSize: {e:?}")))?;
                let mut cubin = vec![0u8; size];
                nsys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char)
                    .result()
                    .map_err(|e| bad(format!("nvrtcGetCUBIN: {e:?}")))?;
                Ok(cubin)
            },
            Err(e) => {
                let log = unsafe { nres::get_program_log(prog) }
                    .map(|l| {
                        let bytes: Vec<u8> =
                            l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                        String::from_utf8_lossy(&bytes).into_owned()
                    })
                    .unwrap_or_default();
                Err(bad(format!("{e:?}: {log}")))
            }
        };
        unsafe {
            let _ = nres::destroy_program(prog);
        }
        out
    }
}
