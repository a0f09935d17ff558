//! A small builder over cuDNN's backend descriptors: 4-D tensors (real, virtual, or host
//! scalars passed by value), the pointwise / matmul / reduction / reshape operations, and
//! an operation graph finalized into an execution plan through cuDNN's heuristics.

use std::ffi::c_void;

use cudarc::cudnn::sys as nsys;
use nsys::cudnnBackendAttributeName_t as A;
use nsys::cudnnBackendAttributeType_t as Ty;
use nsys::cudnnBackendDescriptorType_t as D;

use super::{check, Handle};
use crate::error::{Error, Result};

pub(crate) use nsys::cudnnDataType_t as DataType;
pub(crate) use nsys::cudnnPointwiseMode_t as Pw;
pub(crate) use nsys::cudnnReduceTensorOp_t as Reduce;

/// One backend descriptor, destroyed on drop.
pub(crate) struct Desc(nsys::cudnnBackendDescriptor_t);

// SAFETY: a descriptor is plain host data owned by cuDNN; it is used by one thread at a time
// (the engine is behind a mutex).
unsafe impl Send for Desc {}
unsafe impl Sync for Desc {}

impl Desc {
    pub(crate) fn new(kind: D) -> Result<Desc> {
        let mut d = std::ptr::null_mut();
        // SAFETY: cudnnBackendCreateDescriptor writes a new descriptor of `kind`.
        check(
            unsafe { nsys::cudnnBackendCreateDescriptor(kind, &mut d) },
            "cudnnBackendCreateDescriptor",
        )?;
        Ok(Desc(d))
    }

    /// Sets attribute `name` to `vals` of cuDNN type `ty` (`T` must be that type's C type).
    pub(crate) fn set<T>(&self, name: A, ty: Ty, vals: &[T], call: &'static str) -> Result<()> {
        // SAFETY: `vals` holds `len` elements of the C type `ty` names (callers pair them).
        check(
            unsafe {
                nsys::cudnnBackendSetAttribute(
                    self.0,
                    name,
                    ty,
                    vals.len() as i64,
                    vals.as_ptr() as *const c_void,
                )
            },
            call,
        )
    }

    pub(crate) fn set_desc(&self, name: A, d: &Desc, call: &'static str) -> Result<()> {
        self.set(name, Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR, &[d.0], call)
    }

    pub(crate) fn finalize(&self, call: &'static str) -> Result<()> {
        // SAFETY: finalizes a descriptor this struct owns.
        check(unsafe { nsys::cudnnBackendFinalize(self.0) }, call)
    }

    pub(crate) fn raw(&self) -> nsys::cudnnBackendDescriptor_t {
        self.0
    }

    /// A descriptor of `kind` with each `(attribute, descriptor)` of `links` set, finalized.
    fn linked(kind: D, links: &[(A, &Desc)], call: &'static str) -> Result<Desc> {
        let d = Desc::new(kind)?;
        for (name, x) in links {
            d.set_desc(*name, x, call)?;
        }
        d.finalize(call)?;
        Ok(d)
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: destroyed once; cuDNN keeps its own copies in descriptors built from it.
        unsafe {
            let _ = nsys::cudnnBackendDestroyDescriptor(self.0);
        }
    }
}

/// A tensor of the graph under construction (index into the builder's tensors).
#[derive(Debug, Clone, Copy)]
pub(crate) struct T {
    idx: usize,
    pub(crate) dims: [i64; 4],
}

/// Row-major strides of `dims`.
pub(crate) fn packed(dims: [i64; 4]) -> [i64; 4] {
    [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1]
}

/// The operation graph being described: tensor and operation descriptors, in order.
pub(crate) struct Builder {
    tensors: Vec<Desc>,
    ops: Vec<Desc>,
    /// Attribute descriptors (pointwise modes, matmul and reduction settings), kept alive.
    extra: Vec<Desc>,
    next_virtual_uid: i64,
}

impl Builder {
    /// Virtual tensors get uids from `first_virtual_uid` up (above every real tensor's).
    pub(crate) fn new(first_virtual_uid: i64) -> Builder {
        Builder {
            tensors: Vec::new(),
            ops: Vec::new(),
            extra: Vec::new(),
            next_virtual_uid: first_virtual_uid,
        }
    }

    fn tensor(
        &mut self,
        uid: i64,
        dims: [i64; 4],
        strides: [i64; 4],
        ty: DataType,
        is_virtual: bool,
        by_value: bool,
    ) -> Result<T> {
        const CALL: &str = "tensor descriptor";
        let d = Desc::new(D::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
        d.set(
            A::CUDNN_ATTR_TENSOR_DATA_TYPE,
            Ty::CUDNN_TYPE_DATA_TYPE,
            &[ty],
            CALL,
        )?;
        d.set(
            A::CUDNN_ATTR_TENSOR_DIMENSIONS,
            Ty::CUDNN_TYPE_INT64,
            &dims,
            CALL,
        )?;
        d.set(
            A::CUDNN_ATTR_TENSOR_STRIDES,
            Ty::CUDNN_TYPE_INT64,
            &strides,
            CALL,
        )?;
        d.set(
            A::CUDNN_ATTR_TENSOR_UNIQUE_ID,
            Ty::CUDNN_TYPE_INT64,
            &[uid],
            CALL,
        )?;
        d.set(
            A::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT,
            Ty::CUDNN_TYPE_INT64,
            &[16i64],
            CALL,
        )?;
        d.set(
            A::CUDNN_ATTR_TENSOR_IS_VIRTUAL,
            Ty::CUDNN_TYPE_BOOLEAN,
            &[is_virtual],
            CALL,
        )?;
        if by_value {
            d.set(
                A::CUDNN_ATTR_TENSOR_IS_BY_VALUE,
                Ty::CUDNN_TYPE_BOOLEAN,
                &[true],
                CALL,
            )?;
        }
        d.finalize("cudnnBackendFinalize(tensor)")?;
        self.tensors.push(d);
        Ok(T {
            idx: self.tensors.len() - 1,
            dims,
        })
    }

    /// A device tensor the caller binds by `uid` at execution.
    pub(crate) fn real(
        &mut self,
        uid: i64,
        dims: [i64; 4],
        strides: [i64; 4],
        ty: DataType,
    ) -> Result<T> {
        self.tensor(uid, dims, strides, ty, false, false)
    }

    /// A host f32 scalar passed by value (bound by `uid` to a host pointer at execution).
    pub(crate) fn scalar(&mut self, uid: i64) -> Result<T> {
        self.tensor(uid, [1; 4], [1; 4], DataType::CUDNN_DATA_FLOAT, false, true)
    }

    /// An intermediate that never reaches memory.
    pub(crate) fn virt(&mut self, dims: [i64; 4], strides: [i64; 4], ty: DataType) -> Result<T> {
        let uid = self.next_virtual_uid;
        self.next_virtual_uid += 1;
        self.tensor(uid, dims, strides, ty, true, false)
    }

    fn desc(&self, t: T) -> &Desc {
        &self.tensors[t.idx]
    }

    /// Appends an operation of `kind` linking each attribute of `links` to a tensor, plus
    /// the settings descriptor `(attribute, descriptor)` it needs (kept alive).
    fn operation(
        &mut self,
        kind: D,
        links: &[(A, T)],
        settings: Option<(A, Desc)>,
        call: &'static str,
    ) -> Result<()> {
        let mut all: Vec<(A, &Desc)> = links.iter().map(|&(a, t)| (a, self.desc(t))).collect();
        if let Some((a, d)) = &settings {
            all.push((*a, d));
        }
        let op = Desc::linked(kind, &all, call)?;
        self.extra.extend(settings.map(|(_, d)| d));
        self.ops.push(op);
        Ok(())
    }

    /// `y = mode(x[, b[, t]])` computed in `compute` (GEN_INDEX takes `axis`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pointwise(
        &mut self,
        mode: Pw,
        compute: DataType,
        axis: Option<i64>,
        x: T,
        b: Option<T>,
        t: Option<T>,
        y: T,
    ) -> Result<()> {
        const CALL: &str = "pointwise descriptor";
        let pw = Desc::new(D::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
        pw.set(
            A::CUDNN_ATTR_POINTWISE_MODE,
            Ty::CUDNN_TYPE_POINTWISE_MODE,
            &[mode],
            CALL,
        )?;
        pw.set(
            A::CUDNN_ATTR_POINTWISE_MATH_PREC,
            Ty::CUDNN_TYPE_DATA_TYPE,
            &[compute],
            CALL,
        )?;
        if let Some(axis) = axis {
            pw.set(
                A::CUDNN_ATTR_POINTWISE_AXIS,
                Ty::CUDNN_TYPE_INT64,
                &[axis],
                CALL,
            )?;
        }
        pw.finalize("cudnnBackendFinalize(pointwise)")?;
        let mut links = vec![(A::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x)];
        links.extend(b.map(|b| (A::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b)));
        links.extend(t.map(|t| (A::CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t)));
        links.push((A::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y));
        self.operation(
            D::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR,
            &links,
            Some((A::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw)),
            "pointwise operation",
        )
    }

    /// A new virtual f32 tensor shaped `like` (packed) holding `mode(a[, b])`.
    pub(crate) fn apply(&mut self, mode: Pw, a: T, b: Option<T>, like: T) -> Result<T> {
        let y = self.virt(like.dims, packed(like.dims), DataType::CUDNN_DATA_FLOAT)?;
        self.pointwise(mode, DataType::CUDNN_DATA_FLOAT, None, a, b, None, y)?;
        Ok(y)
    }

    /// `c = a · b` (batched over the two leading dims), f32 accumulation.
    pub(crate) fn matmul(&mut self, a: T, b: T, c: T) -> Result<()> {
        const CALL: &str = "matmul descriptor";
        let mm = Desc::new(D::CUDNN_BACKEND_MATMUL_DESCRIPTOR)?;
        mm.set(
            A::CUDNN_ATTR_MATMUL_COMP_TYPE,
            Ty::CUDNN_TYPE_DATA_TYPE,
            &[DataType::CUDNN_DATA_FLOAT],
            CALL,
        )?;
        mm.finalize("cudnnBackendFinalize(matmul)")?;
        self.operation(
            D::CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR,
            &[
                (A::CUDNN_ATTR_OPERATION_MATMUL_ADESC, a),
                (A::CUDNN_ATTR_OPERATION_MATMUL_BDESC, b),
                (A::CUDNN_ATTR_OPERATION_MATMUL_CDESC, c),
            ],
            Some((A::CUDNN_ATTR_OPERATION_MATMUL_DESC, mm)),
            "matmul operation",
        )
    }

    /// `y = reduce(x)` over the dims where `y` has extent 1, in f32.
    pub(crate) fn reduction(&mut self, mode: Reduce, x: T, y: T) -> Result<()> {
        const CALL: &str = "reduction descriptor";
        let r = Desc::new(D::CUDNN_BACKEND_REDUCTION_DESCRIPTOR)?;
        r.set(
            A::CUDNN_ATTR_REDUCTION_OPERATOR,
            Ty::CUDNN_TYPE_REDUCTION_OPERATOR_TYPE,
            &[mode],
            CALL,
        )?;
        r.set(
            A::CUDNN_ATTR_REDUCTION_COMP_TYPE,
            Ty::CUDNN_TYPE_DATA_TYPE,
            &[DataType::CUDNN_DATA_FLOAT],
            CALL,
        )?;
        r.finalize("cudnnBackendFinalize(reduction)")?;
        self.operation(
            D::CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR,
            &[
                (A::CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x),
                (A::CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y),
            ],
            Some((A::CUDNN_ATTR_OPERATION_REDUCTION_DESC, r)),
            "reduction operation",
        )
    }

    /// `y` = `x` seen with other dims / strides (a transpose view).
    pub(crate) fn reshape(&mut self, x: T, y: T) -> Result<()> {
        self.operation(
            D::CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR,
            &[
                (A::CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x),
                (A::CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y),
            ],
            None,
            "reshape operation",
        )
    }

    /// The operation graph finalized, then the first engine configuration of cuDNN's
    /// heuristics (mode A, then the fallback list) that finalizes into an execution plan.
    pub(crate) fn plan(self, handle: &Handle, what: &'static str) -> Result<Plan> {
        let graph = Desc::new(D::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
        const G: &str = "operation graph";
        graph.set(
            A::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
            Ty::CUDNN_TYPE_HANDLE,
            &[handle.raw()],
            G,
        )?;
        let ops: Vec<_> = self.ops.iter().map(Desc::raw).collect();
        graph.set(
            A::CUDNN_ATTR_OPERATIONGRAPH_OPS,
            Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            &ops,
            G,
        )?;
        graph.finalize("cudnnBackendFinalize(operation graph)")?;
        let mut tried = 0;
        let mut last_err = None;
        for mode in [
            nsys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A,
            nsys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_FALLBACK,
        ] {
            let configs = match heuristics(&graph, mode) {
                Ok(c) => c,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            for cfg in configs {
                tried += 1;
                match execution_plan(handle, &cfg) {
                    Ok((plan, workspace)) => {
                        return Ok(Plan {
                            plan,
                            workspace,
                            _cfg: cfg,
                            _graph: graph,
                            _parts: (self.tensors, self.ops, self.extra),
                        })
                    }
                    Err(e) => last_err = Some(e),
                }
            }
        }
        Err(Error::CudnnNoPlan {
            what,
            tried,
            last: last_err.map(|e| e.to_string()).unwrap_or_default(),
        })
    }
}

/// The engine configurations cuDNN's heuristics `mode` proposes for `graph`, best first.
fn heuristics(graph: &Desc, mode: nsys::cudnnBackendHeurMode_t) -> Result<Vec<Desc>> {
    const H: &str = "engine heuristics";
    let heur = Desc::new(D::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
    heur.set_desc(A::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph, H)?;
    heur.set(
        A::CUDNN_ATTR_ENGINEHEUR_MODE,
        Ty::CUDNN_TYPE_HEUR_MODE,
        &[mode],
        H,
    )?;
    heur.finalize("cudnnBackendFinalize(engine heuristics)")?;
    let mut count = 0i64;
    // SAFETY: asking for 0 elements only writes the count.
    check(
        unsafe {
            nsys::cudnnBackendGetAttribute(
                heur.raw(),
                A::CUDNN_ATTR_ENGINEHEUR_RESULTS,
                Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                0,
                &mut count,
                std::ptr::null_mut(),
            )
        },
        "cudnnBackendGetAttribute(heuristics count)",
    )?;
    let configs = (0..count.clamp(0, 64))
        .map(|_| Desc::new(D::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR))
        .collect::<Result<Vec<_>>>()?;
    let mut raw: Vec<_> = configs.iter().map(Desc::raw).collect();
    let mut got = 0i64;
    // SAFETY: `raw` holds `len` engine-config descriptors cuDNN fills in.
    check(
        unsafe {
            nsys::cudnnBackendGetAttribute(
                heur.raw(),
                A::CUDNN_ATTR_ENGINEHEUR_RESULTS,
                Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                raw.len() as i64,
                &mut got,
                raw.as_mut_ptr() as *mut c_void,
            )
        },
        "cudnnBackendGetAttribute(heuristics results)",
    )?;
    let mut configs = configs;
    configs.truncate(got.clamp(0, raw.len() as i64) as usize);
    Ok(configs)
}

/// An execution plan of one engine configuration and its workspace bytes.
fn execution_plan(handle: &Handle, cfg: &Desc) -> Result<(Desc, usize)> {
    const P: &str = "execution plan";
    let plan = Desc::new(D::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
    plan.set(
        A::CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
        Ty::CUDNN_TYPE_HANDLE,
        &[handle.raw()],
        P,
    )?;
    plan.set_desc(A::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, cfg, P)?;
    plan.finalize("cudnnBackendFinalize(execution plan)")?;
    let mut ws = 0i64;
    let mut n = 0i64;
    // SAFETY: one INT64 element is written.
    check(
        unsafe {
            nsys::cudnnBackendGetAttribute(
                plan.raw(),
                A::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                Ty::CUDNN_TYPE_INT64,
                1,
                &mut n,
                &mut ws as *mut i64 as *mut c_void,
            )
        },
        "cudnnBackendGetAttribute(workspace size)",
    )?;
    Ok((plan, ws.max(0) as usize))
}

/// A finalized execution plan (with every descriptor it was built from kept alive).
pub(crate) struct Plan {
    plan: Desc,
    /// Engine workspace bytes.
    pub(crate) workspace: usize,
    _cfg: Desc,
    _graph: Desc,
    _parts: (Vec<Desc>, Vec<Desc>, Vec<Desc>),
}

impl Plan {
    /// Queues the plan on the handle's stream with `bindings` (uid → device address, or a
    /// host address for by-value scalars) and `workspace` (at least [`Plan::workspace`]
    /// bytes).
    ///
    /// # Safety
    /// Every binding must point at live memory of the shape its tensor was described with;
    /// host scalars must live until this returns.
    pub(crate) unsafe fn execute(
        &self,
        handle: &Handle,
        bindings: &[(i64, *mut c_void)],
        workspace: *mut c_void,
    ) -> Result<()> {
        const V: &str = "variant pack";
        let pack = Desc::new(D::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        let uids: Vec<i64> = bindings.iter().map(|b| b.0).collect();
        let ptrs: Vec<*mut c_void> = bindings.iter().map(|b| b.1).collect();
        pack.set(
            A::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS,
            Ty::CUDNN_TYPE_INT64,
            &uids,
            V,
        )?;
        pack.set(
            A::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
            Ty::CUDNN_TYPE_VOID_PTR,
            &ptrs,
            V,
        )?;
        pack.set(
            A::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
            Ty::CUDNN_TYPE_VOID_PTR,
            &[workspace],
            V,
        )?;
        pack.finalize("cudnnBackendFinalize(variant pack)")?;
        check(
            nsys::cudnnBackendExecute(handle.raw(), self.plan.raw(), pack.raw()),
            "cudnnBackendExecute",
        )
    }
}
