//! The interface the trainer programs against; backends are the TCP ring and NCCL.

use half::bf16;

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the world size: averaged gradients in data-parallel training.
    Avg,
}

pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Short backend name for logs ("tcp-ring", "nccl").
    fn backend(&self) -> &'static str;

    /// How this rank's bulk data moves ("shm", "tcp", "nccl", ...), for logs and benchmarks.
    fn transport(&self) -> &'static str {
        self.backend()
    }

    /// The ranks in ring order (`[p]` is the rank at position p), for backends that
    /// choose it; `None` where the library orders ranks itself (NCCL).
    fn ring_order(&self) -> Option<&[usize]> {
        None
    }

    /// The ring order with ranks grouped by where they run
    /// (`0,2,1,3 (z1/node-a: 0,2 | z1/node-b: 1,3)`); `None` where there is no ring order.
    fn ring_description(&self) -> Option<String> {
        None
    }

    /// Reduces `buf` across all ranks in place; every rank must pass the same length.
    fn all_reduce_f32(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()>;

    /// bf16 all-reduce (accumulated per hop in f32, rounded to bf16 between hops).
    fn all_reduce_bf16(&mut self, buf: &mut [bf16], op: ReduceOp) -> Result<()>;

    /// Overwrites `buf` on every rank with its contents on `root`.
    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<()>;

    /// Gathers every rank's `input` into `output` (length `world_size * input.len()`),
    /// rank r's block at `r * input.len()`.
    fn all_gather_f32(&mut self, input: &[f32], output: &mut [f32]) -> Result<()>;

    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<()>;
}
