//! The graph: nodes (an [`Op`] and its result type) joined by ordered input edges, and named outputs.
//!
//! petgraph is an implementation detail: callers see [`NodeId`] and the methods here, never petgraph types.

use std::collections::BTreeMap;
use std::fmt;

use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;

use crate::op::Op;
use crate::types::{TensorType, Type};

/// Handle of a node in one [`Graph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u32);

impl NodeId {
    fn index(self) -> NodeIndex {
        NodeIndex::new(self.0 as usize)
    }

    fn from_index(i: NodeIndex) -> NodeId {
        NodeId(i.index() as u32)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node{}", self.0)
    }
}

/// An operation and the type of its result.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub ty: Type,
}

impl Node {
    /// The node's tensor type. Every node but a multi-result fused op has one; asking a tuple-valued node
    /// is a caller bug (only `select` reads tuples), so this panics.
    pub fn tensor(&self) -> &TensorType {
        self.ty.tensor().unwrap_or_else(|| {
            panic!(
                "{} gives the tuple {}: read it through select",
                self.op.name(),
                self.ty
            )
        })
    }
}

/// A node could not be added: its inputs do not fit its op.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{op}: {message}")]
pub struct TypeError {
    pub op: &'static str,
    pub message: String,
}

/// A dataflow graph of tensor operations with named outputs.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// Edge weight = the input slot the edge feeds.
    g: StableDiGraph<Node, u32>,
    outputs: Vec<(String, NodeId)>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    /// Adds a node whose type is inferred from its inputs; fails if they do not fit the op.
    pub fn add(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId, TypeError> {
        let types: Vec<&Type> = inputs.iter().map(|&i| &self.node(i).ty).collect();
        let ty = op.infer(&types).map_err(|message| TypeError {
            op: op.name(),
            message,
        })?;
        Ok(self.add_with_type(op, inputs, ty))
    }

    /// Adds a node with a declared type and no checks; [`crate::verify`] reports any inconsistency.
    /// Used by the text parser, which must be able to read back broken graphs to report on them.
    pub fn add_with_type(&mut self, op: Op, inputs: &[NodeId], ty: impl Into<Type>) -> NodeId {
        let id = self.g.add_node(Node { op, ty: ty.into() });
        for (slot, &input) in inputs.iter().enumerate() {
            self.g.add_edge(input.index(), id, slot as u32);
        }
        NodeId::from_index(id)
    }

    /// Names `node` as the graph output `name` (replacing an output of the same name).
    pub fn set_output(&mut self, name: &str, node: NodeId) {
        match self.outputs.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = node,
            None => self.outputs.push((name.to_string(), node)),
        }
    }

    /// The named outputs, in the order they were set.
    pub fn outputs(&self) -> &[(String, NodeId)] {
        &self.outputs
    }

    /// The node behind an output name.
    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, id)| id)
    }

    /// The node behind an id. Panics on an id from another graph or a removed node (a caller bug).
    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id.index()]
    }

    /// Whether `id` names a live node of this graph.
    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id.index())
    }

    /// A node's inputs in slot order.
    pub fn inputs(&self, id: NodeId) -> Vec<NodeId> {
        let mut edges: Vec<(u32, NodeId)> = self
            .g
            .edges_directed(id.index(), Direction::Incoming)
            .map(|e| (*e.weight(), NodeId::from_index(e.source())))
            .collect();
        edges.sort();
        edges.into_iter().map(|(_, n)| n).collect()
    }

    /// Slots of a node's incoming edges, sorted (the verifier checks they are 0..n).
    pub(crate) fn input_slots(&self, id: NodeId) -> Vec<u32> {
        let mut slots: Vec<u32> = self
            .g
            .edges_directed(id.index(), Direction::Incoming)
            .map(|e| *e.weight())
            .collect();
        slots.sort();
        slots
    }

    /// Nodes that read `id`'s result, each once, in id order.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut users: Vec<NodeId> = self
            .g
            .neighbors_directed(id.index(), Direction::Outgoing)
            .map(NodeId::from_index)
            .collect();
        users.sort();
        users.dedup();
        users
    }

    /// Whether `id` is a named output (a reader that [`Graph::users`] does not list).
    pub fn is_output(&self, id: NodeId) -> bool {
        self.outputs.iter().any(|&(_, o)| o == id)
    }

    /// Every live node id, in insertion order.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.g.node_indices().map(NodeId::from_index).collect()
    }

    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    /// Nodes in dependency order (inputs before users; among ready nodes, lower ids first),
    /// or `Err` with a node on a cycle.
    pub fn topo_order(&self) -> Result<Vec<NodeId>, NodeId> {
        // Kahn's algorithm with a min-heap so the order is deterministic.
        let mut pending: BTreeMap<NodeId, usize> = BTreeMap::new();
        let mut ready = std::collections::BinaryHeap::new();
        for id in self.node_ids() {
            let n = self
                .g
                .edges_directed(id.index(), Direction::Incoming)
                .count();
            if n == 0 {
                ready.push(std::cmp::Reverse(id));
            } else {
                pending.insert(id, n);
            }
        }
        let mut order = Vec::with_capacity(self.len());
        while let Some(std::cmp::Reverse(id)) = ready.pop() {
            order.push(id);
            for e in self.g.edges_directed(id.index(), Direction::Outgoing) {
                let user = NodeId::from_index(e.target());
                let n = pending
                    .get_mut(&user)
                    .expect("user of a visited node is pending");
                *n -= 1;
                if *n == 0 {
                    pending.remove(&user);
                    ready.push(std::cmp::Reverse(user));
                }
            }
        }
        match pending.keys().next() {
            Some(&on_cycle) => Err(on_cycle),
            None => Ok(order),
        }
    }

    /// Points every use of `old` (inputs and outputs) at `new`.
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) {
        let uses: Vec<_> = self
            .g
            .edges_directed(old.index(), Direction::Outgoing)
            .map(|e| (e.id(), e.target(), *e.weight()))
            .collect();
        for (edge, target, slot) in uses {
            self.g.remove_edge(edge);
            self.g.add_edge(new.index(), target, slot);
        }
        for (_, id) in &mut self.outputs {
            if *id == old {
                *id = new;
            }
        }
    }

    /// Removes nodes that no output depends on. Returns how many were removed.
    pub fn remove_dead(&mut self) -> usize {
        let mut live = std::collections::HashSet::new();
        let mut stack: Vec<NodeId> = self.outputs.iter().map(|&(_, id)| id).collect();
        while let Some(id) = stack.pop() {
            if live.insert(id) {
                stack.extend(self.inputs(id));
            }
        }
        let dead: Vec<NodeId> = self
            .node_ids()
            .into_iter()
            .filter(|id| !live.contains(id))
            .collect();
        for id in &dead {
            self.g.remove_node(id.index());
        }
        dead.len()
    }

    /// Weight nodes with their checkpoint names, in id order.
    pub fn weights(&self) -> Vec<(NodeId, &str, &TensorType)> {
        self.node_ids()
            .into_iter()
            .filter_map(|id| match &self.node(id).op {
                Op::Weight { name, ty, .. } => Some((id, name.as_str(), ty)),
                _ => None,
            })
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn add_raw_edge(&mut self, from: NodeId, to: NodeId, slot: u32) {
        self.g.add_edge(from.index(), to.index(), slot);
    }
}
