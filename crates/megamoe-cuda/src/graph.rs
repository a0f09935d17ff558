//! CUDA graph capture and replay of the engine's stream (static shapes only: every buffer
//! a captured region touches must stay allocated while the graph lives).

use cudarc::driver::{result as dres, sys as dsys};

use crate::device::Gpu;
use crate::error::{DriverCtx, Result};

/// An instantiated graph, replayed on the engine's stream.
pub struct Graph {
    graph: dsys::CUgraph,
    exec: dsys::CUgraphExec,
}

impl Gpu {
    /// Runs `body` under stream capture and instantiates what it queued. `body` must only
    /// queue work (no host reads, no allocation, no synchronisation).
    pub fn capture(&self, body: impl FnOnce(&Gpu) -> Result<()>) -> Result<Graph> {
        self.synchronize()?;
        unsafe {
            dres::stream::begin_capture(
                self.stream(),
                dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .ctx("cuStreamBeginCapture")?;
        let queued = body(self);
        let graph = unsafe { dres::stream::end_capture(self.stream()) }.ctx("cuStreamEndCapture");
        queued?;
        let graph = graph?;
        let exec = unsafe { dres::graph::instantiate(graph, dsys::CUgraphInstantiate_flags(0)) }
            .ctx("cuGraphInstantiate")?;
        Ok(Graph { graph, exec })
    }

    /// Queues one replay of `graph`.
    pub fn replay(&self, graph: &Graph) -> Result<()> {
        unsafe { dres::graph::launch(graph.exec, self.stream()) }.ctx("cuGraphLaunch")
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        unsafe {
            let _ = dres::graph::exec_destroy(self.exec);
            let _ = dres::graph::destroy(self.graph);
        }
    }
}
