//! The reference executor against transformers on every golden fixture.

use q3c_runtime::Session;
use q3c_tests::*;

#[test]
fn full_forward_matches_transformers() {
    for name in FIXTURES {
        let g = golden(name);
        let model = reference_model(name);
        let logits = model.session().forward(&g.prompt_ids).unwrap();
        assert_eq!(
            (logits.rows, logits.vocab),
            (g.prompt_ids.len(), g.vocab),
            "{name}"
        );
        let diff = max_abs_diff(&logits.data, &g.logits);
        assert!(diff <= LOGIT_TOLERANCE, "{name}: max |dlogit| = {diff:e}");
        eprintln!("{name}: max |dlogit| vs transformers = {diff:.2e}");
    }
}

#[test]
fn decoding_token_by_token_equals_the_full_forward() {
    for name in FIXTURES {
        let g = golden(name);
        let model = reference_model(name);
        let full = model.session().forward(&g.prompt_ids).unwrap();
        let mut s = model.session();
        // A prefill of the first half, then one token at a time.
        let split = g.prompt_ids.len() / 2;
        let mut rows = s.forward(&g.prompt_ids[..split]).unwrap().data;
        for &id in &g.prompt_ids[split..] {
            rows.extend(s.forward(&[id]).unwrap().data);
        }
        assert_eq!(s.position(), g.prompt_ids.len());
        let diff = max_abs_diff(&rows, &full.data);
        assert!(
            diff <= 1e-5,
            "{name}: incremental vs full differ by {diff:e}"
        );
    }
}

#[test]
fn greedy_continuation_matches_transformers() {
    for name in FIXTURES {
        let g = golden(name);
        let model = reference_model(name);
        let ids = greedy_continuation(&mut model.session(), &g);
        assert_eq!(ids, g.greedy_ids, "{name}");
    }
}

#[test]
fn sessions_are_independent_and_reset() {
    let g = golden("moe");
    let model = reference_model("moe");
    let mut a = model.session();
    let mut b = model.session();
    let first = a.forward(&g.prompt_ids).unwrap();
    b.forward(&g.prompt_ids[..3]).unwrap();
    a.reset();
    assert_eq!(a.position(), 0);
    assert_eq!(a.forward(&g.prompt_ids).unwrap(), first);
    assert_eq!(b.position(), 3);
}

#[test]
fn a_bad_token_id_leaves_the_session_untouched() {
    let g = golden("dense_gqa");
    let model = reference_model("dense_gqa");
    let mut s = model.session();
    s.forward(&g.prompt_ids[..2]).unwrap();
    let err = s.forward(&[1, 512]).unwrap_err().to_string();
    assert_eq!(err, "token id 512 is outside the vocabulary (0..512)");
    assert_eq!(s.position(), 2);
    let rest = s.forward(&g.prompt_ids[2..]).unwrap();
    let full = model.session().forward(&g.prompt_ids).unwrap();
    assert!(max_abs_diff(&rest.data, &full.data[2 * g.vocab..]) <= 1e-5);
}
