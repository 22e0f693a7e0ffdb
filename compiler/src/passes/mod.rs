//! Fusion passes. Each is a plain function over the graph, in a file of its own, registered as a [`Pass`];
//! the order they run in is spelled out in [`crate::pipeline`].

pub mod norm_rope;
pub mod swiglu;

use q3c_ir::Graph;

/// A named rewrite of the graph.
#[derive(Clone, Copy, Debug)]
pub struct Pass {
    /// The name strategies, `--after` and the manifest use.
    pub name: &'static str,
    /// One line on what it fuses.
    pub summary: &'static str,
    /// Rewrites the graph in place and returns how many rewrites it made.
    pub run: fn(&mut Graph) -> usize,
}
