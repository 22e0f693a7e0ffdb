//! The verifier: checks a graph's invariants and reports every violation with its node.
//!
//! Invariants:
//! 1. The graph is acyclic.
//! 2. Each node's incoming edges fill its input slots `0..arity` exactly once.
//! 3. Each node's declared type is the one its op infers from its inputs' types (which also checks that
//!    the inputs' dtypes, ranks and dims fit the op; see [`crate::Op::infer`]).
//! 4. There is at least one output, output names are unique, and every output names a live, tensor-valued
//!    node.
//! 5. Each weight name appears once (once whole and once per distinct slice: a graph may read a tensor
//!    both ways); each [`crate::InputKind`] at most once; each (layer, kind) of
//!    [`crate::Op::KvAppend`] (or cache-writing [`crate::Op::NormRope`]) at most once.
//! 6. Tuples (the results of multi-result fused ops) are read only by [`crate::Op::Select`] (part of 3:
//!    no other op's typing rule accepts a tuple).
//!
//! A failure after a pass is a compiler bug, not a user error.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::graph::{Graph, NodeId};
use crate::op::Op;
use crate::text::numbering;
use crate::types::Type;

/// One broken invariant.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifierError {
    /// The node at fault, as `%N = op` in the text form's numbering (empty for graph-level errors).
    pub location: String,
    pub message: String,
}

impl fmt::Display for VerifierError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.location, self.message)
        }
    }
}

/// Every broken invariant of a graph.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct VerifierErrors(pub Vec<VerifierError>);

impl fmt::Display for VerifierErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "graph verification failed with {} error(s):",
            self.0.len()
        )?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// Checks every invariant listed in the module docs; returns all violations at once.
pub fn verify(graph: &Graph) -> Result<(), VerifierErrors> {
    let mut errors = Vec::new();
    let numbers = numbering(graph);
    let at = |id: NodeId| format!("%{} = {}", numbers[&id], graph.node(id).op.name());

    if let Err(on_cycle) = graph.topo_order() {
        errors.push(VerifierError {
            location: at(on_cycle),
            message: "is on a cycle".into(),
        });
    }

    let mut weight_names: HashMap<(&str, Option<crate::Shard>), NodeId> = HashMap::new();
    let mut input_kinds = HashSet::new();
    let mut caches = HashSet::new();
    for id in graph.node_ids() {
        let node = graph.node(id);
        let arity = node.op.arity();
        let slots = graph.input_slots(id);
        if slots != (0..arity as u32).collect::<Vec<_>>() {
            errors.push(VerifierError {
                location: at(id),
                message: format!("takes {arity} inputs, its input slots are {slots:?}"),
            });
        } else {
            let inputs = graph.inputs(id);
            let types: Vec<&Type> = inputs.iter().map(|&i| &graph.node(i).ty).collect();
            match node.op.infer(&types) {
                Err(message) => errors.push(VerifierError {
                    location: at(id),
                    message,
                }),
                Ok(ty) if ty != node.ty => errors.push(VerifierError {
                    location: at(id),
                    message: format!("declared type {} but its inputs give {ty}", node.ty),
                }),
                Ok(_) => {}
            }
        }
        match &node.op {
            Op::Weight { name, shard, .. } => {
                if let Some(first) = weight_names.insert((name.as_str(), *shard), id) {
                    errors.push(VerifierError {
                        location: at(id),
                        message: format!(
                            "weight \"{name}\" is already bound by %{}",
                            numbers[&first]
                        ),
                    });
                }
            }
            Op::Input(kind) if !input_kinds.insert(*kind) => errors.push(VerifierError {
                location: at(id),
                message: format!("input {} appears more than once", kind.name()),
            }),
            _ => {}
        }
        if let Some((layer, kind)) = node.op.cache() {
            if !caches.insert((layer, kind)) {
                errors.push(VerifierError {
                    location: at(id),
                    message: format!(
                        "KV cache (layer {layer}, {}) is appended to more than once",
                        kind.name()
                    ),
                })
            }
        }
    }

    if graph.outputs().is_empty() {
        errors.push(VerifierError {
            location: String::new(),
            message: "the graph has no outputs".into(),
        });
    }
    let mut output_names = HashSet::new();
    for (name, id) in graph.outputs() {
        if !output_names.insert(name) {
            errors.push(VerifierError {
                location: String::new(),
                message: format!("output \"{name}\" is named twice"),
            });
        }
        if !graph.contains(*id) {
            errors.push(VerifierError {
                location: String::new(),
                message: format!("output \"{name}\" names a removed node"),
            });
        } else if graph.node(*id).ty.tensor().is_none() {
            errors.push(VerifierError {
                location: String::new(),
                message: format!("output \"{name}\" names a tuple; select an element"),
            });
        }
    }

    if errors.is_empty() {
        Ok(())
    } else {
        Err(VerifierErrors(errors))
    }
}
