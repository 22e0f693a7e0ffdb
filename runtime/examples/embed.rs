//! Embedding q3c in a service: load a compiled artifact once, serve many sessions from it.
//!
//! ```sh
//! q3c compile tests/reference/fixtures/moe -o /tmp/moe.so
//! cargo run --release -p q3c-runtime --example embed -- /tmp/moe.so tests/reference/fixtures/moe
//! ```

use q3c_runtime::{generate, Batch, CompiledModel, GenerateOptions, Session};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (artifact, weights) = match (args.next(), args.next()) {
        (Some(a), Some(w)) => (a, w),
        _ => return Err("usage: embed MODEL.so WEIGHTS_DIR".into()),
    };
    // Load once: checks the ABI, the CPU and every weight; 2 worker threads.
    let model = CompiledModel::load(artifact.as_ref(), weights.as_ref(), 2)?;
    let opts = GenerateOptions {
        max_new_tokens: 8,
        sampling: q3c_runtime::SamplingParams::greedy(),
        stop_ids: model.config().eos_token_ids.clone(),
    };

    // Each session has its own KV cache; sessions share the weights and the code.
    let mut alice = model.session();
    let mut bob = model.session_with_capacity(512);
    println!("alice: {:?}", generate(&mut alice, &[1, 2, 3], &opts)?);
    println!("bob:   {:?}", generate(&mut bob, &[7, 8], &opts)?);

    // Sessions continue where they left off.
    let logits = alice.forward(&[4])?;
    println!(
        "alice now holds {} tokens; vocab {}",
        alice.position(),
        logits.vocab
    );

    // Many conversations at once: a batch feeds all of them in each forward call (the weights are read
    // once for all), each sequence in its own blocks of one shared KV cache.
    let mut batch = model.batch(4096);
    let (a, b) = (batch.open(), batch.open());
    let mut rows = batch.forward_last(&[(a, &[1, 2, 3]), (b, &[7, 8])])?;
    for _ in 0..4 {
        let next: Vec<[u32; 1]> = rows
            .iter()
            .map(|r| [q3c_runtime::generate::argmax(r)])
            .collect();
        rows = batch.forward_last(&[(a, &next[0]), (b, &next[1])])?;
    }
    println!(
        "batch: a holds {} tokens, b {}",
        batch.position(a),
        batch.position(b)
    );
    batch.close(b);
    Ok(())
}
