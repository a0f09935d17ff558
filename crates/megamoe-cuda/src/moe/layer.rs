//! [`CudaMoe`]: weights, gradients and every activation buffer of one static-capacity MoE
//! layer, allocated once; `forward` and `backward` only queue kernels and GEMMs on the
//! engine's stream (no host reads, no allocation), so both can be captured as a graph.

use std::ffi::c_void;

use cudarc::driver::sys as dsys;

use super::{MoeShape, RouterSpec, Score};
use crate::device::{arg, Gpu};
use crate::error::{Error, Result};
use crate::gemm::{Elem, Operand};
use crate::pool::DeviceBuffer;

const SRC: &str = include_str!("kernels.cu");

/// Stage callback of the `*_marked` passes.
pub type Mark<'a> = &'a mut dyn FnMut(&'static str) -> Result<()>;

/// Router kernel arguments (layout of `RouterArgs` in kernels.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RouterArgs {
    n: i32,
    e: i32,
    k: i32,
    score_fn: i32,
    pre_softmax: i32,
    n_groups: i32,
    topk_groups: i32,
    normalize: i32,
    route_scale: f32,
}

/// Host weights in megamoe-moe's layout (f32, row-major).
#[derive(Debug, Clone, Copy)]
pub struct MoeHostWeights<'a> {
    /// `router.weight [E, H]`.
    pub router: &'a [f32],
    /// `router.expert_bias [E]` (selection only), when the spec uses it.
    pub expert_bias: Option<&'a [f32]>,
    /// `experts.gate_proj [E, F, H]`.
    pub gate_proj: &'a [f32],
    /// `experts.up_proj [E, F, H]`.
    pub up_proj: &'a [f32],
    /// `experts.down_proj [E, H, F]`.
    pub down_proj: &'a [f32],
}

/// Weight gradients read back to the host (f32, megamoe-moe's layout).
#[derive(Debug, Clone)]
pub struct MoeGrads {
    /// d `router.weight [E, H]`.
    pub router: Vec<f32>,
    /// d `experts.gate_proj [E, F, H]`.
    pub gate_proj: Vec<f32>,
    /// d `experts.up_proj [E, F, H]`.
    pub up_proj: Vec<f32>,
    /// d `experts.down_proj [E, H, F]`.
    pub down_proj: Vec<f32>,
}

struct Kernels {
    router_fwd: dsys::CUfunction,
    router_bwd: dsys::CUfunction,
    assign_rows: dsys::CUfunction,
    gather_rows: dsys::CUfunction,
    swiglu_fwd: dsys::CUfunction,
    swiglu_bwd: dsys::CUfunction,
    combine_fwd: dsys::CUfunction,
    combine_bwd: dsys::CUfunction,
    scatter_dx: dsys::CUfunction,
    fill_random: dsys::CUfunction,
}

/// One MoE layer resident on the GPU.
pub struct CudaMoe {
    shape: MoeShape,
    args: RouterArgs,
    elem: Elem,
    k: Kernels,
    // weights: router [E, H], gate|up stacked per expert [E, 2F, H], down [E, H, F]
    wr: DeviceBuffer,
    bias: Option<DeviceBuffer>,
    w13: DeviceBuffer,
    wd: DeviceBuffer,
    // weight gradients: router f32, experts in the storage type
    d_wr: DeviceBuffer,
    d_w13: DeviceBuffer,
    d_wd: DeviceBuffer,
    // forward
    x: DeviceBuffer,
    logits: DeviceBuffer,
    slots: DeviceBuffer,
    gates: DeviceBuffer,
    row_of: DeviceBuffer,
    row_src: DeviceBuffer,
    counts: DeviceBuffer,
    demand: DeviceBuffer,
    xe: DeviceBuffer,
    gu: DeviceBuffer,
    act: DeviceBuffer,
    ye: DeviceBuffer,
    y: DeviceBuffer,
    // backward
    dy: DeviceBuffer,
    dye: DeviceBuffer,
    d_gates: DeviceBuffer,
    d_act: DeviceBuffer,
    d_gu: DeviceBuffer,
    d_xe: DeviceBuffer,
    d_logits: DeviceBuffer,
    dx_router: DeviceBuffer,
    dx: DeviceBuffer,
}

/// Host f32 → device buffer of `elem`.
fn upload_as(gpu: &Gpu, data: &[f32], elem: Elem) -> Result<DeviceBuffer> {
    let buf = gpu.alloc(data.len() * elem.size())?;
    match elem {
        Elem::F32 => gpu.upload(&buf, data)?,
        Elem::Bf16 => {
            let h: Vec<half::bf16> = data.iter().map(|&v| half::bf16::from_f32(v)).collect();
            gpu.upload(&buf, &h)?
        }
    }
    Ok(buf)
}

/// Device buffer of `elem` → host f32 (SYNC).
fn download_as(gpu: &Gpu, buf: &DeviceBuffer, elem: Elem, n: usize) -> Result<Vec<f32>> {
    Ok(match elem {
        Elem::F32 => {
            let mut v = vec![0f32; n];
            gpu.download(buf, &mut v)?;
            v
        }
        Elem::Bf16 => {
            let mut v = vec![half::bf16::ZERO; n];
            gpu.download(buf, &mut v)?;
            v.into_iter().map(f32::from).collect()
        }
    })
}

fn check_len(what: &'static str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Length {
            what,
            host: got,
            device: want,
        })
    }
}

/// Interleaves gate [E, F, H] and up [E, F, H] into [E, 2F, H] (gate rows first).
fn stack_gate_up(gate: &[f32], up: &[f32], e: usize, fh: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(2 * e * fh);
    for i in 0..e {
        out.extend_from_slice(&gate[i * fh..(i + 1) * fh]);
        out.extend_from_slice(&up[i * fh..(i + 1) * fh]);
    }
    out
}

impl CudaMoe {
    /// Uploads the weights and allocates every buffer for `shape` in storage type `elem`.
    pub fn new(
        gpu: &mut Gpu,
        shape: MoeShape,
        spec: RouterSpec,
        elem: Elem,
        w: &MoeHostWeights<'_>,
    ) -> Result<CudaMoe> {
        let MoeShape {
            d_model: h,
            hidden: f,
            experts: e,
            ..
        } = shape;
        check_len("router.weight", w.router.len(), e * h)?;
        check_len("experts.gate_proj", w.gate_proj.len(), e * f * h)?;
        check_len("experts.up_proj", w.up_proj.len(), e * f * h)?;
        check_len("experts.down_proj", w.down_proj.len(), e * h * f)?;
        if spec.expert_bias && w.expert_bias.is_none() {
            return Err(Error::invalid(
                "router.expert_bias",
                "absent",
                "the router spec uses the expert bias",
            ));
        }
        let mut moe = CudaMoe::alloc(gpu, shape, spec, elem)?;
        if let (Some(dst), Some(b)) = (&moe.bias, w.expert_bias) {
            check_len("router.expert_bias", b.len(), e)?;
            gpu.upload(dst, b)?;
        }
        moe.wr = upload_as(gpu, w.router, elem)?;
        moe.w13 = upload_as(gpu, &stack_gate_up(w.gate_proj, w.up_proj, e, f * h), elem)?;
        moe.wd = upload_as(gpu, w.down_proj, elem)?;
        Ok(moe)
    }

    /// A layer with random weights drawn on the device from `seed` (router std 1/√H, expert
    /// weights 1/√fan_in, expert bias 0), and random `x` and `d_y` (std 1): benchmark data.
    pub fn new_random(
        gpu: &mut Gpu,
        shape: MoeShape,
        spec: RouterSpec,
        elem: Elem,
        seed: u64,
    ) -> Result<CudaMoe> {
        let moe = CudaMoe::alloc(gpu, shape, spec, elem)?;
        let (h, f) = (shape.d_model as f32, shape.hidden as f32);
        if let Some(b) = &moe.bias {
            gpu.memset(b, 0)?;
        }
        let fills = [
            (&moe.wr, 1.0 / h.sqrt()),
            (&moe.w13, 1.0 / h.sqrt()),
            (&moe.wd, 1.0 / f.sqrt()),
            (&moe.x, 1.0),
            (&moe.dy, 1.0),
        ];
        for (i, (buf, std)) in fills.into_iter().enumerate() {
            let n = buf.bytes() / elem.size();
            let s = seed.wrapping_mul(0x100).wrapping_add(i as u64);
            unsafe {
                gpu.launch(
                    moe.k.fill_random,
                    (n.div_ceil(256)).min(132 * 32) as u32,
                    256,
                    &mut [arg(&buf.ptr()), arg(&n), arg(&s), arg(&std)],
                )?;
            }
        }
        gpu.synchronize()?;
        Ok(moe)
    }

    /// Allocates every buffer (weights uninitialised) and compiles the kernels.
    fn alloc(gpu: &mut Gpu, shape: MoeShape, spec: RouterSpec, elem: Elem) -> Result<CudaMoe> {
        shape.validate(&spec)?;
        let MoeShape {
            tokens: n,
            d_model: h,
            hidden: f,
            experts: e,
            top_k: k,
            capacity: c,
        } = shape;
        let defines = [("ELEM", elem.c_type())];
        let mut get = |name: &str| gpu.kernels.function("moe", SRC, &defines, name);
        let k_ = Kernels {
            router_fwd: get("router_fwd")?,
            router_bwd: get("router_bwd")?,
            assign_rows: get("assign_rows")?,
            gather_rows: get("gather_rows")?,
            swiglu_fwd: get("swiglu_fwd")?,
            swiglu_bwd: get("swiglu_bwd")?,
            combine_fwd: get("combine_fwd")?,
            combine_bwd: get("combine_bwd")?,
            scatter_dx: get("scatter_dx")?,
            fill_random: get("fill_random")?,
        };
        let es = elem.size();
        let rows = e * c;
        let a = |bytes: usize| gpu.alloc(bytes);
        Ok(CudaMoe {
            shape,
            args: RouterArgs {
                n: n as i32,
                e: e as i32,
                k: k as i32,
                score_fn: match spec.score {
                    Score::Softmax => 0,
                    Score::Sigmoid => 1,
                },
                pre_softmax: i32::from(spec.pre_softmax),
                n_groups: spec.n_groups as i32,
                topk_groups: spec.topk_groups as i32,
                normalize: i32::from(spec.normalize),
                route_scale: spec.route_scale,
            },
            elem,
            k: k_,
            wr: a(e * h * es)?,
            bias: if spec.expert_bias {
                Some(a(e * 4)?)
            } else {
                None
            },
            w13: a(e * 2 * f * h * es)?,
            wd: a(e * h * f * es)?,
            d_wr: a(e * h * 4)?,
            d_w13: a(e * 2 * f * h * es)?,
            d_wd: a(e * h * f * es)?,
            x: a(n * h * es)?,
            logits: a(n * e * 4)?,
            slots: a(n * k * 4)?,
            gates: a(n * k * 4)?,
            row_of: a(n * k * 4)?,
            row_src: a(rows * 4)?,
            counts: a(e * 4)?,
            demand: a(e * 4)?,
            xe: a(rows * h * es)?,
            gu: a(rows * 2 * f * es)?,
            act: a(rows * f * es)?,
            ye: a(rows * h * es)?,
            y: a(n * h * es)?,
            dy: a(n * h * es)?,
            dye: a(rows * h * es)?,
            d_gates: a(n * k * 4)?,
            d_act: a(rows * f * es)?,
            d_gu: a(rows * 2 * f * es)?,
            d_xe: a(rows * h * es)?,
            d_logits: a(n * e * es)?,
            dx_router: a(n * h * 4)?,
            dx: a(n * h * es)?,
        })
    }

    /// Its shape.
    pub fn shape(&self) -> MoeShape {
        self.shape
    }

    /// Zeroes the weight-gradient buffers (before a `backward(.., accumulate = true)`).
    pub fn zero_grads(&self, gpu: &Gpu) -> Result<()> {
        gpu.memset(&self.d_wr, 0)?;
        gpu.memset(&self.d_w13, 0)?;
        gpu.memset(&self.d_wd, 0)
    }

    /// Fills every output, activation and gradient buffer with NaN bytes (0xFF), so a test
    /// can see that a run wrote every element it should.
    pub fn poison(&self, gpu: &Gpu) -> Result<()> {
        for b in [
            &self.d_wr,
            &self.d_w13,
            &self.d_wd,
            &self.logits,
            &self.slots,
            &self.gates,
            &self.row_of,
            &self.row_src,
            &self.counts,
            &self.demand,
            &self.xe,
            &self.gu,
            &self.act,
            &self.ye,
            &self.y,
            &self.dye,
            &self.d_gates,
            &self.d_act,
            &self.d_gu,
            &self.d_xe,
            &self.d_logits,
            &self.dx_router,
            &self.dx,
        ] {
            gpu.memset(b, 0xFF)?;
        }
        Ok(())
    }

    /// Copies the layer input `x [T, H]` (f32 host) into the device input buffer.
    pub fn set_input(&self, gpu: &Gpu, x: &[f32]) -> Result<()> {
        self.set(gpu, &self.x, x, "x")
    }

    /// Copies the output gradient `d_y [T, H]` into the device buffer.
    pub fn set_grad_output(&self, gpu: &Gpu, dy: &[f32]) -> Result<()> {
        self.set(gpu, &self.dy, dy, "d_y")
    }

    fn set(&self, gpu: &Gpu, dst: &DeviceBuffer, v: &[f32], what: &'static str) -> Result<()> {
        check_len(what, v.len(), self.shape.tokens * self.shape.d_model)?;
        match self.elem {
            Elem::F32 => gpu.upload(dst, v),
            Elem::Bf16 => {
                let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
                gpu.upload(dst, &h)
            }
        }
    }

    fn op(&self, b: &DeviceBuffer, cols: usize, stride: usize) -> Operand {
        Operand::dense(b.ptr(), self.elem, cols, stride)
    }

    /// Queues the forward: router GEMM + kernel, capacity assignment, permute, expert GEMMs
    /// with SwiGLU, combine into `y`.
    pub fn forward(&self, gpu: &Gpu) -> Result<()> {
        self.forward_marked(gpu, &mut |_| Ok(()))
    }

    /// [`CudaMoe::forward`], calling `mark(stage)` after each stage is queued (benchmarks
    /// record an event there): "route", "permute", "expert_up", "swiglu", "expert_down",
    /// "combine".
    pub fn forward_marked(&self, gpu: &Gpu, mark: Mark<'_>) -> Result<()> {
        let MoeShape {
            tokens: n,
            d_model: h,
            hidden: f,
            experts: e,
            top_k: k,
            capacity: c,
        } = self.shape;
        let rows = e * c;
        // logits [T, E] (f32) = x · Wrᵀ
        let logits = Operand::dense(self.logits.ptr(), Elem::F32, e, 0);
        gpu.gemm(
            n,
            e,
            h,
            self.op(&self.x, h, 0),
            self.op(&self.wr, h, 0).t(),
            logits,
            1,
            1.0,
            0.0,
        )?;
        let bias_ptr = self.bias.as_ref().map_or(0u64, |b| b.ptr());
        let (nk, cap, ki, hi) = ((n * k) as i32, c as i32, k as i32, h as i32);
        unsafe {
            gpu.launch(
                self.k.router_fwd,
                n.div_ceil(8) as u32,
                256,
                &mut [
                    arg(&self.args),
                    arg(&self.logits.ptr()),
                    arg(&bias_ptr),
                    arg(&self.slots.ptr()),
                    arg(&self.gates.ptr()),
                ],
            )?;
            gpu.launch(
                self.k.assign_rows,
                e as u32,
                1024,
                &mut [
                    arg(&self.slots.ptr()),
                    arg(&nk),
                    arg(&cap),
                    arg(&self.row_of.ptr()),
                    arg(&self.row_src.ptr()),
                    arg(&self.counts.ptr()),
                    arg(&self.demand.ptr()),
                ],
            )?;
            mark("route")?;
            let row_vecs = (h * self.elem.size() / 16) as i32;
            gpu.launch(
                self.k.gather_rows,
                rows as u32,
                128,
                &mut [
                    arg(&self.x.ptr()),
                    arg(&self.row_src.ptr()),
                    arg(&ki),
                    arg(&row_vecs),
                    arg(&self.xe.ptr()),
                ],
            )?;
        }
        mark("permute")?;
        // gu [E, C, 2F] = xe [E, C, H] · w13ᵀ [E, H, 2F]
        gpu.gemm(
            c,
            2 * f,
            h,
            self.op(&self.xe, h, c * h),
            self.op(&self.w13, h, 2 * f * h).t(),
            self.op(&self.gu, 2 * f, c * 2 * f),
            e,
            1.0,
            0.0,
        )?;
        mark("expert_up")?;
        self.elementwise(
            gpu,
            self.k.swiglu_fwd,
            &[self.gu.ptr()],
            self.act.ptr(),
            rows,
            f,
        )?;
        mark("swiglu")?;
        // ye [E, C, H] = act [E, C, F] · wdᵀ [E, F, H]
        gpu.gemm(
            c,
            h,
            f,
            self.op(&self.act, f, c * f),
            self.op(&self.wd, f, h * f).t(),
            self.op(&self.ye, h, c * h),
            e,
            1.0,
            0.0,
        )?;
        mark("expert_down")?;
        unsafe {
            gpu.launch(
                self.k.combine_fwd,
                n as u32,
                256,
                &mut [
                    arg(&self.ye.ptr()),
                    arg(&self.row_of.ptr()),
                    arg(&self.gates.ptr()),
                    arg(&ki),
                    arg(&hi),
                    arg(&self.y.ptr()),
                ],
            )?;
        }
        mark("combine")
    }

    fn elementwise(
        &self,
        gpu: &Gpu,
        f_: dsys::CUfunction,
        inputs: &[u64],
        out: u64,
        rows: usize,
        f: usize,
    ) -> Result<()> {
        let (ri, fi) = (rows as i32, f as i32);
        let vecs = rows * f / (16 / self.elem.size());
        let grid = vecs.div_ceil(256).min(132 * 32) as u32;
        let mut p: Vec<*mut c_void> = inputs.iter().map(arg).collect();
        p.push(arg(&ri));
        p.push(arg(&fi));
        p.push(arg(&out));
        unsafe { gpu.launch(f_, grid, 256, &mut p) }
    }

    /// Queues the backward from `d_y`: writes `d_x` and the weight gradients (`accumulate`:
    /// add into them instead of overwriting).
    pub fn backward(&self, gpu: &Gpu, accumulate: bool) -> Result<()> {
        self.backward_marked(gpu, accumulate, &mut |_| Ok(()))
    }

    /// [`CudaMoe::backward`] with stage marks: "combine_bwd", "expert_down_bwd",
    /// "swiglu_bwd", "expert_up_bwd", "router_bwd", "unpermute".
    pub fn backward_marked(&self, gpu: &Gpu, accumulate: bool, mark: Mark<'_>) -> Result<()> {
        let MoeShape {
            tokens: n,
            d_model: h,
            hidden: f,
            experts: e,
            top_k: k,
            capacity: c,
        } = self.shape;
        let rows = e * c;
        let beta = if accumulate { 1.0 } else { 0.0 };
        let (ki, hi) = (k as i32, h as i32);
        unsafe {
            gpu.launch(
                self.k.combine_bwd,
                rows as u32,
                256,
                &mut [
                    arg(&self.dy.ptr()),
                    arg(&self.ye.ptr()),
                    arg(&self.row_src.ptr()),
                    arg(&self.gates.ptr()),
                    arg(&ki),
                    arg(&hi),
                    arg(&self.dye.ptr()),
                    arg(&self.d_gates.ptr()),
                ],
            )?;
        }
        mark("combine_bwd")?;
        // d_act [E, C, F] = dye [E, C, H] · wd [E, H, F]
        gpu.gemm(
            c,
            f,
            h,
            self.op(&self.dye, h, c * h),
            self.op(&self.wd, f, h * f),
            self.op(&self.d_act, f, c * f),
            e,
            1.0,
            0.0,
        )?;
        // d_wd [E, H, F] (+)= dyeᵀ [E, H, C] · act [E, C, F]
        gpu.gemm(
            h,
            f,
            c,
            self.op(&self.dye, h, c * h).t(),
            self.op(&self.act, f, c * f),
            self.op(&self.d_wd, f, h * f),
            e,
            1.0,
            beta,
        )?;
        mark("expert_down_bwd")?;
        self.elementwise(
            gpu,
            self.k.swiglu_bwd,
            &[self.gu.ptr(), self.d_act.ptr()],
            self.d_gu.ptr(),
            rows,
            f,
        )?;
        mark("swiglu_bwd")?;
        // d_xe [E, C, H] = d_gu [E, C, 2F] · w13 [E, 2F, H]
        gpu.gemm(
            c,
            h,
            2 * f,
            self.op(&self.d_gu, 2 * f, c * 2 * f),
            self.op(&self.w13, h, 2 * f * h),
            self.op(&self.d_xe, h, c * h),
            e,
            1.0,
            0.0,
        )?;
        // d_w13 [E, 2F, H] (+)= d_guᵀ [E, 2F, C] · xe [E, C, H]
        gpu.gemm(
            2 * f,
            h,
            c,
            self.op(&self.d_gu, 2 * f, c * 2 * f).t(),
            self.op(&self.xe, h, c * h),
            self.op(&self.d_w13, h, 2 * f * h),
            e,
            1.0,
            beta,
        )?;
        mark("expert_up_bwd")?;
        // router: d_gates -> d_logits, then d_x_router = d_logits · Wr, d_Wr (+)= d_logitsᵀ x
        let bias_ptr = self.bias.as_ref().map_or(0u64, |b| b.ptr());
        unsafe {
            gpu.launch(
                self.k.router_bwd,
                n.div_ceil(8) as u32,
                256,
                &mut [
                    arg(&self.args),
                    arg(&self.logits.ptr()),
                    arg(&bias_ptr),
                    arg(&self.row_of.ptr()),
                    arg(&self.d_gates.ptr()),
                    arg(&self.d_logits.ptr()),
                ],
            )?;
        }
        let dx_router = Operand::dense(self.dx_router.ptr(), Elem::F32, h, 0);
        gpu.gemm(
            n,
            h,
            e,
            self.op(&self.d_logits, e, 0),
            self.op(&self.wr, h, 0),
            dx_router,
            1,
            1.0,
            0.0,
        )?;
        let d_wr = Operand::dense(self.d_wr.ptr(), Elem::F32, h, 0);
        gpu.gemm(
            e,
            h,
            n,
            self.op(&self.d_logits, e, 0).t(),
            self.op(&self.x, h, 0),
            d_wr,
            1,
            1.0,
            beta,
        )?;
        mark("router_bwd")?;
        unsafe {
            gpu.launch(
                self.k.scatter_dx,
                n as u32,
                256,
                &mut [
                    arg(&self.d_xe.ptr()),
                    arg(&self.row_of.ptr()),
                    arg(&self.dx_router.ptr()),
                    arg(&ki),
                    arg(&hi),
                    arg(&self.dx.ptr()),
                ],
            )?;
        }
        mark("unpermute")
    }

    /// The output `y [T, H]` (SYNC).
    pub fn read_output(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        download_as(
            gpu,
            &self.y,
            self.elem,
            self.shape.tokens * self.shape.d_model,
        )
    }

    /// The input gradient `d_x [T, H]` (SYNC).
    pub fn read_grad_input(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        download_as(
            gpu,
            &self.dx,
            self.elem,
            self.shape.tokens * self.shape.d_model,
        )
    }

    /// Assignments per expert before capacity `[E]` (SYNC).
    pub fn read_demand(&self, gpu: &Gpu) -> Result<Vec<i32>> {
        let mut v = vec![0i32; self.shape.experts];
        gpu.download(&self.demand, &mut v)?;
        Ok(v)
    }

    /// Kept rows per expert `[E]` (SYNC).
    pub fn read_counts(&self, gpu: &Gpu) -> Result<Vec<i32>> {
        let mut v = vec![0i32; self.shape.experts];
        gpu.download(&self.counts, &mut v)?;
        Ok(v)
    }

    /// Chosen experts `[T, k]` and their gates (SYNC).
    pub fn read_routing(&self, gpu: &Gpu) -> Result<(Vec<i32>, Vec<f32>)> {
        let nk = self.shape.tokens * self.shape.top_k;
        let mut s = vec![0i32; nk];
        let mut g = vec![0f32; nk];
        gpu.download(&self.slots, &mut s)?;
        gpu.download(&self.gates, &mut g)?;
        Ok((s, g))
    }

    /// The weight gradients in megamoe-moe's layout (SYNC).
    pub fn read_grads(&self, gpu: &Gpu) -> Result<MoeGrads> {
        let MoeShape {
            d_model: h,
            hidden: f,
            experts: e,
            ..
        } = self.shape;
        let mut router = vec![0f32; e * h];
        gpu.download(&self.d_wr, &mut router)?;
        let w13 = download_as(gpu, &self.d_w13, self.elem, e * 2 * f * h)?;
        let fh = f * h;
        let (mut gate, mut up) = (Vec::with_capacity(e * fh), Vec::with_capacity(e * fh));
        for i in 0..e {
            gate.extend_from_slice(&w13[2 * i * fh..(2 * i + 1) * fh]);
            up.extend_from_slice(&w13[(2 * i + 1) * fh..(2 * i + 2) * fh]);
        }
        Ok(MoeGrads {
            router,
            gate_proj: gate,
            up_proj: up,
            down_proj: download_as(gpu, &self.d_wd, self.elem, e * h * f)?,
        })
    }
}
