//! Activations prepared once per dispatch for the matrix product that follows: quantized to q8, or rounded
//! to bf16 for `vdpbf16ps`. Each prepared product gets a staging dispatch before it that writes its rows
//! into a staging area after every other scratch buffer; the product reads them from there. Done inside
//! the product kernel instead, it ran once per work item (a panel of 16 columns): for decode, as often as
//! there are panels.

use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::values::FunctionValue;
use inkwell::AddressSpace;
use q3c_backend_common::items::{dims, in_dtype};
use q3c_backend_common::launch::Prep;
use q3c_backend_common::plan::Plan;
use q3c_ir::{Graph, NodeId, Op};

use crate::fb::{Fb, Flavor, BUG};
use crate::gemm::{bf16_staged, round_rows_bf16};
use crate::module::function_attributes;
use crate::q8;

/// Bytes of one row of `k` prepared as `prep` for `flavor`: q8, or bf16 — followed by the row as it came
/// (f32) where prefill's tiles read that instead (`CpuTuning::bf16_tiles` unset).
pub fn row_bytes(prep: Prep, k: usize, flavor: Flavor) -> usize {
    match prep {
        Prep::Q8 => q8::row_bytes(k),
        Prep::Bf16 if flavor.tuning().bf16_tiles => 2 * k,
        Prep::Bf16 => 6 * k,
    }
}

/// `(prep, k, rows per token)` of node `id` if it is a matrix product whose activations are staged.
pub fn of(graph: &Graph, plan: &Plan, id: NodeId, flavor: Flavor) -> Option<(Prep, usize, usize)> {
    let x = dims(graph, graph.inputs(id)[0]);
    let k = *x.last().expect("rank");
    // The weights' input, and the activation rows per token the product reads.
    let (w, rows) = match graph.node(id).op {
        Op::Linear | Op::SwiGlu | Op::LinearGroup { .. } => (1, x[1..x.len() - 1].iter().product()),
        // Grouped: one row per (token, slot), gathered in expert order (see `launch`).
        Op::ExpertLinear | Op::ExpertSwiGlu => (2, dims(graph, id)[1]),
        _ => return None,
    };
    let prep = match in_dtype(plan, graph, id, w) {
        // 4- and 6-bit weights multiply 8-bit activations.
        dt if dt.is_quantized() => Prep::Q8,
        dt if bf16_staged(flavor, dt, k) => Prep::Bf16,
        _ => return None,
    };
    Some((prep, k, rows))
}

/// Defines the staging kernel `name` for rows of `k`.
pub fn kernel<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    name: &str,
    prep: Prep,
    k: usize,
    flavor: Flavor,
) -> FunctionValue<'ctx> {
    let i64t = cx.i64_type();
    let ptr = cx.ptr_type(AddressSpace::default());
    let ty = cx
        .void_type()
        .fn_type(&[ptr.into(), i64t.into(), i64t.into()], false);
    let f = m.add_function(name, ty, Some(Linkage::Internal));
    function_attributes(cx, f);
    let fb = Fb::new(cx, m, f, flavor);
    let param = |i| f.get_nth_param(i).expect("3 params");
    let args = param(0).into_pointer_value();
    let (start, end) = (param(1).into_int_value(), param(2).into_int_value());
    let (x, dst) = (fb.load_ptr(fb.off(args, 16)), fb.load_ptr(fb.off(args, 24)));
    fb.for_range(start, end, 1, |fb, row| {
        let (src, to) = (
            fb.addr(x, row, k * 4),
            fb.addr(dst, row, row_bytes(prep, k, flavor)),
        );
        match prep {
            Prep::Q8 => q8::quantize_row(fb, src, to, k),
            Prep::Bf16 => {
                round_rows_bf16(fb, src, 1, k, to);
                if !flavor.tuning().bf16_tiles {
                    let copy = fb.off(to, 2 * k);
                    fb.for_n(k / 16, |fb, j| {
                        fb.store(fb.vload(fb.addr(src, j, 64)), fb.addr(copy, j, 64))
                    });
                }
            }
        }
    });
    fb.b.build_return(None).expect(BUG);
    fb.finish();
    f
}
