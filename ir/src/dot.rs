//! Graphviz DOT export: one box per node (op, attributes, type), edges labelled by input slot.

use std::fmt::Write;

use crate::graph::Graph;
use crate::op::Op;
use crate::text::numbering;

/// The graph in Graphviz DOT, numbered as in the text form. Weights are drawn as grey notes.
pub fn to_dot(graph: &Graph) -> String {
    let numbers = numbering(graph);
    let order = graph.topo_order().unwrap_or_else(|_| graph.node_ids());
    let mut out = String::from(
        "digraph q3c {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n",
    );
    for &id in &order {
        let node = graph.node(id);
        let detail = match &node.op {
            Op::Weight { name, .. } => name.clone(),
            Op::Input(kind) => kind.name().to_string(),
            Op::KvAppend { layer, kind } => format!("layer {layer} {}", kind.name()),
            Op::Reshape { shape } => shape.to_string(),
            Op::RmsNorm { eps } => format!("eps {eps:?}"),
            Op::Rope(spec) => match &spec.yarn {
                Some(y) => format!("theta {:?} yarn x{:?}", spec.theta, y.factor),
                None => format!("theta {:?}", spec.theta),
            },
            Op::TopK { k } => format!("k {k}"),
            Op::ReduceSum { axis } => format!("axis {axis}"),
            _ => String::new(),
        };
        let style = match node.op {
            Op::Weight { .. } => ", shape=note, style=filled, fillcolor=\"#eeeeee\"",
            Op::Input(_) => ", shape=ellipse",
            _ => "",
        };
        let label = format!(
            "%{} {}\\n{}{}",
            numbers[&id],
            node.op.name(),
            escape(&detail),
            if detail.is_empty() { "" } else { "\\n" }
        );
        writeln!(
            out,
            "  n{} [label=\"{label}{}\"{style}];",
            numbers[&id], node.ty
        )
        .unwrap();
    }
    for &id in &order {
        for (slot, input) in graph.inputs(id).iter().enumerate() {
            writeln!(
                out,
                "  n{} -> n{} [label=\"{slot}\"];",
                numbers[input], numbers[&id]
            )
            .unwrap();
        }
    }
    for (name, id) in graph.outputs() {
        if let Some(n) = numbers.get(id) {
            writeln!(
                out,
                "  out_{name} [label=\"{}\", shape=doublecircle];\n  n{n} -> out_{name};",
                escape(name)
            )
            .unwrap();
        }
    }
    out.push_str("}\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}
