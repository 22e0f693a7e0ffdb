//! `q3c_forward` and the exported data symbols (manifest, its length, the ABI version).

use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::values::{FunctionValue, IntValue, PointerValue};
use inkwell::{AddressSpace, IntPredicate};
use q3c_abi::{step_offsets as so, Manifest, ABI_VERSION};
use q3c_backend_common::items::work_items;
use q3c_backend_common::plan::{self, Loc, Plan};
use q3c_backend_common::BackendError;
use q3c_ir::{Graph, NodeId, Op};

use crate::fb::{Fb, Flavor, BUG};
use crate::module::nounwind;
use crate::staging::Staging;

/// Builds `int32_t q3c_forward(const q3c_step *step)`: checks the step, then dispatches every kernel in
/// order through the runtime's `parallel_for` (a staged product after the dispatch that prepares its
/// activations).
pub fn build<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    graph: &Graph,
    plan: &Plan,
    kernels: &[(NodeId, FunctionValue<'ctx>, Option<Staging<'ctx>>)],
    vocab: usize,
) -> Result<FunctionValue<'ctx>, BackendError> {
    let i32t = cx.i32_type();
    let i64t = cx.i64_type();
    let ptr = cx.ptr_type(AddressSpace::default());
    let f = m.add_function(
        q3c_abi::SYM_FORWARD,
        i32t.fn_type(&[ptr.into()], false),
        Some(Linkage::External),
    );
    nounwind(cx, f);
    let fb = Fb::new(
        cx,
        m,
        f,
        Flavor::Cpu {
            lanes: 4,
            bf16_dot: false,
        },
    );
    let step = f.get_nth_param(0).expect("1 param").into_pointer_value();
    let field = |off: i32| fb.off(step, off as usize);
    let fail_if = |cond: IntValue<'ctx>, code: i32| {
        fb.when(cond, |fb| {
            fb.b.build_return(Some(&i32t.const_int(code as u64, true)))
                .expect(BUG);
            // Code after a return is unreachable; give the builder a fresh block to continue in.
            let dead = cx.append_basic_block(f, "dead");
            fb.b.position_at_end(dead);
        });
    };

    let ids = fb.load_ptr(field(so::IDS));
    let t = fb.load_i64(field(so::T));
    let past = fb.load_i64(field(so::PAST));
    // t must be in 1..=max_tokens.
    let t_minus_1 = fb.b.build_int_sub(t, fb.i64c(1), "").expect(BUG);
    fail_if(
        fb.icmp(IntPredicate::UGE, t_minus_1, fb.i64c(plan.max_tokens)),
        q3c_abi::ERR_TOKENS,
    );
    // Every id in 0..vocab.
    let bad = fb.var(cx.bool_type().const_zero());
    fb.for_range(fb.i64c(0), t, 1, |fb, i| {
        let id = fb.load_i32_as_i64(fb.addr(ids, i, 4));
        let out = fb.icmp(IntPredicate::UGE, id, fb.i64c(vocab));
        let any =
            fb.b.build_or(fb.get(bad).into_int_value(), out, "")
                .expect(BUG);
        fb.set(bad, any);
    });
    fail_if(fb.get(bad).into_int_value(), q3c_abi::ERR_TOKEN_ID);

    let weights = fb.load_ptr(field(so::WEIGHTS));
    let kv = fb.load_ptr(field(so::KV));
    let scratch = fb.load_ptr(field(so::SCRATCH));
    let logits = fb.load_ptr(field(so::LOGITS));
    let services = fb.load_ptr(field(so::SERVICES));
    let parallel_for = fb.load_ptr(services);
    let pool = fb.load_ptr(fb.off(services, 8));
    // Kernel arguments: T, past, then input and output pointers.
    let words = 2 + kernels
        .iter()
        .map(|&(id, _, _)| graph.inputs(id).len() + graph.node(id).ty.elements().len())
        .max()
        .unwrap_or(0);
    let args = fb.stack(8 * words);
    let pf_type = cx
        .void_type()
        .fn_type(&[ptr.into(), ptr.into(), ptr.into(), i64t.into()], false);

    let pointer = |loc: Loc| -> PointerValue<'ctx> {
        match loc {
            // The address of the weight's table entry; single weights are dereferenced below, expert stacks
            // pass the entry address itself (E consecutive data pointers).
            Loc::Weight { index, .. } => fb.off(weights, index * 8),
            Loc::Ids | Loc::Positions => ids,
            Loc::Scratch { offset } => fb.off(scratch, offset),
            Loc::Cache { slot } => fb.load_ptr(fb.off(kv, slot * 8)),
            Loc::Logits => logits,
        }
    };
    // With last_logits_only, the logits kernel sees one row: the last one of its input.
    let last_only = fb.load_i64(field(so::LAST_LOGITS_ONLY));
    let last_only = fb.icmp(IntPredicate::NE, last_only, fb.i64c(0));
    let t_logits =
        fb.b.build_select(last_only, fb.i64c(1), t, "")
            .expect(BUG)
            .into_int_value();
    let skipped_rows =
        fb.b.build_select(last_only, t_minus_1, fb.i64c(0), "")
            .expect(BUG)
            .into_int_value();
    let expert_stack = |n: NodeId| {
        matches!(&graph.node(n).op, Op::Weight { name, .. }
            if name.contains(q3c_models::tensors::EXPERT_PLACEHOLDER))
    };
    let dispatch = |kernel: FunctionValue<'ctx>, n: IntValue<'ctx>| {
        let kernel_ptr = kernel.as_global_value().as_pointer_value();
        fb.b.build_indirect_call(
            pf_type,
            parallel_for,
            &[pool.into(), kernel_ptr.into(), args.into(), n.into()],
            "",
        )
        .expect(BUG);
    };
    for &(id, kernel, staging) in kernels {
        let is_logits = plan.loc[&id] == Loc::Logits;
        let t_node = if is_logits { t_logits } else { t };
        let inputs = graph.inputs(id);
        let mut pointers = Vec::with_capacity(inputs.len());
        for (i, &input) in inputs.iter().enumerate() {
            let loc = plan.input_loc(graph, id, i);
            let mut p = pointer(loc);
            if matches!(loc, Loc::Weight { .. }) && !expert_stack(input) {
                p = fb.load_ptr(p);
            }
            if is_logits && i == 0 {
                p = fb.addr(p, skipped_rows, plan::bytes_per_token(graph, input)?);
            }
            pointers.push(p);
        }
        fb.store(t_node, args);
        fb.store(past, fb.off(args, 8));
        if let Some(st) = staging {
            // Prepare the activations in the staging area; the product reads them from there.
            let staged = fb.off(scratch, st.offset);
            fb.store(pointers[0], fb.off(args, 16));
            fb.store(staged, fb.off(args, 24));
            dispatch(st.kernel, fb.mul_c(t_node, st.rows_per_token));
            pointers[0] = staged;
        }
        for (i, p) in pointers.into_iter().enumerate() {
            fb.store(p, fb.off(args, 16 + 8 * i));
        }
        let outs = plan
            .elements
            .get(&id)
            .cloned()
            .unwrap_or_else(|| vec![plan.loc[&id]]);
        for (i, loc) in outs.into_iter().enumerate() {
            fb.store(pointer(loc), fb.off(args, 16 + 8 * (inputs.len() + i)));
        }
        let items = work_items(graph, id);
        let n = if items.scales_with_t {
            fb.mul_c(t, items.count)
        } else {
            fb.i64c(items.count)
        };
        dispatch(kernel, n);
    }
    fb.b.build_return(Some(&i32t.const_int(q3c_abi::OK as u64, true)))
        .expect(BUG);
    fb.finish();
    Ok(f)
}

/// Defines the exported constants `q3c_manifest`, `q3c_manifest_len` and `q3c_abi_version`.
pub fn export_manifest<'ctx>(
    cx: &'ctx Context,
    m: &Module<'ctx>,
    manifest: &Manifest,
) -> Result<(), BackendError> {
    let json = serde_json::to_vec(manifest).map_err(|e| BackendError::Internal(e.to_string()))?;
    let bytes = cx.const_string(&json, false);
    let g = m.add_global(bytes.get_type(), None, q3c_abi::SYM_MANIFEST);
    g.set_initializer(&bytes);
    let len = cx.i64_type().const_int(json.len() as u64, false);
    let gl = m.add_global(cx.i64_type(), None, q3c_abi::SYM_MANIFEST_LEN);
    gl.set_initializer(&len);
    let version = cx.i32_type().const_int(u64::from(ABI_VERSION), false);
    let gv = m.add_global(cx.i32_type(), None, q3c_abi::SYM_ABI_VERSION);
    gv.set_initializer(&version);
    for g in [g, gl, gv] {
        g.set_constant(true);
        g.set_linkage(Linkage::External);
        g.set_alignment(8);
    }
    Ok(())
}
